#!/usr/bin/env bash
# Run vllm_kv_quality.py in the vLLM venv with the CPU tuning of vllm_env.sh (VENV, OMP_BIND, KV_GB).
#   usage: VENV=/path/to/vllm-venv benchmarks/peers/run_vllm_kv_quality.sh --model DIR --kv-cache-dtype fp8
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KV_GB="${KV_GB:-1}"
source "$here/vllm_env.sh"
exec "$VENV/bin/python" "$here/vllm_kv_quality.py" "$@"
