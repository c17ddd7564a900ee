#!/usr/bin/env bash
# kvmem with GGUF weights kept quantized (--quantization gguf) vs dequantized to bf16 vs llama.cpp
# (llama-cpp-python), same GGUF, same threads; alternating rounds. Results in $OUT (JSON per run).
#   usage: benchmarks/quantized_vs_llamacpp.sh [ROUNDS] [timing|quality|all]
# quality (perplexity, Q8_0 tokens) does not depend on the machine's speed: it holds the gate shared.
# Needs the llama.cpp venv (benchmarks/peers/README.md) and, for the Q8_0/Q4_0 rows, the requantized
# files in $MODELS (benchmarks/peers/requantize_gguf.py). Each run holds /work/cpu.gate exclusively
# where that lock exists (a shared machine: other sessions' tests wait meanwhile).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROUNDS="${1:-3}"
PART="${2:-all}"
PY="${PY:-python}"
THREADS="${THREADS:-2}"
OUT="${OUT:-$here/results/quantized}"
MODELS="${MODELS:-/work/peers/models}"
Q41="$($PY -c 'from kvmem.models.loader import default_model_path; print(default_model_path())')"
mkdir -p "$OUT"
gate() { if [[ -e /work/cpu.gate ]]; then flock "$LOCK" -w 1200 /work/cpu.gate "$@"; else "$@"; fi; }
peer() { gate "$here/peers/run_llamacpp.sh" "$@"; }
LOCK=-x
if [[ $PART != quality ]]; then

# 1. batch 1: 4 prompts x 128 random tokens -> 128, TTFT and decode tok/s
for r in $(seq 1 "$ROUNDS"); do
  peer batch1_decode.py --engine llamacpp --gguf "$Q41" --threads "$THREADS" --json "$OUT/b1_llamacpp_r$r.json" >/dev/null
  gate $PY "$here/peers/batch1_decode.py" --engine kvmem --quantization gguf --gguf "$Q41" --threads "$THREADS" \
    --json "$OUT/b1_kvmem_gguf_r$r.json" >/dev/null 2>&1
  gate $PY "$here/peers/batch1_decode.py" --engine kvmem --quantization none --gguf "$Q41" --threads "$THREADS" \
    --json "$OUT/b1_kvmem_bf16_r$r.json" >/dev/null 2>&1
done
# 2. batch 64: the random workload (64 x 128 -> 128), quantized vs bf16
for r in $(seq 1 "$ROUNDS"); do
  for q in gguf none; do
    gate $PY -m kvmem.cli bench throughput --quantization "$q" --num-threads "$THREADS" --kv-cache-memory 2GiB \
      --json "$OUT/b64_kvmem_${q}_r$r.json" >/dev/null 2>&1
  done
done
fi
LOCK=-s
if [[ $PART != timing ]]; then
# 3. perplexity of the fixed text, and 4. Q8_0 greedy tokens (float32 kvmem) vs llama.cpp
for kind in Q4_1 Q8_0 Q4_0; do
  f="$Q41"; [[ $kind != Q4_1 ]] && f="$MODELS/SmolLM2-135M-Instruct.$kind.gguf"
  [[ -f "$f" ]] || { echo "skip $kind: $f missing" >&2; continue; }
  gate $PY "$here/peers/perplexity.py" --engine kvmem --quantization gguf --gguf "$f" --threads "$THREADS" \
    --write-ids "$OUT/ppl_ids.json" --json "$OUT/ppl_kvmem_$kind.json" >/dev/null 2>&1
  peer perplexity.py --engine llamacpp --gguf "$f" --ids "$OUT/ppl_ids.json" --threads "$THREADS" \
    --json "$OUT/ppl_llamacpp_$kind.json" >/dev/null
done
f="$MODELS/SmolLM2-135M-Instruct.Q8_0.gguf"
if [[ -f "$f" ]]; then
  peer batch1_decode.py --engine llamacpp --gguf "$f" --threads "$THREADS" --num-prompts 4 --output-len 64 \
    --json "$OUT/tokens_llamacpp_Q8_0.json" >/dev/null
  gate $PY "$here/peers/batch1_decode.py" --engine kvmem --quantization gguf --dtype float32 --gguf "$f" \
    --threads "$THREADS" --num-prompts 4 --output-len 64 --json "$OUT/tokens_kvmem_Q8_0.json" >/dev/null 2>&1
fi
fi
$PY "$here/quantized_summary.py" "$OUT"
