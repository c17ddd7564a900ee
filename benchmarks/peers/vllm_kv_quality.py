"""vLLM's quantized KV cache on its CPU build, measured as benchmarks/kv_cache_dtype.py measures kvmem's:
greedy tokens of the same prompts and the perplexity of the same text, float32 model, per
kv_cache_dtype. Writes benchmarks/results/kv_cache_dtype/vllm_quality_<dtype>.json, or the error
vLLM gave where it refuses the dtype.

    VENV=/path/to/vllm-venv benchmarks/peers/run_vllm_kv_quality.sh --model /tmp/smollm2-hf --kv-cache-dtype fp8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from kv_cache_dtype import OUT, PROMPTS, TEXT  # noqa: E402  the same prompts, text and place


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import vllm
    from vllm import LLM, SamplingParams

    out_path = OUT / f"vllm_quality_{args.kv_cache_dtype}.json"
    result = {"engine": f"vllm {vllm.__version__}", "kv_cache_dtype": args.kv_cache_dtype, "model_dtype": "float32",
              "new_tokens": args.new_tokens, "prompts": PROMPTS, "text": TEXT.name}
    try:
        llm = LLM(model=args.model, dtype="float32", kv_cache_dtype=args.kv_cache_dtype, max_model_len=2048, seed=0,
                  max_num_batched_tokens=256, enable_prefix_caching=False)
    except Exception as e:  # refused: record what vLLM said
        result["error"] = f"{type(e).__name__}: {e}"[:2000]
        out_path.write_text(json.dumps(result, indent=2) + "\n")
        print(result["error"])
        return
    greedy = SamplingParams(temperature=0, max_tokens=args.new_tokens, min_tokens=args.new_tokens)
    outs = llm.generate(PROMPTS, greedy)
    tokenizer = llm.get_tokenizer()
    text_ids = tokenizer.encode(TEXT.read_text())
    scored = llm.generate([{"prompt_token_ids": text_ids}], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    logprobs = [entry[tok].logprob for tok, entry in zip(text_ids[1:], scored.prompt_logprobs[1:])]
    nll = -sum(logprobs) / len(logprobs)
    result.update(tokens=[list(o.outputs[0].token_ids) for o in outs], text_tokens=len(text_ids), nll=nll,
                  perplexity=math.exp(nll))
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(args.kv_cache_dtype, "perplexity", result["perplexity"])


if __name__ == "__main__":
    main()
