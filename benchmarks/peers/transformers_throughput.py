"""Offline throughput of Hugging Face transformers ``generate`` on the shared workload.

Same workload and JSON keys as vllm_throughput.py (see bench_common.py): exactly ``output_len``
new tokens per prompt, greedy. All prompts have the same length, so they run as one batch with no
padding. One small warm-up generate, then the whole batch is timed.

Run it with the project venv: /work/main/.venv/bin/python
"""
from __future__ import annotations

import time

from bench_common import base_result, make_prompts, parse_args, timed, write_result


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    prompts = make_prompts(args.num_prompts, args.input_len, model.config.vocab_size, args.seed)
    ids = torch.tensor(prompts, dtype=torch.long)
    mask = torch.ones_like(ids)

    def run(input_ids, attention_mask, n):
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                              min_new_tokens=n, max_new_tokens=n, pad_token_id=model.config.eos_token_id)

    with torch.inference_mode():
        w = args.warmup_prompts
        t0 = time.perf_counter()
        run(ids[:w], mask[:w], args.warmup_tokens)
        warmup_s = time.perf_counter() - t0
        out, elapsed, contention, quiet = timed(lambda: run(ids, mask, args.output_len), args.wait_quiet_max)

    n_in = ids.numel()
    n_out = (out.shape[1] - args.input_len) * out.shape[0]
    if n_out != args.num_prompts * args.output_len:
        raise SystemExit(f"token counts off: out {n_out}")
    result = base_result("transformers", args, elapsed, warmup_s, n_in, n_out)
    result.update({
        "kv_cache_gb": None,
        "first_output_ids": out[0, args.input_len: args.input_len + 16].tolist(),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "attn_implementation": model.config._attn_implementation,
        "cpu_contention": contention,
        "wait_quiet": quiet,
    })
    write_result(result, args.json)


if __name__ == "__main__":
    main()
