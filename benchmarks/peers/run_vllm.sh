#!/usr/bin/env bash
# Run vllm_throughput.py in the vLLM venv with the CPU tuning vLLM's CPU guide recommends:
# KV cache size, OpenMP threads bound to cores 0-1 (this machine has 2), no reserved core,
# tcmalloc + Intel OpenMP preloaded.
#   usage: benchmarks/peers/run_vllm.sh --model /work/peers/smollm2-hf --dtype bfloat16 --json OUT.json
# Extra arguments go to vllm_throughput.py. Override VENV / OMP_BIND / KV_GB from the environment.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VENV:-/work/peers/vllm-venv}"
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
exec "$VENV/bin/python" "$here/vllm_throughput.py" --kv-cache-gb "$KV_GB" "$@"
