#!/usr/bin/env bash
# Run vllm_throughput.py in the vLLM venv with the CPU tuning vLLM's CPU guide recommends
# (see vllm_env.sh).
#   usage: benchmarks/peers/run_vllm.sh --model /work/peers/smollm2-hf --dtype bfloat16 --json OUT.json
# Extra arguments go to vllm_throughput.py. Override VENV / OMP_BIND / KV_GB from the environment.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/vllm_env.sh"
exec "$VENV/bin/python" "$here/vllm_throughput.py" --kv-cache-gb "$KV_GB" "$@"
