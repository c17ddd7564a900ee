"""The native CPU attention kernel alone, per stored KV format and context length: bf16 cache
(`decode_attention`) vs int8 / fp8 caches (`quantized_attention`), SmolLM2-135M's heads (9 query,
3 KV, head dim 64), paged blocks of 16, bf16 queries (a bf16 model).

    flock -x -w 1200 /work/cpu.gate python benchmarks/kv_attention_profile.py [--contexts 64,128,256,512,1024]

Two shapes per context length C:
- decode: 32 rows (sequences), each attending to C tokens;
- prefill: one prompt chunk of C rows, row i attending to tokens 0..i (the causal prefill of a
  C-token prompt, as the engine's first step runs it).
Formats alternate within every round (the machine is shared); medians and min-max of the rounds.
Writes benchmarks/results/kv_cache_dtype/attention_profile.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "kv_cache_dtype"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[64, 128, 256, 512, 1024])
    p.add_argument("--formats", type=lambda s: s.split(","), default=["bf16", "int8", "fp8_e4m3", "fp8_e5m2"])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=10, help="calls per timed sample")
    p.add_argument("--out", type=Path, default=OUT / "attention_profile.json")
    args = p.parse_args()

    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from kvmem.attention import cpu_kernels, kv_quant

    native = cpu_kernels.load()
    assert native is not None, "the native CPU kernels are not built"
    heads, kv_heads, dim, block, batch = 9, 3, 64, 16, 32
    dtypes = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
    torch.manual_seed(0)
    results = {}
    for ctx in args.contexts:
        for shape in ("decode", "prefill"):
            rows = batch if shape == "decode" else ctx
            blocks_per_row = -(-ctx // block)
            # keys/values with SmolLM2-like magnitudes (|K| up to ~20)
            full = torch.randn(2, kv_heads, batch * blocks_per_row, block, dim) * 4
            q = torch.randn(rows, heads, dim).bfloat16()
            if shape == "decode":
                tables = torch.arange(batch * blocks_per_row).view(batch, -1)
                lens = torch.full((batch,), ctx)
            else:
                tables = torch.arange(blocks_per_row).expand(ctx, -1).contiguous()
                lens = torch.arange(1, ctx + 1)
            calls = {}
            for fmt in args.formats:
                if fmt == "bf16":
                    k, v = full[0].bfloat16(), full[1].bfloat16()
                    calls[fmt] = lambda k=k, v=v: native.decode_attention(q, k, v, tables, lens, dim ** -0.5)
                else:
                    stored, scales = kv_quant.quantize(full, dtypes[fmt])
                    ks, vs = (None, None) if scales is None else (scales[0], scales[1])
                    calls[fmt] = lambda st=stored, ks=ks, vs=vs: cpu_kernels.quantized_attention(
                        q, st[0], st[1], ks, vs, tables, lens, dim ** -0.5)
            for f in calls.values():
                f()
            times = {fmt: [] for fmt in calls}
            for r in range(args.rounds):
                order = list(calls) if r % 2 == 0 else list(reversed(calls))
                for fmt in order:
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        calls[fmt]()
                    times[fmt].append((time.perf_counter() - start) / args.calls * 1e6)
            base = statistics.median(times[args.formats[0]])
            key = f"{shape}/{ctx}"
            results[key] = {fmt: {"us": t, "median_us": statistics.median(t), "vs_first": statistics.median(t) / base}
                            for fmt, t in times.items()}
            line = "  ".join(f"{fmt} {statistics.median(t):8.1f}us ({min(t):.0f}-{max(t):.0f}) {statistics.median(t) / base:.2f}x"
                             for fmt, t in times.items())
            print(f"{key:>14}: {line}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"shape": {"heads": heads, "kv_heads": kv_heads, "dim": dim, "block": block,
                                              "decode_batch": batch, "query_dtype": "bfloat16"},
                                    "threads": torch.get_num_threads(), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
