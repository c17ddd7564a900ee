"""Summarize benchmarks/quantized_vs_llamacpp.sh's JSONs: medians and spreads (min-max) per engine,
kvmem/llama.cpp ratios round by round, perplexities, and where Q8_0 greedy tokens first differ."""
import glob
import json
import os
import statistics
import sys


def load(pattern):
    return [json.load(open(p)) for p in sorted(glob.glob(pattern))]


def spread(values, fmt="{:.1f}"):
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def main(out):
    print("batch 1 (4 prompts x 128 -> 128 each alone; median of per-round medians, range):")
    b1 = {e: load(os.path.join(out, f"b1_{e}_r*.json")) for e in ("llamacpp", "kvmem_gguf", "kvmem_bf16")}
    for e, runs in b1.items():
        if runs:
            print(f"  {e:<11} decode tok/s {spread([r['decode_tok_s_median'] for r in runs])}   "
                  f"TTFT ms {spread([r['ttft_ms_median'] for r in runs])}")
    if b1["llamacpp"] and b1["kvmem_gguf"]:
        ratios = [k["decode_tok_s_median"] / l["decode_tok_s_median"] for k, l in zip(b1["kvmem_gguf"], b1["llamacpp"])]
        print("  kvmem gguf / llama.cpp decode, per round: " + ", ".join(f"{x:.2f}" for x in ratios))
    print("batch 64 (random 64 x 128 -> 128, output tok/s):")
    b64 = {q: load(os.path.join(out, f"b64_kvmem_{q}_r*.json")) for q in ("gguf", "none")}
    for q, runs in b64.items():
        if runs:
            print(f"  kvmem {q:<5} {spread([r['output_tokens_per_s'] for r in runs])}")
    if b64["gguf"] and b64["none"]:
        ratios = [g["output_tokens_per_s"] / n["output_tokens_per_s"] for g, n in zip(b64["gguf"], b64["none"])]
        print("  gguf / bf16 per round: " + ", ".join(f"{x:.2f}" for x in ratios))
    print("perplexity (same token ids, windows of 512):")
    for kind in ("Q4_1", "Q8_0", "Q4_0"):
        k, l = os.path.join(out, f"ppl_kvmem_{kind}.json"), os.path.join(out, f"ppl_llamacpp_{kind}.json")
        if os.path.exists(k) and os.path.exists(l):
            pk, pl = json.load(open(k))["perplexity"], json.load(open(l))["perplexity"]
            print(f"  {kind}: kvmem {pk:.4f}  llama.cpp {pl:.4f}  ({100 * (pk / pl - 1):+.2f} %)")
    k, l = os.path.join(out, "tokens_kvmem_Q8_0.json"), os.path.join(out, "tokens_llamacpp_Q8_0.json")
    if os.path.exists(k) and os.path.exists(l):
        print("Q8_0 greedy tokens, kvmem float32 vs llama.cpp (first differing position per prompt, of 64):")
        for a, b in zip(json.load(open(k))["output_ids"], json.load(open(l))["output_ids"]):
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
            print(f"  {'identical' if first is None else f'first difference at token {first}'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/quantized")
