"""Offline throughput of llama.cpp (llama-cpp-python) on the shared workload, from the GGUF itself.

Same workload and JSON keys as the other peers (kvmem/bench/workloads.py): each request gets exactly
its output length, greedy (top_k 1; EOS not checked). llama-cpp-python's `Llama` runs one sequence
at a time, so requests run one after another: this is llama.cpp at batch 1, the way its users run
it (llama-server's parallel slots are not used). `--threads` sets both n_threads and n_threads_batch.
One small warm-up generate, then the whole workload is timed.

Run it with the llama.cpp venv (run_llamacpp.sh; setup in README.md).
"""
from __future__ import annotations

import argparse
import sys
import time

from bench_common import base_result, load_workload, parse_args, timed, write_result


def main() -> None:
    sys.argv, extra = _split_own_args(sys.argv)
    args = parse_args(__doc__.splitlines()[0])

    import llama_cpp
    from llama_cpp import Llama

    w = load_workload(args, 49152)  # replaced below once the model's vocabulary is known
    llm = Llama(model_path=args.model, n_ctx=max(512, w.max_seq_len + 8), n_batch=512, n_threads=extra.threads,
                n_threads_batch=extra.threads, verbose=False)
    w = load_workload(args, llm.n_vocab())

    def generate(prompt: list[int], n: int) -> list[int]:
        llm.reset()
        out = []
        for tok in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(tok)
            if len(out) == n:
                break
        return out

    def run():
        return [generate(p, n) for p, n in zip(w.prompts, w.output_lens)]

    t0 = time.perf_counter()
    for p in w.prompts[:args.warmup_prompts]:
        generate(p[:64], args.warmup_tokens)
    warmup_s = time.perf_counter() - t0
    outputs, elapsed, contention, quiet = timed(run, args.wait_quiet_max)
    n_out = sum(len(o) for o in outputs)
    if n_out != w.num_output_tokens:
        raise RuntimeError(f"produced {n_out} tokens, expected {w.num_output_tokens}")
    result = base_result("llamacpp", args, w, elapsed, warmup_s, n_out)
    result.update({
        "kv_cache_gb": None,
        "batching": "none: one request at a time (llama-cpp-python)",
        "first_output_ids": outputs[0][:16],
        "llama_cpp_python_version": llama_cpp.__version__,
        "threads": extra.threads,
        "cpu_contention": contention,
        "wait_quiet": quiet,
    })
    write_result(result, args.json)


def _split_own_args(argv: list[str]) -> tuple[list[str], argparse.Namespace]:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--threads", type=int, default=2)
    extra, rest = ap.parse_known_args(argv[1:])
    return [argv[0], *rest], extra


if __name__ == "__main__":
    main()
