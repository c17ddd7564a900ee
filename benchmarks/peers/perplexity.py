"""Perplexity of a fixed text under one engine, from one GGUF: kvmem (`--quantization gguf|none`,
prompt logprobs) or llama.cpp (llama-cpp-python, `logits_all=True`), on the very same token ids.

The text (default: benchmarks/texts/pride_and_prejudice_ch1.txt, Jane Austen, 1813, public domain)
is tokenized once by kvmem's tokenizer (`--write-ids`), and both engines read those ids (`--ids`),
cut into windows of `--window` tokens scored independently (each window's first token is context
only). Perplexity = exp(mean negative log-likelihood) over every scored token.

    python benchmarks/peers/perplexity.py --engine kvmem --quantization gguf --write-ids ids.json --json k.json
    benchmarks/peers/run_llamacpp.sh perplexity.py --engine llamacpp --ids ids.json --json l.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from batch1_decode import default_gguf  # noqa: E402


def windows(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i:i + size] for i in range(0, len(ids), size) if len(ids[i:i + size]) >= 2]


def nll_kvmem(args, ids) -> list[float]:
    from kvmem import LLM, SamplingParams

    llm = LLM(model=args.gguf, quantization=args.quantization, dtype=args.dtype, num_threads=args.threads,
              enable_prefix_caching=False, kv_cache_memory="256MiB", max_model_len=max(1024, args.window + 8))
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    out = []
    for w in windows(ids, args.window):
        result = llm.generate({"prompt_token_ids": w}, params, use_tqdm=False)[0]
        for tok, entry in zip(w[1:], result.prompt_logprobs[1:]):
            out.append(-entry[tok].logprob)
    llm.engine.close()
    return out


def nll_llamacpp(args, ids) -> list[float]:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=args.gguf, n_ctx=max(512, args.window), n_batch=max(512, args.window),
                n_threads=args.threads, n_threads_batch=args.threads, logits_all=True, verbose=False)
    out = []
    for w in windows(ids, args.window):
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[:len(w) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        out.extend((-logp[np.arange(len(w) - 1), w[1:]]).tolist())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=["kvmem", "llamacpp"], required=True)
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--quantization", default="gguf", help="kvmem only")
    ap.add_argument("--dtype", default="float32", help="kvmem only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", default=os.path.join(HERE, "..", "texts", "pride_and_prejudice_ch1.txt"))
    ap.add_argument("--ids", default=None, help="read the token ids from this JSON instead of tokenizing")
    ap.add_argument("--write-ids", default=None, help="kvmem only: write the text's token ids here")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.gguf = args.gguf or default_gguf()
    if args.ids:
        with open(args.ids) as f:
            ids = json.load(f)
    else:
        if args.engine != "kvmem":
            raise SystemExit("llamacpp reads --ids written by the kvmem run (the same token ids for both)")
        from kvmem.models.loader import load_model

        with open(args.text, encoding="utf-8") as f:
            ids = load_model(args.gguf).tokenizer.encode(f.read())
    if args.write_ids:
        with open(args.write_ids, "w") as f:
            json.dump(ids, f)
    nll = (nll_kvmem if args.engine == "kvmem" else nll_llamacpp)(args, ids)
    result = {"engine": args.engine, "gguf": os.path.abspath(args.gguf), "tokens": len(ids), "scored": len(nll),
              "window": args.window, "perplexity": math.exp(sum(nll) / len(nll)),
              **({"quantization": args.quantization, "dtype": args.dtype} if args.engine == "kvmem" else {})}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
