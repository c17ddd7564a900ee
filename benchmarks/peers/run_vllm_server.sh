#!/usr/bin/env bash
# Start vLLM's OpenAI-compatible server (vLLM CPU venv) with the same CPU tuning as run_vllm.sh:
# KV cache size, OpenMP threads bound to all cores, no reserved core, tcmalloc + Intel OpenMP preloaded.
#   usage: benchmarks/peers/run_vllm_server.sh [--model /work/peers/smollm2-hf] [extra api_server args]
# Serves the model as "SmolLM2-135M-Instruct" on 127.0.0.1:${PORT:-8100}; ready when
# `curl -s 127.0.0.1:$PORT/health` answers (start-up, with torch.compile, takes about a minute).
# Override VENV / MODEL / PORT / DTYPE / MAX_MODEL_LEN / OMP_BIND / KV_GB from the environment.
# Extra arguments go to vllm.entrypoints.openai.api_server (a later --model overrides MODEL).
set -euo pipefail
VENV="${VENV:-/work/peers/vllm-venv}"
MODEL="${MODEL:-/work/peers/smollm2-hf}"
PORT="${PORT:-8100}"
DTYPE="${DTYPE:-bfloat16}"
MAX_MODEL_LEN="${MAX_MODEL_LEN:-2048}"
KV_GB="${KV_GB:-2}"
OMP_BIND="${OMP_BIND:-0-$(( $(nproc) - 1 ))}"
TCMALLOC=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
IOMP="$VENV/lib/libiomp5.so"
preload=""
for lib in "$TCMALLOC" "$IOMP"; do
  if [[ -e "$lib" ]]; then preload="$preload $lib"; else echo "warning: $lib missing, not preloaded" >&2; fi
done
export VLLM_CPU_KVCACHE_SPACE="$KV_GB"
# keep vLLM's torch.compile / model-info caches out of $HOME
export VLLM_CACHE_ROOT="${VLLM_CACHE_ROOT:-/work/peers/vllm-cache}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/work/peers/torchinductor-cache}"
export VLLM_CPU_OMP_THREADS_BIND="$OMP_BIND"
export VLLM_CPU_NUM_OF_RESERVED_CPU=0
export LD_PRELOAD="${preload# }"
exec "$VENV/bin/python" -m vllm.entrypoints.openai.api_server \
  --model "$MODEL" --served-model-name SmolLM2-135M-Instruct \
  --host 127.0.0.1 --port "$PORT" --dtype "$DTYPE" --max-model-len "$MAX_MODEL_LEN" "$@"
