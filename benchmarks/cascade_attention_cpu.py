"""Cascade attention vs row-at-a-time in the native CPU kernel, at the `prefix` workload's decode
shape: ROWS rows sharing a 512-token prefix (paged blocks of 16) plus 32-96 own tokens each, SmolLM2's
heads (9 query, 3 KV, head dim 64). Prints ms per call (median of REPEATS) for each dtype.

    PYTHONPATH=src python benchmarks/cascade_attention_cpu.py [--rows 128] [--prefix 512] [--repeats 30]
"""

import argparse
import statistics
import time

import torch

from kvmem.attention import cpu_kernels
from kvmem.attention.cascade import find_cascade_groups


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--prefix", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    decode, cascade = cpu_kernels.decode_attention_kernel(), cpu_kernels.cascade_attention_kernel()
    g = torch.Generator().manual_seed(0)
    block, kv_heads, heads, dim = 16, 3, 9, 64
    shared = list(range(args.prefix // block))
    nxt = len(shared)
    tables, lens = [], []
    for i in range(args.rows):
        n = args.prefix + 32 + (i * 7) % 64
        own = -(-n // block) - len(shared)
        tables.append(shared + list(range(nxt, nxt + own)))
        nxt += own
        lens.append(n)
    width = max(map(len, tables))
    padded = torch.tensor([t + [t[0]] * (width - len(t)) for t in tables])
    lens_t = torch.tensor(lens)
    groups = find_cascade_groups(tables, block, [n - 1 for n in lens], [1] * args.rows, torch.device("cpu"))
    for dtype in (torch.bfloat16, torch.float32):
        kc = torch.randn(kv_heads, nxt, block, dim, generator=g).to(dtype)
        vc = torch.randn(kv_heads, nxt, block, dim, generator=g).to(dtype)
        q = torch.randn(args.rows, heads, dim, generator=g).to(dtype)
        runs = {"row at a time": lambda: decode(q, kc, vc, padded, lens_t, 0.125),
                "cascade": lambda: cascade(q, kc, vc, padded, lens_t, 0.125, groups.rows, groups.starts,
                                           groups.prefix_lens)}
        assert torch.equal(runs["row at a time"](), runs["cascade"]())
        times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():  # alternating
                t = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t) * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{str(dtype):15} " + "  ".join(f"{k}: {v:.3f} ms" for k, v in med.items())
              + f"  speed-up {med['row at a time'] / med['cascade']:.2f}x  (threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
