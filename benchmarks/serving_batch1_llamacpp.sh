#!/usr/bin/env bash
# Batch 1 through the servers (issue 20): kvmem's server (`kvmem serve --quantization gguf`) vs
# llama.cpp's OpenAI server (llama-cpp-python's `python -m llama_cpp.server`) on the same GGUF
# (default: the embedded SmolLM2-135M-Instruct Q4_1) with the same threads, driven by the same
# neutral client, vLLM's `vllm bench serve` (benchmarks/peers/vllm_bench_serve.py, vLLM venv), with
# --max-concurrency 1 on /v1/completions: random 128 -> 128, greedy (temperature 0), exactly 128
# output tokens. One server at a time, on a free port; the engines alternate (and swap which goes
# first) round by round; each server's phase is one hold of the machine's exclusive gate.
# Results: $OUT/<engine>_r<round>.json (vLLM's result files), llamacpp_perf_r<round>.txt (llama.cpp's
# own per-request timings from its server log) + logs; summary:
#   python benchmarks/serving_summary.py batch1 $OUT
#   usage: ROUNDS=4 benchmarks/serving_batch1_llamacpp.sh
#
# Sampling is spelled per engine, same meaning: kvmem takes vLLM's `ignore_eos` (the client's
# --ignore-eos) and `repetition_penalty` 1.0 (the client always sends it); llama-cpp-python's server
# ignores both fields, so it also gets `min_tokens` = the output length (its way to keep generating
# past EOS) and `repeat_penalty` 1.0 (its own name; its default 1.1 would not be greedy). kvmem
# rejects unknown fields with a 400, so those two go to llama.cpp only. llama.cpp runs with
# `logits_all` off (the server's default computes logits for every prompt position, which no
# request here asks for; off is what batch1_decode.py's `Llama` uses too).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${ROUNDS:-4}"
THREADS="${THREADS:-2}"
NUM_PROMPTS="${NUM_PROMPTS:-32}"
INPUT_LEN="${INPUT_LEN:-128}"
OUTPUT_LEN="${OUTPUT_LEN:-128}"
PY="${PY:-.venv/bin/python}"
VENV="${VENV:-/work/peers/vllm-venv}"
LLAMACPP_VENV="${LLAMACPP_VENV:-/work/peers/llamacpp-venv}"
HF_MODEL="${HF_MODEL:-/work/peers/smollm2-hf}"  # only the tokenizer, for the client's random prompts
GATE="${GATE:-/work/cpu.gate}"
OUT="${OUT:-benchmarks/results/serving_batch1_llamacpp}"
GGUF="${GGUF:-$("$PY" -c 'from kvmem.models.loader import default_model_path; print(default_model_path())')}"
mkdir -p "$OUT"

source benchmarks/server_helpers.sh

client() {  # engine round port
  local extra='{}'
  if [ "$1" = llamacpp ]; then extra="{\"min_tokens\": $OUTPUT_LEN, \"repeat_penalty\": 1.0}"; fi
  "$VENV/bin/python" benchmarks/peers/vllm_bench_serve.py --backend openai --base-url "http://127.0.0.1:$3" \
    --endpoint /v1/completions --model SmolLM2-135M-Instruct --tokenizer "$HF_MODEL" \
    --dataset-name random --random-input-len "$INPUT_LEN" --random-output-len "$OUTPUT_LEN" \
    --num-prompts "$NUM_PROMPTS" --max-concurrency 1 --request-rate inf --num-warmups 2 --seed "$2" \
    --temperature 0 --ignore-eos --extra-body "$extra" --percentile-metrics ttft,tpot,itl,e2el \
    --metric-percentiles 50,99 --no-request-id-header --save-result --save-detailed --result-dir "$OUT" --result-filename "${1}_r${2}.json" \
    > "$OUT/${1}_r${2}.log" 2>&1
}

phase() {  # engine round: start its server on a free port, run the client, stop it
  local port; port="$(free_port)"
  if [ "$1" = kvmem ]; then
    "$PY" -m kvmem.cli serve --model "$GGUF" --quantization gguf --num-threads "$THREADS" --port "$port" \
      --served-model-name SmolLM2-135M-Instruct --kv-cache-memory 2GiB --max-model-len 2048 \
      --log-level warning > "$OUT/kvmem_server_r$2.log" 2>&1 &
  else
    "$LLAMACPP_VENV/bin/python" -m llama_cpp.server --model "$GGUF" --model_alias SmolLM2-135M-Instruct \
      --n_threads "$THREADS" --n_threads_batch "$THREADS" --n_ctx 2048 --logits_all false \
      --host 127.0.0.1 --port "$port" > "$OUT/llamacpp_server_r$2.log" 2>&1 &
  fi
  local pid=$! rc=0
  wait_for_server "127.0.0.1:$port/v1/models" "$pid" && client "$1" "$2" "$port" || rc=$?
  kill -INT "$pid" 2> /dev/null || true
  wait "$pid" 2> /dev/null || true
  if [ "$1" = llamacpp ]; then  # llama.cpp's own timings per request (prompt eval, eval), kept in git
    grep -a llama_perf_context_print "$OUT/llamacpp_server_r$2.log" > "$OUT/llamacpp_perf_r$2.txt" || true
  fi
  return "$rc"
}

export -f phase client wait_for_server free_port
export THREADS NUM_PROMPTS INPUT_LEN OUTPUT_LEN PY VENV LLAMACPP_VENV HF_MODEL OUT GGUF
for round in $(seq 1 "$ROUNDS"); do
  engines=(kvmem llamacpp)
  if [ $((round % 2)) -eq 0 ]; then engines=(llamacpp kvmem); fi
  for engine in "${engines[@]}"; do
    echo "== round $round $engine $(date -u +%T)"
    flock -x -w 1800 "$GATE" bash -c "phase $engine $round"
  done
done
