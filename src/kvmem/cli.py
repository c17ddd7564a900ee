"""`kvmem serve | generate | chat | build-kernels | bench ...` — the command line."""

from __future__ import annotations

import argparse
import sys
import time

from kvmem.progress import show_progress


def add_engine_args(p: argparse.ArgumentParser, model_positional: bool = False) -> None:
    if model_positional:  # `kvmem serve MODEL`, as `vllm serve MODEL`
        p.add_argument("model_arg", nargs="?", default=None, metavar="MODEL",
                       help="HF directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--model", default=None, help="HF directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    from kvmem.config import ATTENTION_BACKENDS, KV_CACHE_STRATEGIES

    p.add_argument("--kv-cache", default="paged", choices=KV_CACHE_STRATEGIES, help="KV-cache strategy")
    p.add_argument("--kv-cache-memory", default=None, help="bytes, a size like 2GiB, or a fraction of free memory")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--attention-backend", default="torch", choices=ATTENTION_BACKENDS,
                   help="torch: native CPU kernel / batched torch ops; reference: plain per-sequence math; "
                        "triton: the Triton kernel for every row (CUDA)")
    p.add_argument("--no-batch-invariant", action="store_true",
                   help="let greedy output depend on the rest of the batch for a few %% more speed at batch 1")
    v = p.add_argument_group("virtual KV cache (vAttention) optimizations, for measuring each")
    v.add_argument("--no-background-mapping", action="store_true", help="map pages on the step's path")
    v.add_argument("--no-deferred-reclamation", action="store_true", help="unmap a slot's pages when it ends")
    v.add_argument("--no-eager-mapping", action="store_true", help="map a prompt chunk by chunk, not whole")
    v.add_argument("--mapping-lookahead", type=int, default=8, help="tokens mapped ahead of need")
    h = p.add_argument_group("hybrid KV cache (HybridServe): --kv-cache hybrid")
    h.add_argument("--device-memory", default=None, help="device tier + staging buffers: bytes, a size like 64MiB, "
                   "or a fraction of free device memory (default: --kv-cache-memory's budget)")
    h.add_argument("--host-memory", default=None, help="host tier (KV + activation blocks): bytes, a size like 1GiB, "
                   "or a fraction of free host memory (default: 0.2)")
    h.add_argument("--act-ratio", type=float, default=None, help="force this fraction (0-1) of host-tier blocks to "
                   "hold activations (default: the cost model decides; KV only for grouped-query models)")
    h.add_argument("--offload-weights", action="store_true", help="keep layer weights in host memory and stream "
                   "them to the device layer by layer")
    h.add_argument("--hybrid-profile", default=None, help="hardware profile JSON for the cost model (kvmem bench "
                   "hybrid --measure --save-profile FILE); default: measured at start-up when needed")


def _memory_arg(value: str | None) -> int | str | None:
    return int(value) if value is not None and value.isdigit() else value


def engine_kwargs(args: argparse.Namespace) -> dict:
    kv_mem = _memory_arg(args.kv_cache_memory)
    model = args.model or getattr(args, "model_arg", None)
    return dict(model=model, dtype=args.dtype, kv_cache=args.kv_cache, kv_cache_memory=kv_mem,
                block_size=args.block_size, enable_prefix_caching=not args.no_prefix_caching,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                max_model_len=args.max_model_len, device=args.device, num_threads=args.threads,
                attention_backend=args.attention_backend, batch_invariant=not args.no_batch_invariant,
                background_mapping=not args.no_background_mapping,
                deferred_reclamation=not args.no_deferred_reclamation, eager_mapping=not args.no_eager_mapping,
                mapping_lookahead=args.mapping_lookahead,
                device_memory=_memory_arg(args.device_memory), host_memory=_memory_arg(args.host_memory),
                act_ratio=args.act_ratio, offload_weights=args.offload_weights, hybrid_profile=args.hybrid_profile)


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int | None = 128) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
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
        return _bench_throughput_compare(args)
    from kvmem.bench.throughput import run_throughput, write_json

    result = run_throughput(args.workload, args.num_prompts, args.input_len, args.output_len, seed=args.seed,
                            wait_quiet_max=args.wait_quiet_max, **engine_kwargs(args))
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
    if not args.hf_model:
        raise ValueError("--compare needs --hf-model DIR: a Hugging Face export of the same weights, for the peers")
    dtype = "bfloat16" if args.dtype == "auto" else args.dtype
    out_dir = Path(args.out_dir or f"benchmarks/results/throughput_vs_peers/{args.workload}_{dtype}")
    cfg = CompareConfig(args.workload, dtype, args.kv_cache, budget / 2**30, args.seed, args.rounds, out_dir,
                        Path(args.hf_model), parse_peers(args.compare), args.num_prompts, args.input_len,
                        args.output_len, wait_quiet_max=args.wait_quiet_max, max_retries=args.max_retries)
    print_summary(run_compare(cfg))
    print(f"  results in {out_dir}/")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from kvmem.config import EngineConfig
    from kvmem.server.launcher import serve

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if logging.getLogger().isEnabledFor(logging.INFO):
        show_progress()
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    return serve(EngineConfig(**engine_kwargs(args)), host=args.host, port=args.port,
                 served_model_name=args.served_model_name, api_key=args.api_key, grace_s=args.shutdown_grace,
                 max_body_bytes=args.max_body_bytes, log_level=args.log_level,
                 max_prompts_per_request=args.max_prompts_per_request, max_prompt_chars=args.max_prompt_chars,
                 health_step_timeout=args.health_step_timeout, request_read_timeout=args.request_read_timeout,
                 timeout_keep_alive=args.timeout_keep_alive)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmem", description="LLM inference with managed KV-cache memory")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a completion for one prompt")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--raw", action="store_true", help="do not apply the model's chat template")
    add_engine_args(gen)
    add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_engine_args(srv, model_positional=True)
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--served-model-name", default=None, help="the model name clients send (default: the "
                     "model's own name, e.g. SmolLM2-135M-Instruct)")
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    srv.add_argument("--shutdown-grace", type=float, default=5.0,
                     help="seconds in-flight requests get to finish after SIGINT/SIGTERM before being aborted")
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
    srv.set_defaults(func=cmd_serve)

    chat = sub.add_parser("chat", help="interactive chat in the terminal, streaming the answers")
    chat.add_argument("--system", default=None, help="a system message to start the conversation with")
    add_engine_args(chat)
    add_sampling_args(chat, max_tokens=None)
    chat.set_defaults(func=cmd_chat)

    bk = sub.add_parser("build-kernels", help="build the native CPU kernels for this Python environment now "
                                              "(`make setup` does; otherwise the first start does, once)")
    bk.set_defaults(func=cmd_build_kernels)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    tp = bench.add_parser("throughput", help="offline throughput on a seeded workload, optionally against peers")
    tp.add_argument("--workload", default="random", choices=["random", "sharegpt", "prefix"],
                    help="random: N x input-len -> output-len; sharegpt: 256 log-normal lengths; "
                         "prefix: 128 requests sharing a 512-token system prompt")
    tp.add_argument("--num-prompts", type=int, default=None, help="default: the workload's own (64 / 256 / 128)")
    tp.add_argument("--input-len", type=int, default=128, help="random workload")
    tp.add_argument("--output-len", type=int, default=128, help="random workload")
    tp.add_argument("--seed", type=int, default=0)
    tp.add_argument("--json", default=None, help="write the result here")
    tp.add_argument("--wait-quiet-max", type=float, default=0.0,
                    help="wait up to this many seconds for other processes to go idle before timing")
    cmp_ = tp.add_argument_group("comparison with other engines (from a repository checkout; benchmarks/peers)")
    cmp_.add_argument("--compare", default=None, metavar="vllm,transformers",
                      help="also run these peers, alternating with kvmem round by round, and report ratios")
    cmp_.add_argument("--rounds", type=int, default=2)
    cmp_.add_argument("--max-retries", type=int, default=2,
                      help="rerun a run during which other processes took more than 0.1 cores, up to this many times")
    cmp_.add_argument("--hf-model", default=None,
                      help="Hugging Face export of the same weights, for the peers (needed by --compare)")
    cmp_.add_argument("--out-dir", default=None, help="default: benchmarks/results/throughput_vs_peers/WORKLOAD_DTYPE")
    add_engine_args(tp)
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
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"kvmem: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
