#!/usr/bin/env bash
# `kvmem bench serve` against kvmem's server and vLLM's CPU server, one server at a time, same
# machine, model weights, KV budget, workload and request rates. Results: benchmarks/results/serving/.
#   usage: benchmarks/serving_vs_vllm.sh            (ROUNDS=2 RATES="1 4" NUM_PROMPTS=64 by default)
#   batch-1 latency: MAX_CONCURRENCY=1 RATES=inf NUM_PROMPTS=16 benchmarks/serving_vs_vllm.sh
# Needs the vLLM venv and the exported model of benchmarks/peers/README.md (/work/peers/...).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${ROUNDS:-2}"
RATES="${RATES:-1 4}"
NUM_PROMPTS="${NUM_PROMPTS:-64}"
MAX_CONCURRENCY="${MAX_CONCURRENCY:-}"  # empty: no limit
DTYPE="${DTYPE:-bfloat16}"
OUT=benchmarks/results/serving
mkdir -p "$OUT"
KVMEM_PORT=8000
VLLM_PORT=8100

source benchmarks/server_helpers.sh

stop_server() {  # pid
  kill -INT "$1" 2> /dev/null || true
  wait "$1" 2> /dev/null || true
  rm -f /dev/shm/__KMP_REGISTERED_LIB_* 2> /dev/null || true  # left by vLLM's Intel OpenMP
}

bench() {  # label port rate round
  .venv/bin/kvmem bench serve --base-url "http://127.0.0.1:$2" --model SmolLM2-135M-Instruct \
    --num-prompts "$NUM_PROMPTS" --request-rate "$3" --input-len 128 --output-len 128 --vocab-size 49152 --seed 0 \
    ${MAX_CONCURRENCY:+--max-concurrency "$MAX_CONCURRENCY"} \
    --label "$1" --json "$OUT/${1}_rate${3}${MAX_CONCURRENCY:+_c$MAX_CONCURRENCY}_r${4}.json"
}

for round in $(seq 1 "$ROUNDS"); do
  .venv/bin/kvmem serve --port "$KVMEM_PORT" --dtype "$DTYPE" --kv-cache-memory 2GiB --max-model-len 2048 \
    --log-level warning &
  pid=$!
  wait_for_server "127.0.0.1:$KVMEM_PORT/health" "$pid"
  for rate in $RATES; do bench kvmem-paged "$KVMEM_PORT" "$rate" "$round"; done
  stop_server "$pid"

  PORT="$VLLM_PORT" DTYPE="$DTYPE" KV_GB=2 MAX_MODEL_LEN=2048 setsid benchmarks/peers/run_vllm_server.sh \
    > "/tmp/vllm-server-r$round.log" 2>&1 &
  pid=$!
  wait_for_server "127.0.0.1:$VLLM_PORT/health" "$pid"
  for rate in $RATES; do bench vllm-cpu "$VLLM_PORT" "$rate" "$round"; done
  stop_server "$pid"
done
