"""`kvmem serve | generate | chat | build-kernels | bench ...` — the command line."""

from __future__ import annotations

import argparse
import sys
import time

from kvmem.progress import show_progress


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default in --help, except where there is none (None) or the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or "default" in text or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def _memory_arg(value: str | None) -> int | str | None:
    return int(value) if value is not None and value.isdigit() else value


def _flag_type(annotation: str):
    """The argparse type of an EngineConfig field from its annotation (a string: postponed annotations)."""
    kinds = {k.strip() for k in str(annotation).split("|")} - {"None"}
    if "str" in kinds and "int" in kinds:
        return _memory_arg  # memory sizes: bytes, a size string, or a fraction
    if kinds == {"int"}:
        return int
    if kinds <= {"float", "int"}:
        return float
    return str


def add_engine_args(p: argparse.ArgumentParser, model_positional: bool = False, seed: str = "own") -> None:
    """One flag per `EngineConfig` field, generated from the dataclass and `config.ENGINE_FLAGS` (help,
    extra spellings, group): `--field-name`, booleans as `--x/--no-x`. `seed`: "own" (a --seed flag
    here), "shared" (the parser's sampling --seed also seeds the engine) or "none" (the parser's
    --seed means something else; the engine keeps its default)."""
    import dataclasses

    from kvmem.config import ATTENTION_BACKENDS, ENGINE_FLAGS, KV_CACHE_STRATEGIES, EngineConfig, EngineFlag

    if model_positional:  # `kvmem serve MODEL`, as `vllm serve MODEL`
        p.add_argument("model_arg", nargs="?", default=None, metavar="MODEL",
                       help="Hub id (org/name, org/name:QUANT), HF directory or .gguf file "
                            "(default: embedded SmolLM2-135M-Instruct)")
    choices = {"kv_cache": KV_CACHE_STRATEGIES, "attention_backend": ATTENTION_BACKENDS}
    groups: dict[str, argparse._ArgumentGroup] = {}
    names = []
    for f in dataclasses.fields(EngineConfig):
        if f.name == "seed" and seed != "own":
            if seed == "shared":
                names.append(f.name)
            continue
        names.append(f.name)
        spec = ENGINE_FLAGS.get(f.name, EngineFlag(""))
        target = p if spec.group is None else groups.get(spec.group) or groups.setdefault(
            spec.group, p.add_argument_group(spec.group))
        flag = "--" + f.name.replace("_", "-")
        text = spec.help.replace("%", "%%")
        if str(f.type) == "bool":
            offs = [a for a in spec.aliases if a.startswith("--no-")]
            if offs:
                text += f" ({', '.join(offs)}: the same as --no-{flag[2:]})"
            target.add_argument(flag, *[a for a in spec.aliases if a not in offs], dest=f.name, default=f.default,
                                action=argparse.BooleanOptionalAction, help=text)
            for off in offs:
                target.add_argument(off, dest=f.name, action="store_false", help=argparse.SUPPRESS)
        else:
            target.add_argument(flag, *spec.aliases, dest=f.name, default=f.default, type=_flag_type(f.type),
                                choices=choices.get(f.name), metavar=spec.metavar, help=text)
    p.set_defaults(engine_fields=tuple(names))


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The EngineConfig keywords of the flags `add_engine_args` made (a None --seed: the engine's default)."""
    kwargs = {name: getattr(args, name) for name in args.engine_fields}
    if kwargs.get("seed", 0) is None:
        del kwargs["seed"]
    kwargs["model"] = args.model or getattr(args, "model_arg", None)
    return kwargs


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int | None = 128) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling (and of the engine's generator)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("-n", type=int, default=1)


def sampling_params(args: argparse.Namespace):
    from kvmem import SamplingParams

    return SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          seed=args.seed, max_tokens=args.max_tokens, stop=args.stop)


def cmd_generate(args: argparse.Namespace) -> int:
    from kvmem import LLM

    params = sampling_params(args)
    show_progress()
    with LLM(**engine_kwargs(args)) as llm:
        start = time.perf_counter()
        if args.raw or not llm.get_tokenizer().chat_template:
            out = llm.generate([args.prompt], params, use_tqdm=False)[0]
        else:
            out = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)[0]
        elapsed = time.perf_counter() - start
    for completion in out.outputs:
        print(completion.text)
    num_tokens = sum(len(c.token_ids) for c in out.outputs)
    print(f"\n[{num_tokens} tokens in {elapsed:.2f} s: {num_tokens / elapsed:.1f} tokens/s; "
          f"prompt {len(out.prompt_token_ids)} tokens; kv_cache={llm.engine.kv_cache_strategy}, "
          f"dtype={str(llm.engine.dtype).removeprefix('torch.')}]", file=sys.stderr)
    return 0


def cmd_bench_throughput(args: argparse.Namespace) -> int:
    if args.compare:
        if args.structured_output_ratio:
            raise ValueError("--structured-output-ratio is kvmem's own measurement; it does not go with --compare")
        return _bench_throughput_compare(args)
    from kvmem.bench.throughput import run_throughput, write_json

    result = run_throughput(args.workload, args.num_prompts, args.input_len, args.output_len, seed=args.seed,
                            wait_quiet_max=args.wait_quiet_max, structured_output_ratio=args.structured_output_ratio,
                            **engine_kwargs(args))
    print(f"kvmem throughput: {result.settings['workload_description']}; "
          f"kv_cache={result.settings['kv_cache']} dtype={result.settings['dtype']}")
    print(f"  elapsed            {result.elapsed_s:.2f} s")
    print(f"  requests/s         {result.requests_per_s:.2f}")
    print(f"  total tokens/s     {result.total_tokens_per_s:.1f}")
    print(f"  output tokens/s    {result.output_tokens_per_s:.1f}")
    if args.json:
        write_json(result, args.json)
        print(f"  wrote {args.json}")
    return 0


def _bench_throughput_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kvmem.bench.compare import CompareConfig, parse_peers, print_summary, run_compare
    from kvmem.config import parse_memory_size

    budget = parse_memory_size(args.kv_cache_memory or "2GiB")
    if not isinstance(budget, int):
        raise ValueError("--compare needs --kv-cache-memory as a size (e.g. 2GiB), the same for every engine")
    peers = parse_peers(args.compare)
    from kvmem.bench.compare import HF_PEERS

    if not args.hf_model and any(p in HF_PEERS for p in peers):
        raise ValueError("--compare needs --hf-model DIR: a Hugging Face export of the same weights, for the peers")
    dtype = "bfloat16" if args.dtype == "auto" else args.dtype
    out_dir = Path(args.out_dir or f"benchmarks/results/throughput_vs_peers/{args.workload}_{dtype}")
    cfg = CompareConfig(args.workload, dtype, args.kv_cache, budget / 2**30, args.seed, args.rounds, out_dir,
                        Path(args.hf_model or "."), peers, args.num_prompts, args.input_len,
                        args.output_len, wait_quiet_max=args.wait_quiet_max, max_retries=args.max_retries,
                        quantization=args.quantization, num_threads=args.num_threads,
                        gguf=Path(args.model) if args.model and str(args.model).endswith(".gguf") else None)
    print_summary(run_compare(cfg))
    print(f"  results in {out_dir}/")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from kvmem.config import EngineConfig
    from kvmem.server.launcher import serve

    logging.basicConfig(level=args.log_level.upper(), datefmt="%m-%d %H:%M:%S",
                        format="%(levelname)s %(asctime)s.%(msecs)03d %(name)s: %(message)s")
    logging.captureWarnings(True)  # Python warnings too, timestamped
    # Start-up progress (kvmem.progress) goes through the root logger: timestamped like every line.
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.node_rank > 0:  # another machine's share of a tensor-parallel replica: its ranks, no server
        from kvmem.distributed.launch import run_node

        return run_node(EngineConfig(**engine_kwargs(args)))
    return serve(EngineConfig(**engine_kwargs(args)), host=args.host, port=args.port,
                 served_model_name=args.served_model_name, api_key=args.api_key, grace_s=args.shutdown_grace,
                 drain_timeout=args.drain_timeout,
                 log_requests=not args.disable_log_requests, log_stats=not args.disable_log_stats,
                 allowed_origins=args.allowed_origins, allowed_methods=args.allowed_methods,
                 allowed_headers=args.allowed_headers, allow_credentials=args.allow_credentials,
                 max_body_bytes=args.max_body_bytes, log_level=args.log_level,
                 max_prompts_per_request=args.max_prompts_per_request, max_prompt_chars=args.max_prompt_chars,
                 health_step_timeout=args.health_step_timeout, request_read_timeout=args.request_read_timeout,
                 timeout_keep_alive=args.timeout_keep_alive, tool_call_parser=args.tool_call_parser,
                 enable_auto_tool_choice=args.enable_auto_tool_choice)


def _json_list(value: str) -> list[str]:
    """vLLM's form of the CORS lists: a JSON list of strings (a bare word is taken as a list of one)."""
    import json

    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = [value]
    if not isinstance(parsed, list) or not all(isinstance(x, str) for x in parsed):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {value!r}")
    return parsed


def cmd_chat(args: argparse.Namespace) -> int:
    from kvmem.chat_repl import run_chat
    from kvmem.config import EngineConfig
    from kvmem.engine.llm_engine import LLMEngine

    params = sampling_params(args)
    if params.n != 1:
        raise ValueError("-n must be 1 for chat")
    show_progress()
    engine = LLMEngine(EngineConfig(**engine_kwargs(args)))
    try:
        return run_chat(engine, params, system=args.system)
    finally:
        engine.close()


def cmd_dashboard(args: argparse.Namespace) -> int:
    import uvicorn

    from kvmem.server.dashboard import replay_app

    app = replay_app(args.replay)
    print(f"kvmem: playing {args.replay} at http://{args.host}:{args.port}/", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_build_kernels(args: argparse.Namespace) -> int:
    from kvmem.attention import cpu_kernels

    show_progress()
    return 0 if cpu_kernels.build() is not None else 1


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from kvmem.bench.serving import cmd_bench_serve as run

    return run(args)


def cmd_bench_memory(args: argparse.Namespace) -> int:
    from kvmem.bench.memory import cmd_bench_memory as run

    return run(args)


def cmd_bench_hybrid(args: argparse.Namespace) -> int:
    from kvmem.bench.hybrid import cmd_bench_hybrid as run

    return run(args)


def cmd_fleet(args: argparse.Namespace) -> int:
    import logging

    from kvmem.fleet.launcher import FleetConfig, run_fleet

    logging.basicConfig(level=logging.INFO, datefmt="%m-%d %H:%M:%S",
                        format="%(levelname)s %(asctime)s.%(msecs)03d %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per health check
    serve_args = list(args.serve_args)
    if args.model_arg:
        serve_args.insert(0, args.model_arg)
    return run_fleet(FleetConfig(
        replicas=args.replicas, policy=args.policy, host=args.host, port=args.port, replica_host=args.replica_host,
        replica_base_port=args.replica_base_port, metrics_port=args.router_metrics_port, pin=not args.no_pin,
        cores_per_replica=args.cores_per_replica, serve_args=serve_args, worker_urls=args.worker_urls or [],
        router=not args.no_router, router_args=args.router_args.split() if args.router_args else [],
        startup_timeout=args.startup_timeout, stop_timeout=args.stop_timeout))


def add_fleet_args(p: argparse.ArgumentParser) -> None:
    from kvmem.fleet.router import POLICIES

    p.add_argument("model_arg", nargs="?", default=None, metavar="MODEL",
                   help="the model every replica serves (same as kvmem serve's; default: the embedded one)")
    p.add_argument("--replicas", type=int, default=2, help="kvmem serve processes to start on this machine")
    p.add_argument("--policy", default="cache_aware", choices=POLICIES,
                   help="the router's policy: cache_aware sends a prompt where its prefix was sent before "
                        "(balanced against load); kv_aware where the replicas' KV events say its prefix is "
                        "cached; round_robin ignores prefixes")
    p.add_argument("--host", default="127.0.0.1", help="the router's address (0.0.0.0: all interfaces)")
    p.add_argument("--port", type=int, default=8000, help="the router's port: the fleet's OpenAI endpoint")
    p.add_argument("--replica-host", default="127.0.0.1",
                   help="what replicas bind (0.0.0.0 when a router on another machine fronts them)")
    p.add_argument("--replica-base-port", type=int, default=None,
                   help="replica i listens on this + i (default: --port + 1; 0: any free ports)")
    p.add_argument("--router-metrics-port", type=int, default=29000,
                   help="the router's Prometheus /metrics port (0: a free one)")
    p.add_argument("--cores-per-replica", type=int, default=None,
                   help="cores pinned to each replica, disjoint (default: an equal share of the usable cores)")
    p.add_argument("--no-pin", action="store_true", help="do not pin replicas to cores")
    p.add_argument("--worker-urls", nargs="+", default=None, metavar="URL",
                   help="front these running replicas (e.g. on other machines) instead of starting any")
    p.add_argument("--no-router", action="store_true",
                   help="start the replicas only (a router on another machine fronts them)")
    p.add_argument("--router-args", default=None, metavar='"FLAGS"',
                   help='more vllm-router flags, in one string, e.g. "--cache-threshold 0.5"')
    p.add_argument("--startup-timeout", type=float, default=600.0,
                   help="seconds to wait for every replica, then the router, to answer /health")
    p.add_argument("--stop-timeout", type=float, default=60.0,
                   help="on SIGTERM/SIGINT: seconds the replicas (draining) and the router get before SIGKILL")


def build_parser() -> argparse.ArgumentParser:
    from kvmem import __version__

    parser = argparse.ArgumentParser(prog="kvmem", description="LLM inference with managed KV-cache memory")
    parser.add_argument("--version", action="version", version=f"kvmem {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a completion for one prompt",
                         formatter_class=HelpFormatter)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--raw", action="store_true", help="do not apply the model's chat template")
    add_engine_args(gen, seed="shared")
    add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server", formatter_class=HelpFormatter)
    add_engine_args(srv, model_positional=True)
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on")
    srv.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                     help="the model names clients may send, all listed by /v1/models; responses name the first "
                          "(default: the model's own name, e.g. SmolLM2-135M-Instruct)")
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* "
                     "(default: $KVMEM_API_KEY, else $VLLM_API_KEY, else none)")
    srv.add_argument("--allowed-origins", type=_json_list, default=[], metavar="JSON_LIST",
                     help='CORS: origins browsers may call from, as JSON, e.g. \'["*"]\' (default: none, no CORS '
                          'headers)')
    srv.add_argument("--allowed-methods", type=_json_list, default=["*"], metavar="JSON_LIST",
                     help="CORS: allowed methods, as JSON")
    srv.add_argument("--allowed-headers", type=_json_list, default=["*"], metavar="JSON_LIST",
                     help="CORS: allowed request headers, as JSON")
    srv.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    srv.add_argument("--disable-log-requests", action="store_true",
                     help="no log line per finished request")
    srv.add_argument("--disable-log-stats", action="store_true",
                     help="no periodic stats line (running, waiting, KV usage, throughput)")
    srv.add_argument("--shutdown-grace", type=float, default=5.0,
                     help="seconds in-flight requests get to finish after SIGINT/SIGTERM before being aborted")
    srv.add_argument("--drain-timeout", type=float, default=30.0,
                     help="on SIGTERM, first drain for up to this many seconds: /health and new requests answer 503 "
                          "(a router sends them elsewhere) while requests in flight finish; 0: no drain")
    srv.add_argument("--max-body-bytes", type=int, default=8 * 2**20, help="larger request bodies get a 413")
    srv.add_argument("--max-prompts-per-request", type=int, default=128,
                     help="prompts one completions request may hold; n x prompts may be at most max(128, this)")
    srv.add_argument("--max-prompt-chars", type=int, default=None, help="longer text prompts (or conversations) "
                     "get a 400 before tokenizing (default: max_model_len x 64)")
    srv.add_argument("--health-step-timeout", type=float, default=120.0,
                     help="/health answers 503 while an engine step has been running longer than this (seconds)")
    srv.add_argument("--request-read-timeout", type=float, default=30.0, help="seconds a client gets to send a "
                     "request's headers, then its body (408), and to resume reading a response it stopped reading")
    srv.add_argument("--timeout-keep-alive", type=float, default=5.0,
                     help="seconds an idle keep-alive connection stays open (uvicorn's option)")
    srv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    from kvmem.tools.parsers import TOOL_PARSERS

    srv.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                     help="how tool calls are found in what the model writes: hermes (Qwen2.5, Hermes), "
                          "llama3_json (Llama 3.x)")
    srv.add_argument("--enable-auto-tool-choice", action="store_true",
                     help='serve tool_choice "auto" (the default with tools); needs --tool-call-parser')
    srv.set_defaults(func=cmd_serve)

    fleet = sub.add_parser("fleet", help="several kvmem serve replicas behind vLLM's cache-aware router "
                                         "(kvmem fleet [flags] [MODEL] -- [kvmem serve flags])",
                           formatter_class=HelpFormatter)
    add_fleet_args(fleet)
    fleet.set_defaults(func=cmd_fleet, serve_args=[])

    chat = sub.add_parser("chat", help="interactive chat in the terminal, streaming the answers",
                          formatter_class=HelpFormatter)
    chat.add_argument("--system", default=None, help="a system message to start the conversation with")
    add_engine_args(chat, seed="shared")
    add_sampling_args(chat, max_tokens=None)
    chat.set_defaults(func=cmd_chat)

    dash = sub.add_parser("dashboard", help="the /dashboard page alone, playing a recording of "
                                            "`kvmem bench memory --record FILE` (no model)")
    dash.add_argument("--replay", required=True, metavar="FILE", help="the recording to play")
    dash.add_argument("--host", default="127.0.0.1")
    dash.add_argument("--port", type=int, default=8000)
    dash.set_defaults(func=cmd_dashboard)

    bk = sub.add_parser("build-kernels", help="build the native CPU kernels for this Python environment now "
                                              "(`make setup` does; otherwise the first start does, once)")
    bk.set_defaults(func=cmd_build_kernels)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    tp = bench.add_parser("throughput", help="offline throughput on a seeded workload, optionally against peers",
                          formatter_class=HelpFormatter)
    tp.add_argument("--workload", default="random", choices=["random", "sharegpt", "prefix"],
                    help="random: N x input-len -> output-len; sharegpt: 256 log-normal lengths; "
                         "prefix: 128 requests sharing a 512-token system prompt")
    tp.add_argument("--num-prompts", type=int, default=None, help="default: the workload's own (64 / 256 / 128)")
    tp.add_argument("--input-len", type=int, default=128, help="random workload")
    tp.add_argument("--output-len", type=int, default=128, help="random workload")
    tp.add_argument("--seed", type=int, default=0, help="seed of the workload")
    tp.add_argument("--json", default=None, help="write the result here")
    tp.add_argument("--structured-output-ratio", type=float, default=0.0, metavar="R",
                    help="fraction of the requests (0..1) generated under a JSON schema (structured outputs)")
    tp.add_argument("--wait-quiet-max", type=float, default=0.0,
                    help="wait up to this many seconds for other processes to go idle before timing")
    cmp_ = tp.add_argument_group("comparison with other engines (from a repository checkout; benchmarks/peers)")
    cmp_.add_argument("--compare", default=None, metavar="vllm,transformers,llamacpp",
                      help="also run these peers, alternating with kvmem round by round, and report ratios")
    cmp_.add_argument("--rounds", type=int, default=2)
    cmp_.add_argument("--max-retries", type=int, default=2,
                      help="rerun a run during which other processes took more than 0.1 cores, up to this many times")
    cmp_.add_argument("--hf-model", default=None,
                      help="Hugging Face export of the same weights, for the peers (needed by --compare)")
    cmp_.add_argument("--out-dir", default=None, help="default: benchmarks/results/throughput_vs_peers/WORKLOAD_DTYPE")
    add_engine_args(tp, seed="none")
    tp.set_defaults(func=cmd_bench_throughput)

    from kvmem.bench.serving import add_serve_args

    bs = bench.add_parser("serve", help="send streaming requests to an OpenAI-compatible server; latency and "
                                        "throughput like vLLM's bench serve")
    add_serve_args(bs)
    bs.set_defaults(func=cmd_bench_serve)

    from kvmem.bench.memory import add_memory_args

    bm = bench.add_parser("memory", help="KV memory: static vs paged vs virtual on one request stream (no model)")
    add_memory_args(bm)
    bm.set_defaults(func=cmd_bench_memory)

    from kvmem.bench.hybrid import add_hybrid_args

    bh = bench.add_parser("hybrid", help="hybrid KV + activation host tier (HybridServe): predicted throughput of "
                                         "KV-only, ACT-only and hybrid from a hardware profile (simulator, no model)")
    add_hybrid_args(bh)
    bh.set_defaults(func=cmd_bench_hybrid)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    serve_args: list[str] = []
    if argv[:1] == ["fleet"]:  # kvmem fleet [fleet flags] -- [kvmem serve flags]
        from kvmem.fleet.launcher import split_serve_args

        argv, serve_args = split_serve_args(argv)
    args = build_parser().parse_args(argv)
    if serve_args:
        args.serve_args = serve_args
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"kvmem: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
