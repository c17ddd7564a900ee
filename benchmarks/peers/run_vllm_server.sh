#!/usr/bin/env bash
# Start vLLM's OpenAI-compatible server (vLLM CPU venv) with the same CPU tuning as run_vllm.sh
# (see vllm_env.sh).
#   usage: benchmarks/peers/run_vllm_server.sh [extra api_server args]
# Serves the model as "SmolLM2-135M-Instruct" on 127.0.0.1:${PORT:-8100}; ready when
# `curl -s 127.0.0.1:$PORT/health` answers (start-up, with torch.compile, takes 1-2 minutes).
# Override VENV / MODEL / PORT / DTYPE / MAX_MODEL_LEN / OMP_BIND / KV_GB from the environment.
# Extra arguments go to vllm.entrypoints.openai.api_server (a later --model overrides MODEL).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/vllm_env.sh"
MODEL="${MODEL:-/work/peers/smollm2-hf}"
exec "$VENV/bin/python" -m vllm.entrypoints.openai.api_server \
  --model "$MODEL" --served-model-name SmolLM2-135M-Instruct \
  --host 127.0.0.1 --port "${PORT:-8100}" --dtype "${DTYPE:-bfloat16}" --max-model-len "${MAX_MODEL_LEN:-2048}" "$@"
