#!/bin/bash
# A fleet of 2 kvmem replicas (1 core each, the embedded SmolLM2-135M) behind vLLM's router:
# cache_aware vs round_robin on a multi-tenant workload, and the router hop's cost at batch 1.
#
# Both routers front the same two replicas (started once by `kvmem fleet`); each run uses its own
# seed, so its 16 tenants' system prompts are new to the replicas (what an earlier run cached is
# LRU leftovers to both policies alike). Rounds alternate the order of the policies. Every timed
# run holds the machine's CPU gate exclusively (other sessions' tests wait), one run per hold.
#
# Parts (PARTS, default all three): "poisson" 128 requests arriving at 2/s (Poisson), "saturated" the
# same workload with 16 requests always in flight (throughput = what the fleet can do), "hop" batch
# 1 through the router vs straight to a replica.
#
#   benchmarks/fleet_cache_aware.sh            # ROUNDS=3 OUT=benchmarks/results/fleet PARTS="poisson hop saturated"
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/results/fleet}
ROUNDS=${ROUNDS:-3}
GATE=${GATE:-/work/cpu.gate}
KV=${KV:-256MiB}   # per replica: ~11 of the 16 tenants' 1,000-token prompts (23,040 bytes a token)
RATE=${RATE:-2}
N=${N:-128}
PARTS=${PARTS:-poisson hop saturated}
mkdir -p "$OUT"
locked() {  # wait for the gate as long as it takes (flock's own timeout: exit 75, try again)
  [ -e "$GATE" ] || { "$@"; return; }
  local rc=75; while [ $rc = 75 ]; do rc=0; flock -x -w 1200 -E 75 "$GATE" "$@" || rc=$?; done; return $rc
}

$PY -m kvmem fleet --replicas 2 --policy cache_aware --port 8300 --replica-base-port 8301 \
    --router-metrics-port 0 -- --kv-cache-memory $KV --disable-log-requests --disable-log-stats \
    --log-level warning > "$OUT/fleet.log" 2>&1 &
FLEET=$!
trap 'kill -TERM $FLEET $RR 2>/dev/null; wait' EXIT
RR=
until grep -qs "fleet ready" "$OUT/fleet.log"; do kill -0 $FLEET || { cat "$OUT/fleet.log"; exit 1; }; sleep 1; done
$PY -m kvmem fleet --worker-urls http://127.0.0.1:8301 http://127.0.0.1:8302 --policy round_robin --port 8310 \
    --router-metrics-port 0 > "$OUT/fleet_rr.log" 2>&1 &
RR=$!
until grep -qs "fleet ready" "$OUT/fleet_rr.log"; do kill -0 $RR || { cat "$OUT/fleet_rr.log"; exit 1; }; sleep 1; done
declare -A PORT=([cache_aware]=8300 [round_robin]=8310)

tenants() {  # policy seed name [bench serve flags]
  local policy=$1 seed=$2 name=$3; shift 3
  locked $PY -m kvmem bench serve --base-url http://127.0.0.1:${PORT[$policy]} --dataset-name prefix_repetition \
      --prefix-repetition-num-prefixes 16 --prefix-repetition-prefix-len 1000 --prefix-repetition-suffix-len 32 \
      --prefix-repetition-output-len 16 --num-prompts $N --seed $seed --input-len 32 "$@" \
      --output-len 16 --metrics-url http://127.0.0.1:8301 http://127.0.0.1:8302 --label "$policy" --no-plot \
      --disable-tqdm --json "$OUT/${name}_${policy}_s$seed.json" > "$OUT/${name}_${policy}_s$seed.txt" 2>&1
}
hop() {  # target seed
  local url=http://127.0.0.1:8300; [ "$1" = direct ] && url=http://127.0.0.1:8301
  locked $PY -m kvmem bench serve --base-url $url --num-prompts 24 --max-concurrency 1 --input-len 64 \
      --output-len 16 --seed $2 --label "$1" --no-plot --disable-tqdm --json "$OUT/hop_$1_s$2.json" \
      > "$OUT/hop_$1_s$2.txt" 2>&1
}
for r in $(seq 1 $ROUNDS); do
  if [ $((r % 2)) = 1 ]; then order="cache_aware round_robin"; else order="round_robin cache_aware"; fi
  if [[ " $PARTS " = *" poisson "* ]]; then
    i=0; for p in $order; do tenants $p $((100 * r + i)) tenants --request-rate $RATE; i=$((i + 1)); done
  fi
  if [[ " $PARTS " = *" saturated "* ]]; then
    i=0; for p in $order; do tenants $p $((2000 + 100 * r + i)) saturated --max-concurrency 16; i=$((i + 1)); done
  fi
  if [[ " $PARTS " = *" hop "* ]]; then
    if [ $((r % 2)) = 1 ]; then order="router direct"; else order="direct router"; fi
    i=0; for t in $order; do hop $t $((1000 + 100 * r + i)); i=$((i + 1)); done
  fi
done
$PY benchmarks/fleet_summary.py "$OUT"
