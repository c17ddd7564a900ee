#!/usr/bin/env bash
# Alternated rounds of benchmarks/quantized_vs_llamacpp.sh's timing runs, all rounds of one part in
# one run of this script (meant to be wrapped in one `flock -x` hold of a shared machine's gate, so
# that the rounds see the same machine state instead of queueing minutes apart).
#   usage: benchmarks/quantized_rounds.sh b64|b1 [ROUNDS]     (results in $OUT, summary: quantized_summary.py)
#   b64: kvmem --quantization gguf vs none (bf16), random 64 x 128 -> 128;  b1: llama.cpp vs kvmem gguf, batch 1
#   GGUF=FILE: b1 on that file instead of the embedded Q4_1
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PART="$1"; ROUNDS="${2:-3}"
PY="${PY:-python}"; THREADS="${THREADS:-2}"; OUT="${OUT:-$here/results/quantized}"
Q41="$($PY -c 'from kvmem.models.loader import default_model_path; print(default_model_path())')"
Q41="${GGUF:-$Q41}"  # b1 on another GGUF (e.g. a K-quant file from peers/requantize_gguf.py)
mkdir -p "$OUT"
for r in $(seq 1 "$ROUNDS"); do
  if [[ $PART == b64 ]]; then
    for q in gguf none; do
      $PY -m kvmem.cli bench throughput --quantization "$q" --num-threads "$THREADS" --kv-cache-memory 2GiB \
        --json "$OUT/b64_kvmem_${q}_r$r.json" >/dev/null 2>&1 || echo "b64 $q round $r failed" >&2
    done
  else
    "$here/peers/run_llamacpp.sh" batch1_decode.py --engine llamacpp --gguf "$Q41" --threads "$THREADS" \
      --json "$OUT/b1_llamacpp_r$r.json" >/dev/null || echo "b1 llamacpp round $r failed" >&2
    $PY "$here/peers/batch1_decode.py" --engine kvmem --quantization gguf --gguf "$Q41" --threads "$THREADS" \
      --json "$OUT/b1_kvmem_gguf_r$r.json" >/dev/null 2>&1 || echo "b1 kvmem round $r failed" >&2
  fi
  echo "$PART round $r done $(date -u +%H:%M:%S)"
done
