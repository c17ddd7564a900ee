"""Per-layer time of the quantized-weight kernel (`quant_linear`, bf16 activations) against oneDNN's
packed bfloat16 GEMM (`OneDNNLinear`, what kvmem uses without quantization), SmolLM2's shapes, random
weights quantized by the gguf package (Q4_1; the lm_head Q8_0). First quartile of the calls, in µs.

    PYTHONPATH=src python benchmarks/quant_gemm_micro.py [KERNEL.so] --rows 1,64,2048
(KERNEL.so: a built quant_matmul module to compare builds; default: this checkout's.)
"""
import argparse
import importlib.util
import sys
import time

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from kvmem.models.llama import OneDNNLinear

SHAPES = [(1536, 576, "down"), (576, 1536, "gate"), (576, 576, "q"), (576, 49152, "lm")]


def bench(f, reps):
    f(); f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 4] * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kernel", nargs="?", default=None)
    ap.add_argument("--rows", default="1,64,2048")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.kernel:
        spec = importlib.util.spec_from_file_location(args.kernel.split("/")[-1].split(".")[0], args.kernel)
        mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    else:
        from kvmem.models import quant_kernels
        mod = quant_kernels.load()
        if mod is None:
            sys.exit("the quantized-weight kernels are not built here")
    for K, O, name in SHAPES:
        w = np.random.default_rng(0).standard_normal((O, K)).astype(np.float32) * 0.05
        qt = T.Q8_0 if name == "lm" else T.Q4_1
        q = torch.from_numpy(quants.quantize(w, qt)).contiguous()
        lin = torch.nn.Linear(K, O, bias=False)
        lin.weight.data = torch.from_numpy(quants.dequantize(q.numpy(), qt)).to(torch.bfloat16)
        dense = OneDNNLinear(lin)
        for n in (int(r) for r in args.rows.split(",")):
            if name == "lm" and n > 64:
                continue
            x = torch.randn(n, K).to(torch.bfloat16)
            reps = 5 if n * O > 1e7 else 30
            a = bench(lambda: mod.quant_linear(x, q, int(qt)), reps)
            b = bench(lambda: dense(x), reps)
            print(f"{name:5s} K={K:5d} O={O:6d} rows={n:5d} quantized {a:9.0f} us  oneDNN {b:9.0f} us  "
                  f"ratio {a / b:5.2f}", flush=True)


if __name__ == "__main__":
    main()
