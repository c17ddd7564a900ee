#!/usr/bin/env bash
# Run a script of this folder with the llama.cpp venv (llama-cpp-python; setup in README.md).
#   usage: benchmarks/peers/run_llamacpp.sh [SCRIPT.py] --model FILE.gguf --threads 2 --json OUT.json
# SCRIPT defaults to llamacpp_throughput.py. Override VENV from the environment.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VENV:-/work/peers/llamacpp-venv}"
script="llamacpp_throughput.py"
if [[ "${1:-}" == *.py ]]; then script="$1"; shift; fi
exec "$VENV/bin/python" "$here/$script" "$@"
