#!/usr/bin/env bash
# Where the 2 cores go while a server is saturated (issue 20's TTFT / throughput gap at --request-rate
# inf): per server, one phase under the machine's exclusive gate: start it (as in
# serving_vllm_client.sh), run vLLM's client (random 128 -> 128, NUM_PROMPTS at once), and record the
# CPU seconds of every process and thread of the server (benchmarks/peers/cpu_split.py) and of the
# client (/usr/bin/time). For kvmem also a py-spy profile of the server's Python threads (PYSPY, a
# py-spy binary; skipped when absent) during the run, sampled without stopping the process.
# Results: $OUT/<engine>_cpu.txt, <engine>_client_time.txt, <engine>.json (the client's result),
# kvmem_pyspy.txt (collapsed stacks), kvmem_threads.txt (py-spy dump: thread ids -> Python names).
#   usage: DTYPE=bfloat16 benchmarks/serving_cpu_split.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DTYPE="${DTYPE:-bfloat16}"
NUM_PROMPTS="${NUM_PROMPTS:-128}"
PY="${PY:-.venv/bin/python}"
VENV="${VENV:-/work/peers/vllm-venv}"
HF_MODEL="${HF_MODEL:-/work/peers/smollm2-hf}"
GATE="${GATE:-/work/cpu.gate}"
PYSPY="${PYSPY:-$(command -v py-spy || echo /tmp/pyspy-venv/bin/py-spy)}"
OUT="${OUT:-benchmarks/results/serving_saturated/cpu_split_$DTYPE}"
mkdir -p "$OUT"

source benchmarks/server_helpers.sh

phase() {  # engine
  local port; port="$(free_port)"
  if [ "$1" = kvmem ]; then
    "$PY" -m kvmem.cli serve --port "$port" --dtype "$DTYPE" --kv-cache-memory 2GiB --max-model-len 2048 \
      --log-level warning > "$OUT/kvmem_server.log" 2>&1 &
  else
    PORT="$port" DTYPE="$DTYPE" KV_GB=2 MAX_MODEL_LEN=2048 setsid benchmarks/peers/run_vllm_server.sh \
      > "$OUT/vllm_server.log" 2>&1 &
  fi
  local pid=$!
  wait_for_server "127.0.0.1:$port/health" "$pid" || true  # the run goes on either way, as it always did
  "$PY" benchmarks/peers/cpu_split.py snap "$pid" "$OUT/$1_before.json"
  /usr/bin/time -f "client: user %U s, system %S s, wall %e s" -o "$OUT/$1_client_time.txt" \
    "$VENV/bin/python" benchmarks/peers/vllm_bench_serve.py --backend openai --base-url "http://127.0.0.1:$port" \
    --endpoint /v1/completions --model SmolLM2-135M-Instruct --tokenizer "$HF_MODEL" --dataset-name random \
    --random-input-len 128 --random-output-len 128 --num-prompts "$NUM_PROMPTS" --request-rate inf --seed 1 \
    --ignore-eos --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,99 --save-result \
    --result-dir "$OUT" --result-filename "$1.json" > "$OUT/$1_client.log" 2>&1 &
  local client=$!
  if [ "$1" = kvmem ] && [ -x "$PYSPY" ]; then
    for _ in $(seq 1 120); do grep -q "Starting main benchmark run" "$OUT/$1_client.log" && break; sleep 0.5; done
    "$PYSPY" dump --pid "$pid" > "$OUT/kvmem_threads.txt" 2>&1 || true
    "$PYSPY" record --pid "$pid" --duration 15 --rate 50 --nonblocking --threads --idle --format raw \
      -o "$OUT/kvmem_pyspy.txt" > /dev/null 2>&1 || true
  fi
  wait "$client"
  "$PY" benchmarks/peers/cpu_split.py snap "$pid" "$OUT/$1_after.json"
  local wall; wall="$("$PY" -c "import json; print(json.load(open('$OUT/$1.json'))['duration'])")"
  "$PY" benchmarks/peers/cpu_split.py diff "$OUT/$1_before.json" "$OUT/$1_after.json" --wall "$wall" > "$OUT/$1_cpu.txt"
  kill -INT "$pid" 2> /dev/null || true
  wait "$pid" 2> /dev/null || true
  rm -f /dev/shm/__KMP_REGISTERED_LIB_* 2> /dev/null || true
}

export -f phase free_port wait_for_server
export DTYPE NUM_PROMPTS PY VENV HF_MODEL OUT PYSPY
for engine in kvmem vllm; do
  echo "== $engine $(date -u +%T)"
  flock -x -w 1800 "$GATE" bash -c "phase $engine"
done
