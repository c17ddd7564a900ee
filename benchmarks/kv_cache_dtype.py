"""Quantized KV cache (`--kv-cache-dtype`): capacity, throughput and quality against bf16 / fp32 KV.

    python benchmarks/kv_cache_dtype.py memory      # kvmem bench memory per KV dtype (no model)
    python benchmarks/kv_cache_dtype.py capacity    # tokens per GiB of every strategy's manager, hybrid included
    python benchmarks/kv_cache_dtype.py throughput  # kvmem bench throughput per KV dtype, alternated rounds
    python benchmarks/kv_cache_dtype.py quality     # fp32 model: greedy agreement and perplexity per KV dtype
    python benchmarks/kv_cache_dtype.py table       # the markdown tables of docs/benchmarks.md

Every timed or model-running child runs under `flock -x -w 1200 /work/cpu.gate` when that gate exists
(the development machine is a shared 2-core box), one child per hold. Results: benchmarks/results/kv_cache_dtype/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "kv_cache_dtype"
GATE = Path("/work/cpu.gate")
DTYPES = ("auto", "int8", "fp8_e4m3", "fp8_e5m2")
TEXT = ROOT / "benchmarks" / "data" / "declaration_1776.txt"
PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,", "1, 2, 3, 4,",
    "The three primary colors are", "Water boils at a temperature of", "import numpy as np\n\ndef normalize(x):",
    "The French Revolution began in", "To make a cup of tea, first", "The largest planet in the solar system is",
    "SELECT name, age FROM users WHERE", "Photosynthesis is the process by which",
    "My favourite book is about a young wizard who", "In mathematics, a prime number is",
    "The quick brown fox", "Dear hiring manager, I am writing to apply for",
]


def gated(cmd: list[str]) -> list[str]:
    return ["flock", "-x", "-w", "1200", str(GATE), *cmd] if GATE.exists() else cmd


def run(cmd: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    print("+", " ".join(cmd), flush=True)
    subprocess.run(gated(cmd), check=True, env=env, cwd=ROOT)


# --- memory: the model-free simulation of kvmem bench memory ------------------------------------------
def cmd_memory(args) -> None:
    for dt in args.dtypes:
        run([sys.executable, "-m", "kvmem", "bench", "memory", "--num-requests", str(args.num_requests), "--budget",
             args.budget, "--skip-latency", "--skip-attention", "--no-progress", "--kv-cache-dtype", dt,
             "--json", str(OUT / f"memory_{dt}.json")])


# --- capacity: every strategy's manager at one budget ---------------------------------------------------
def cmd_capacity(args) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(ROOT))
    from tests.test_kv_cache_dtype import token_capacity  # the test's own measurement, one definition

    import torch

    from kvmem.attention.kv_quant import storage_dtype
    from kvmem.memory.base import KVCacheSpec

    budget = 2**30
    rows = {}
    for dt in args.dtypes:
        stored = storage_dtype(dt, torch.bfloat16)
        spec = KVCacheSpec(30, 3, 64, torch.bfloat16, torch.device("cpu"), None if dt == "auto" else stored)
        rows[dt] = {"bytes_per_token": spec.bytes_per_token,
                    **{name: token_capacity(name, spec, budget, max_num_seqs=8192) for name in ("static", "paged", "virtual", "hybrid")}}
    (OUT / "capacity.json").write_text(json.dumps({"budget_bytes": budget, "model": "SmolLM2-135M KV shape, bf16 model",
                                                   "tokens": rows}, indent=2) + "\n")
    print(json.dumps(rows, indent=2))


# --- throughput: kvmem bench throughput, alternated rounds ------------------------------------------------
def cmd_throughput(args) -> None:
    for budget in args.budgets:
        for r in range(args.rounds):
            order = list(args.dtypes) if r % 2 == 0 else list(reversed(args.dtypes))  # alternate who goes first
            for dt in order:
                run([sys.executable, "-m", "kvmem", "bench", "throughput", "--workload", "random", "--num-prompts",
                     str(args.num_prompts), "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                     "--kv-cache-memory", budget, "--kv-cache-dtype", dt, "--max-model-len", "512",
                     "--json", str(OUT / f"throughput__{budget}__{dt}__r{r}.json")])


# --- attention: the native decode kernel alone, per stored format --------------------------------------
def cmd_attention(args) -> None:
    """Decode attention of the native CPU kernel, batch 32 x 1,024 tokens of context, SmolLM2's heads
    (9 query, 3 KV, dim 64), paged blocks of 16: bf16 cache vs int8 / fp8 caches; rounds alternate the
    formats. Run it under the gate: `flock -x /work/cpu.gate python benchmarks/kv_cache_dtype.py attention`."""
    import time

    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from kvmem.attention import cpu_kernels, kv_quant

    torch.manual_seed(0)
    batch, heads, kv_heads, dim, block, ctx = 32, 9, 3, 64, 16, 1024
    full = torch.randn(2, kv_heads, batch * ctx // block, block, dim)
    q = torch.randn(batch, heads, dim).bfloat16()
    tables = torch.arange(batch * ctx // block).view(batch, -1)
    lens = torch.full((batch,), ctx)
    calls = {"auto (bf16)": lambda k=full[0].bfloat16(), v=full[1].bfloat16(): cpu_kernels.load().decode_attention(
        q, k, v, tables, lens, dim ** -0.5)}
    for name, dtype in (("int8", torch.int8), ("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)):
        stored, scales = kv_quant.quantize(full, dtype)
        ks, vs = (None, None) if scales is None else (scales[0], scales[1])
        calls[name] = lambda st=stored, ks=ks, vs=vs: cpu_kernels.quantized_attention(q, st[0], st[1], ks, vs, tables,
                                                                                     lens, dim ** -0.5)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for f in calls.values():
        f()  # warm-up
    for _ in range(args.rounds * 3):
        for name, f in calls.items():
            start = time.perf_counter()
            for _ in range(5):
                f()
            times[name].append((time.perf_counter() - start) / 5 * 1e3)
    base = statistics.median(times["auto (bf16)"])
    result = {name: {"ms": t, "median_ms": statistics.median(t), "vs_bf16": statistics.median(t) / base}
              for name, t in times.items()}
    (OUT / "attention.json").write_text(json.dumps(result, indent=2) + "\n")
    for name, r in result.items():
        print(f"{name}: {r['median_ms']:.2f} ms ({min(r['ms']):.2f}-{max(r['ms']):.2f}), {r['vs_bf16']:.2f}x bf16")


# --- quality: fp32 model, each KV dtype against fp32 KV ----------------------------------------------------
def cmd_quality(args) -> None:
    """Run in one process per KV dtype (children under the gate): greedy tokens of PROMPTS and the
    perplexity of TEXT."""
    for dt in args.dtypes:
        run([sys.executable, __file__, "quality-one", "--dtype-one", dt, "--new-tokens", str(args.new_tokens)])


def cmd_quality_one(args) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from kvmem import LLM, SamplingParams

    dt = args.dtype_one
    with LLM(dtype="float32", kv_cache_dtype=dt, kv_cache_memory="512MiB", max_model_len=2048,
             max_num_batched_tokens=256) as llm:  # chunked prefill: later chunks read the quantized cache
        greedy = SamplingParams(temperature=0, max_tokens=args.new_tokens, min_tokens=args.new_tokens)
        outs = llm.generate(PROMPTS, greedy, use_tqdm=False)
        tokens = [o.outputs[0].token_ids for o in outs]
        text_ids = llm.get_tokenizer().encode(TEXT.read_text())
        out = llm.generate([{"prompt_token_ids": text_ids}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                           use_tqdm=False)[0]
        logprobs = [entry[tok].logprob for tok, entry in zip(text_ids[1:], out.prompt_logprobs[1:])]
    nll = -sum(logprobs) / len(logprobs)
    (OUT / f"quality_{dt}.json").write_text(json.dumps(
        {"kv_cache_dtype": dt, "model_dtype": "float32", "new_tokens": args.new_tokens, "prompts": PROMPTS,
         "tokens": tokens, "text": TEXT.name, "text_tokens": len(text_ids), "nll": nll,
         "perplexity": math.exp(nll)}, indent=2) + "\n")
    print(dt, "perplexity", math.exp(nll))


# --- tables --------------------------------------------------------------------------------------------
def _load(name: str) -> dict | None:
    path = OUT / name
    return json.loads(path.read_text()) if path.exists() else None


def quality_row(dt: str, ref: dict, r: dict) -> str:
    """A table row: greedy tokens identical to `ref`'s before each prompt's first divergence, prompts
    identical throughout, perplexity and its ratio to `ref`'s."""
    same = total = whole = 0
    for a, b in zip(ref["tokens"], r["tokens"]):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        same, total, whole = same + n, total + len(a), whole + (n == len(a))
    return (f"| {dt} | {100 * same / total:.1f}% | {whole}/{len(ref['tokens'])} | {r['perplexity']:.3f} "
            f"| {r['perplexity'] / ref['perplexity']:.4f}x |")


def cmd_table(args) -> None:
    lines = []
    cap = _load("capacity.json")
    if cap:
        lines += ["Tokens a 1 GiB KV budget holds (SmolLM2-135M's KV shape, bf16 model; managers built by the "
                  "registry, sequences of up to 256 tokens; hybrid: 1 GiB device + 1 GiB host, KV only):", "",
                  "| kv_cache_dtype | bytes/token | static | paged | virtual | hybrid | paged vs auto |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        base = cap["tokens"]["auto"]["paged"]
        for dt, r in cap["tokens"].items():
            lines.append(f"| {dt} | {r['bytes_per_token']:,} | {r['static']:,} | {r['paged']:,} | {r['virtual']:,} | "
                         f"{r['hybrid']:,} | {r['paged'] / base:.2f}x |")
        lines.append("")
    att = _load("attention.json")
    if att:
        lines += ["Decode attention in the native CPU kernel alone (batch 32 x 1,024 tokens, SmolLM2's heads, "
                  "paged blocks of 16; 5 calls per sample, formats alternating):", "",
                  "| stored as | ms per call, median (min-max) | vs bf16 |", "|---|---:|---:|"]
        for name, r in att.items():
            lines.append(f"| {name} | {r['median_ms']:.2f} ({min(r['ms']):.2f}-{max(r['ms']):.2f}) | {r['vs_bf16']:.2f}x |")
        lines.append("")
    mem = {dt: _load(f"memory_{dt}.json") for dt in DTYPES}
    if any(mem.values()):
        first = next(m for m in mem.values() if m)
        s = first["settings"]
        lines += [f"`kvmem bench memory --num-requests {s['stream']['num_requests']} --budget "
                  f"{s['sim']['budget_bytes'] // 2**20}MiB --kv-cache-dtype D` (no model; same request stream):", "",
                  "| kv_cache_dtype | strategy | tokens/GiB | steps | preemptions | peak running | mean running "
                  "(saturated) | waste/alloc |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for dt, m in mem.items():
            if not m:
                continue
            per_gib = 2**30 // m["settings"]["bytes_per_token"]
            for name, r in m["strategies"].items():
                sat = "-" if r["mean_running_saturated"] is None else f"{r['mean_running_saturated']:.1f}"
                lines.append(f"| {dt} | {name} | {per_gib:,} | {r['steps']} | {r['preemptions']} | {r['peak_running']} "
                             f"| {sat} | {100 * r['waste_vs_allocated']:.1f}% |")
        lines.append("")
    runs: dict[tuple[str, str], list[dict]] = {}
    for path in sorted(OUT.glob("throughput__*.json")):
        _, budget, dt, _ = path.stem.split("__")
        runs.setdefault((budget, dt), []).append(json.loads(path.read_text()))
    if runs:
        lines += ["`kvmem bench throughput --workload random` per KV dtype (SmolLM2-135M, paged), rounds alternated, "
                  "each run alone under an exclusive lock of the shared 2-core machine:", "",
                  "| budget | kv_cache_dtype | rounds | output tok/s median (min-max) | vs auto | preemptions |",
                  "|---|---|---:|---:|---:|---:|"]
        for budget in sorted({b for b, _ in runs}):
            base = statistics.median(r["output_tokens_per_s"] for r in runs.get((budget, "auto"), [{"output_tokens_per_s": math.nan}]))
            for dt in DTYPES:
                rs = runs.get((budget, dt))
                if not rs:
                    continue
                tps = [r["output_tokens_per_s"] for r in rs]
                pre = sorted({r["settings"]["num_preemptions"] for r in rs})
                lines.append(f"| {budget} | {dt} | {len(rs)} | {statistics.median(tps):.1f} ({min(tps):.1f}-{max(tps):.1f}) "
                             f"| {statistics.median(tps) / base:.2f}x | {', '.join(map(str, pre))} |")
        lines.append("")
    q = {dt: _load(f"quality_{dt}.json") for dt in DTYPES}
    if q.get("auto"):
        ref = q["auto"]
        lines += [f"Quality, float32 model, against float32 KV (`auto`): {len(ref['prompts'])} prompts x "
                  f"{ref['new_tokens']} greedy tokens; perplexity of {ref['text']} ({ref['text_tokens']} tokens, "
                  "prefilled in chunks of 256 so later chunks read the quantized cache):", "",
                  "| kv_cache_dtype | tokens identical before the first divergence | prompts identical throughout "
                  "| perplexity | vs auto |", "|---|---:|---:|---:|---:|"]
        for dt, r in q.items():
            if not r:
                continue
            lines.append(quality_row(dt, ref, r))
        lines.append("")
    v = {dt: _load(f"vllm_quality_{dt}.json") for dt in ("auto", "fp8", "fp8_e5m2")}
    if v.get("auto") and "tokens" in v["auto"]:
        ref = v["auto"]
        lines += [f"The same for {ref['engine']} (CPU build, same weights exported to a HF directory, its own "
                  "tokenizer; against its own float32 KV):", "",
                  "| kv_cache_dtype | tokens identical before the first divergence | prompts identical throughout "
                  "| perplexity | vs auto |", "|---|---:|---:|---:|---:|"]
        for dt, r in v.items():
            if not r:
                continue
            if "error" in r:
                lines.append(f"| {dt} | refused: {r['error'][:120]} | | | |")
                continue
            lines.append(quality_row(dt, ref, r))
        if q.get("auto"):
            same = sum(a == b for a, b in zip(ref["tokens"], q["auto"]["tokens"]))
            lines.append(f"\n(vLLM float32 KV vs kvmem float32 KV: {same}/{len(ref['tokens'])} prompts give identical "
                         "greedy tokens.)")
        lines.append("")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["memory", "capacity", "attention", "throughput", "quality", "quality-one",
                                    "table"])
    p.add_argument("--dtypes", type=lambda s: tuple(s.split(",")), default=DTYPES)
    p.add_argument("--dtype-one", default="auto")
    p.add_argument("--num-requests", type=int, default=300)
    p.add_argument("--budget", default="256MiB")
    p.add_argument("--budgets", type=lambda s: tuple(s.split(",")), default=("64MiB", "512MiB"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    {"memory": cmd_memory, "capacity": cmd_capacity, "attention": cmd_attention, "throughput": cmd_throughput,
     "quality": cmd_quality,
     "quality-one": cmd_quality_one, "table": cmd_table}[args.what](args)


if __name__ == "__main__":
    main()
