"""Per-layer time of the quantized-weight kernel (`quant_linear`) for each block type kvmem keeps, on
SmolLM2's down_proj shape (K = 1536, a whole number of 256-value super-blocks) and bf16 activations,
against oneDNN's packed bfloat16 GEMM. Random blocks (valid fp16 scales); first quartile of the calls, µs.

    PYTHONPATH=src python benchmarks/quant_types_micro.py --rows 1,64 [--shape 1536,576]
"""
import argparse
import sys

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from kvmem.models import gguf_blocks, quant_kernels
from kvmem.models.llama import OneDNNLinear
from quant_gemm_micro import bench  # the first quartile of timed calls, as that script reports

TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
_HALVES = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
           "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(rows: int, cols: int, name: str) -> np.ndarray:
    fmt = gguf_blocks.format_of(int(T[name]))
    rng = np.random.default_rng(0)
    n = cols // fmt.block_values
    raw = rng.integers(0, 256, (rows, n, fmt.block_bytes), dtype=np.uint8)
    for offset in _HALVES[name]:
        raw[..., offset:offset + 2] = (rng.standard_normal((rows, n)) * 1e-3).astype(np.float16).view(
            np.uint8).reshape(rows, n, 2)
    return raw.reshape(rows, -1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,64")
    ap.add_argument("--shape", default="1536,576", help="in_features,out_features")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mod = quant_kernels.load()
    if mod is None:
        sys.exit("the quantized-weight kernels are not built here")
    K, O = (int(v) for v in args.shape.split(","))
    rows = [int(r) for r in args.rows.split(",")]
    print(f"K={K} O={O} threads={args.threads}; µs per call (first quartile); quantized / oneDNN bf16")
    for name in TYPES:
        raw = random_blocks(O, K, name)
        q = torch.from_numpy(raw)
        lin = torch.nn.Linear(K, O, bias=False)
        lin.weight.data = torch.from_numpy(dequantize(raw, T[name]).reshape(O, K)).to(torch.bfloat16)
        dense = OneDNNLinear(lin)
        cells = []
        for n in rows:
            x = torch.randn(n, K).to(torch.bfloat16)
            a = bench(lambda: mod.quant_linear(x, q, int(T[name])), 200 if n == 1 else 30)
            b = bench(lambda: dense(x), 200 if n == 1 else 30)
            cells.append(f"{n} rows {a:7.1f} ({a / b:.2f})")
        bits = 8 * raw.shape[1] / K
        print(f"{name:5s} {bits:4.2f} bits/weight  " + "  ".join(cells))


if __name__ == "__main__":
    main()
