#!/usr/bin/env bash
# The multi-turn chat workload against kvmem's server with the prefix-cache tiers off, host memory,
# and host + disk; same model, KV budget and conversations; rounds alternate the three.
# Results: benchmarks/results/kv_offload/multi_turn_<tiers>_r<round>.json.
#   usage: benchmarks/kv_offload_multi_turn.sh   (ROUNDS=3 CONVERSATIONS=64 TURNS=6 USER_LEN=256 OUTPUT_LEN=64)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${ROUNDS:-3}"
CONVERSATIONS="${CONVERSATIONS:-64}"
TURNS="${TURNS:-6}"
USER_LEN="${USER_LEN:-256}"
OUTPUT_LEN="${OUTPUT_LEN:-64}"
BUDGET="${BUDGET:-256MiB}"
HOST_TIER="${HOST_TIER:-2GiB}"
DISK_HOST_TIER="${DISK_HOST_TIER:-256MiB}"  # host + disk: a small host tier, so that the disk serves too
PY="${PY:-.venv/bin/python}"
PORT=${PORT:-$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")}  # a free one
GATE=${GATE:-/work/cpu.gate}  # where it exists: each timed run holds it exclusively (other gated work waits)
OUT=benchmarks/results/kv_offload
mkdir -p "$OUT"
DISK_DIR="$(mktemp -d /tmp/kvmem-tier-XXXXXX)"
trap 'rm -rf "$DISK_DIR"' EXIT

locked() {  # wait for the gate as long as it takes (flock's own timeout: exit 75, try again)
  [ -e "$GATE" ] || { "$@"; return; }
  local rc=75; while [ $rc = 75 ]; do rc=0; flock -x -w 1200 -E 75 "$GATE" "$@" || rc=$?; done; return $rc
}

source benchmarks/server_helpers.sh

run() {  # tiers round -- server flags...
  local tiers=$1 round=$2; shift 3
  "$PY" -m kvmem serve --port "$PORT" --dtype bfloat16 --kv-cache-memory "$BUDGET" --log-level warning "$@" &
  local pid=$!
  wait_for_server "127.0.0.1:$PORT/health" "$pid"
  locked "$PY" -m kvmem bench serve --base-url "http://127.0.0.1:$PORT" --endpoint /v1/chat/completions \
    --dataset-name multi_turn --num-prompts "$CONVERSATIONS" --multi-turn-num-turns "$TURNS" \
    --multi-turn-user-len "$USER_LEN" --multi-turn-output-len "$OUTPUT_LEN" --seed "$round" \
    --metrics-url "http://127.0.0.1:$PORT" --label "kvmem tiers=$tiers" --no-plot --disable-tqdm \
    --json "$OUT/multi_turn_${tiers}_r${round}.json"
  kill -TERM "$pid"; wait "$pid" || true
}

for round in $(seq 1 "$ROUNDS"); do
  run off "$round" --
  run host "$round" -- --kv-offload-memory "$HOST_TIER"
  rm -rf "${DISK_DIR:?}"/*  # each round starts with an empty disk tier: no hits from the last round
  run host_disk "$round" -- --kv-offload-memory "$DISK_HOST_TIER" --kv-offload-dir "$DISK_DIR" \
    --kv-offload-disk-bytes 8GiB
done
"$PY" - "$OUT" <<'PY'
import glob, json, statistics, sys
out = sys.argv[1]
for tiers in ("off", "host", "host_disk"):
    runs = [json.load(open(p)) for p in sorted(glob.glob(f"{out}/multi_turn_{tiers}_r*.json"))]
    if not runs:
        continue
    def med(key):
        vals = [r[key] for r in runs if r.get(key) is not None]
        return f"{statistics.median(vals):.1f} ({min(vals):.1f}-{max(vals):.1f})" if vals else "n/a"
    print(f"{tiers:10s} rounds {len(runs)}  TTFT p50 {med('median_ttft_ms')} ms  p99 {med('p99_ttft_ms')} ms  "
          f"output tok/s {med('output_throughput')}  cached prompt tokens {med('total_cached_tokens')}  "
          f"of {med('total_input_tokens')}  failed {sum(r['failed'] for r in runs)}")
PY
