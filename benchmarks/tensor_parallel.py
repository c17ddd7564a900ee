"""Tensor parallelism: TP = N vs TP = 1 throughput (`kvmem bench throughput`, alternating rounds) and
the KV capacity each rank gets from the same per-rank budget.

    python benchmarks/tensor_parallel.py --tp 2 --rounds 3 --lock /work/cpu.gate      # CPU (gloo)
    python benchmarks/tensor_parallel.py --tp 2 --model org/name --device cuda         # GPUs (NCCL)

Without --model it builds (once, under --model-dir) a random-weight Llama shaped like SmolLM2-135M
but with 8 heads of 64 (4 KV heads) instead of 9, so that 2 ranks divide it: 30 layers, hidden 512,
MLP 1536, SmolLM2's tokenizer and 49,152-token vocabulary (random weights: the timing does not
depend on them; the runs use ignore_eos). `--lock FILE` takes `flock -x FILE` around each run only,
so that a shared machine's other work waits for one run at a time, never for the whole benchmark.
Prints one line per run and a summary (medians, min-max of the per-round ratios); --json saves all.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def build_model(directory: Path) -> Path:
    if (directory / "config.json").exists():
        return directory
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kvmem.models.loader import default_model_path

    gguf = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(vocab_size=49152, hidden_size=512, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=True, rope_theta=100000.0, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def run_once(model: str, tp: int, args: argparse.Namespace, out: Path) -> dict:
    # With start-up progress on stderr: its "KV cache: ..." line gives the engine's own capacity figure.
    cli = "import sys; from kvmem.progress import show_progress; from kvmem.cli import main; show_progress(); " \
          "sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", cli, "bench", "throughput", "--model", model, "--tensor-parallel-size", str(tp),
           "--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len),
           "--output-len", str(args.output_len), "--kv-cache-memory", args.kv_cache_memory,
           "--max-model-len", str(args.input_len + args.output_len), "--json", str(out), *args.extra]
    if args.lock:
        cmd = ["flock", "-x", "-w", "1200", args.lock, *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"run failed ({' '.join(cmd)}):\n{done.stdout}\n{done.stderr}")
    result = json.loads(out.read_text())
    # The engine's start-up line: "KV cache: paged, 256.0 MiB for 43,690 tokens (6,144 bytes each); ..."
    m = re.search(r"KV cache: \w+, .*? for ([\d,]+) tokens \(([\d,]+) bytes each\)", done.stderr + done.stdout)
    if m:
        result["kv_tokens"] = int(m.group(1).replace(",", ""))
        result["kv_bytes_per_token_per_rank"] = int(m.group(2).replace(",", ""))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default=None, help="default: the random 8-head SmolLM2-shaped model")
    p.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "kvmem-tp-bench-model"))
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--kv-cache-memory", default="256MiB", help="per rank")
    p.add_argument("--lock", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("extra", nargs="*", help="more `kvmem bench throughput` flags, after --")
    args = p.parse_args()
    model = args.model or str(build_model(Path(args.model_dir)))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = (1, args.tp) if r % 2 == 0 else (args.tp, 1)  # alternate who goes first
            for tp in order:
                res = run_once(model, tp, args, Path(tmp) / f"r{r}_tp{tp}.json")
                res.update(round=r, tp=tp)
                runs.append(res)
                print(f"round {r} tp {tp}: {res['output_tokens_per_s']:.1f} output tok/s, "
                      f"KV {res.get('kv_tokens', '?')} tokens", flush=True)
    by = {tp: [x for x in runs if x["tp"] == tp] for tp in (1, args.tp)}
    ratios = [next(x for x in by[args.tp] if x["round"] == r)["output_tokens_per_s"]
              / next(x for x in by[1] if x["round"] == r)["output_tokens_per_s"] for r in range(args.rounds)]
    summary = {"tp": args.tp, "model": model, "rounds": args.rounds,
               "median_output_tok_s": {tp: statistics.median(x["output_tokens_per_s"] for x in by[tp]) for tp in by},
               "speed_ratio_median": statistics.median(ratios), "speed_ratio_min": min(ratios),
               "speed_ratio_max": max(ratios),
               "kv_tokens": {tp: by[tp][0].get("kv_tokens") for tp in by},
               "kv_bytes_per_token_per_rank": {tp: by[tp][0].get("kv_bytes_per_token_per_rank") for tp in by}}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": runs}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
