"""One decoder layer's GEMMs on the CPU: `F.linear` vs the oneDNN-packed weights kvmem uses.

    .venv/bin/python benchmarks/linear_cpu.py [--rows 1 8 64 512 2048]

SmolLM2-135M's shapes (q,k,v 576->960, o 576->576, gate,up 576->3072, down 1536->576) and its
lm_head (576->49152); median microseconds of 30 calls after a warm-up, per dtype and row count.
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from decode_attention_cpu import median_ms  # this directory: the same median of 30 timed calls
from kvmem.models.llama import OneDNNLinear

LAYER = [(576, 960), (576, 576), (576, 3072), (1536, 576)]
LM_HEAD = (576, 49152)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 512, 2048])
    args = ap.parse_args()
    print(f"{'dtype':>9} {'rows':>5} {'layer F.linear':>15} {'layer packed':>13} {'lm_head F.linear':>17} "
          f"{'lm_head packed':>15}  (us)")
    for dtype in (torch.bfloat16, torch.float32):
        if not OneDNNLinear.available(dtype):
            continue
        for rows in args.rows:
            totals = {"plain": 0.0, "packed": 0.0}
            head = {}
            for shapes in LAYER + [LM_HEAD]:
                linear = nn.Linear(*shapes, bias=False).to(dtype)
                packed = OneDNNLinear(linear)
                x = torch.randn(rows, shapes[0]).to(dtype)
                plain_us = median_ms(lambda: F.linear(x, linear.weight)) * 1e3
                packed_us = median_ms(lambda: packed(x)) * 1e3
                if shapes == LM_HEAD:
                    head = {"plain": plain_us, "packed": packed_us}
                else:
                    totals["plain"] += plain_us
                    totals["packed"] += packed_us
            print(f"{str(dtype).removeprefix('torch.'):>9} {rows:>5} {totals['plain']:>15.0f} {totals['packed']:>13.0f} "
                  f"{head['plain']:>17.0f} {head['packed']:>15.0f}")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
