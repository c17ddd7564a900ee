"""Decode attention on the CPU, one layer: the native kernel vs the torch gather path.

    .venv/bin/python benchmarks/decode_attention_cpu.py [--batch 64] [--context 170] [--threads 2]

SmolLM2's heads (9 query, 3 KV, dim 64), paged 16-token blocks laid out in order, bfloat16 and
float32; prints the median of 30 calls after a warm-up, and the largest difference between the two.
"""

import argparse
import statistics
import time

import torch

from kvmem.attention.cpu_kernels import decode_attention_kernel
from kvmem.attention.metadata import AttentionMetadata
from kvmem.attention.torch_attention import batched_attention


def median_ms(fn, repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=170)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    heads, kv_heads, dim, block = 9, 3, 64, 16
    per_seq = -(-args.context // block)
    tables = torch.arange(args.batch * per_seq).view(args.batch, per_seq)
    lens = torch.full((args.batch,), args.context)
    for dtype in (torch.bfloat16, torch.float32):
        k_cache = torch.randn(kv_heads, args.batch * per_seq, block, dim).to(dtype)
        v_cache = torch.randn_like(k_cache)
        q = torch.randn(args.batch, heads, dim).to(dtype)
        k_new = k_cache.view(kv_heads, -1, dim)[:, tables[:, 0] * block + args.context - 1].transpose(0, 1).clone()
        v_new = v_cache.view(kv_heads, -1, dim)[:, tables[:, 0] * block + args.context - 1].transpose(0, 1).clone()
        metas = {native: AttentionMetadata.build(tables.tolist(), [args.context - 1] * args.batch, [1] * args.batch,
                                                 block, torch.device("cpu"), native_kernel=native)
                 for native in (True, False)}
        outs = {n: batched_attention(q, k_new, v_new, k_cache, v_cache, m, dim ** -0.5) for n, m in metas.items()}
        times = {n: median_ms(lambda m=m: batched_attention(q, k_new, v_new, k_cache, v_cache, m, dim ** -0.5))
                 for n, m in metas.items()}
        print(f"{str(dtype).removeprefix('torch.'):>8}  native kernel {times[True]:.3f} ms   torch gather "
              f"{times[False]:.3f} ms   ({times[False] / times[True]:.2f}x)   max |diff| "
              f"{(outs[True].float() - outs[False].float()).abs().max().item():.2e}")


if __name__ == "__main__":
    if decode_attention_kernel() is None:
        raise SystemExit("the native kernel is not available here (see kvmem.attention.cpu_kernels)")
    main()
