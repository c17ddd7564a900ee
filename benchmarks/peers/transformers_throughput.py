"""Offline throughput of Hugging Face transformers ``generate`` on the shared workload.

Same workload and JSON keys as vllm_throughput.py (kvmem/bench/workloads.py): each request gets
exactly its output length, greedy. A workload whose requests all have one shape runs as one batch
with no padding. Otherwise requests are sorted by prompt length and run in batches of
``--batch-size``, left-padded, each batch generating its longest output; only the tokens each
request asked for are counted (the rest is the padding waste that static batching pays).
One small warm-up generate, then the whole workload is timed.

Run it with the project venv: /work/main/.venv/bin/python
"""
from __future__ import annotations

import argparse
import sys
import time

from bench_common import base_result, load_workload, parse_args, timed, write_result


def main() -> None:
    sys.argv, extra = _split_batch_size(sys.argv)
    args = parse_args(__doc__.splitlines()[0])
    batch_size = extra.batch_size

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    w = load_workload(args, model.config.vocab_size)
    pad = model.config.eos_token_id if model.config.pad_token_id is None else model.config.pad_token_id
    pad = pad[0] if isinstance(pad, list) else pad

    def generate(rows: list[int], n: int):
        width = max(len(w.prompts[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(rows):  # left padding: every prompt ends at the last column
            p = w.prompts[i]
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, min_new_tokens=n,
                             max_new_tokens=n, pad_token_id=pad)
        return out[:, width:]

    uniform = len({len(p) for p in w.prompts}) == 1 and len(set(w.output_lens)) == 1
    order = sorted(range(len(w.prompts)), key=lambda i: len(w.prompts[i]))
    batches = [order] if uniform else [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

    def run():
        firsts, generated = {}, 0
        for rows in batches:
            new = generate(rows, max(w.output_lens[i] for i in rows))
            generated += new.numel()
            for r, i in enumerate(rows):
                firsts[i] = new[r, :16].tolist()
        return firsts, generated

    with torch.inference_mode():
        t0 = time.perf_counter()
        generate(list(range(min(args.warmup_prompts, len(w.prompts)))), args.warmup_tokens)
        warmup_s = time.perf_counter() - t0
        (firsts, generated), elapsed, contention, quiet = timed(run, args.wait_quiet_max)

    n_out = w.num_output_tokens  # generate() produced exactly max_new_tokens per row, all counted rows included
    result = base_result("transformers", args, w, elapsed, warmup_s, n_out)
    result.update({
        "kv_cache_gb": None,
        "batching": "one batch" if uniform else f"sorted by prompt length, batches of {batch_size}, left-padded",
        "generated_tokens_including_padding_waste": generated,
        "first_output_ids": firsts[0],
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "attn_implementation": model.config._attn_implementation,
        "cpu_contention": contention,
        "wait_quiet": quiet,
    })
    write_result(result, args.json)


def _split_batch_size(argv: list[str]) -> tuple[list[str], argparse.Namespace]:
    """--batch-size is this script's own; the rest is bench_common's shared command line."""
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--batch-size", type=int, default=64)
    extra, rest = ap.parse_known_args(argv[1:])
    return [argv[0], *rest], extra


if __name__ == "__main__":
    main()
