"""Offline throughput of vLLM (CPU build) on a fixed random-token workload.

Workload (shared with kvmem's and transformers' benchmarks: kvmem/bench/workloads.py): each request
generates exactly its output length (greedy, ignore_eos). One small warm-up generate, then the
whole workload is timed as one ``LLM.generate`` call.

Run it with the vLLM venv, through run_vllm.sh, which sets the CPU-tuning environment
(VLLM_CPU_KVCACHE_SPACE, OMP binding, tcmalloc + Intel OpenMP preloads).
"""
from __future__ import annotations

import json
import os
import time

from bench_common import base_result, load_workload, parse_args, timed, write_result


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "KV cache size; exported as VLLM_CPU_KVCACHE_SPACE unless already set")
    # vLLM's CPU backend reads the KV cache size (GiB) from the environment.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(args.kv_cache_gb) if args.kv_cache_gb.is_integer()
                                                        else args.kv_cache_gb))

    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(os.path.join(args.model, "config.json")) as f:
        vocab_size = json.load(f)["vocab_size"]
    w = load_workload(args, vocab_size)
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=w.max_seq_len + 16, seed=args.seed)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in w.output_lens]

    warm = [TokensPrompt(prompt_token_ids=p[:64]) for p in w.prompts[: args.warmup_prompts]]
    t0 = time.perf_counter()
    llm.generate(warm, SamplingParams(temperature=0, max_tokens=args.warmup_tokens, ignore_eos=True), use_tqdm=False)
    warmup_s = time.perf_counter() - t0
    llm.reset_prefix_cache()  # the warm-up must not give the timed run prefix-cache hits

    batch = [TokensPrompt(prompt_token_ids=p) for p in w.prompts]
    outs, elapsed, contention, quiet = timed(lambda: llm.generate(batch, params, use_tqdm=False), args.wait_quiet_max)

    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    if n_out != w.num_output_tokens:
        raise SystemExit(f"token counts off: out {n_out} (expected {w.num_output_tokens})")
    result = base_result("vllm", args, w, elapsed, warmup_s, n_out)
    result.update({
        "kv_cache_gb": args.kv_cache_gb,
        "first_output_ids": list(outs[0].outputs[0].token_ids[:16]),
        "vllm_version": vllm.__version__,
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "env": {k: os.environ.get(k) for k in (
            "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU",
            "LD_PRELOAD", "OMP_NUM_THREADS", "VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR")},
        "cpu_contention": contention,
        "wait_quiet": quiet,
    })
    write_result(result, args.json)


if __name__ == "__main__":
    main()
