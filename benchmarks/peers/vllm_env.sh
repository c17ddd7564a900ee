# Sourced by run_vllm.sh and run_vllm_server.sh: vLLM's CPU tuning from its CPU guide — KV cache
# size, OpenMP threads bound to every core (this machine has 2), no reserved core, tcmalloc and
# Intel OpenMP preloaded, caches kept out of $HOME. Reads VENV / KV_GB / OMP_BIND if set.
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
export VLLM_CACHE_ROOT="${VLLM_CACHE_ROOT:-/work/peers/vllm-cache}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/work/peers/torchinductor-cache}"
export VLLM_CPU_OMP_THREADS_BIND="$OMP_BIND"
export VLLM_CPU_NUM_OF_RESERVED_CPU=0
export LD_PRELOAD="${preload# }"
