#!/bin/bash
# A fleet of 2 kvmem replicas (1 core each, the embedded SmolLM2-135M) behind vLLM's router:
# cache_aware vs kv_aware vs round_robin on a multi-tenant workload, and the router hop's cost at
# batch 1.
#
# The routers front the same two replicas (started once by `kvmem fleet --policy kv_aware`, so they
# publish KV events; the other policies' routers are second fleets over them); each run uses its own
# seed, so its 16 tenants' system prompts are new to the replicas (what an earlier run cached is
# LRU leftovers to every policy alike). Rounds rotate the order of the policies. Every timed
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
POLICIES=${POLICIES:-cache_aware kv_aware round_robin}
mkdir -p "$OUT"
locked() {  # wait for the gate as long as it takes (flock's own timeout: exit 75, try again)
  [ -e "$GATE" ] || { "$@"; return; }
  local rc=75; while [ $rc = 75 ]; do rc=0; flock -x -w 1200 -E 75 "$GATE" "$@" || rc=$?; done; return $rc
}

$PY -m kvmem fleet --replicas 2 --policy kv_aware --port 8320 --replica-base-port 8301 \
    --router-metrics-port 0 -- --kv-cache-memory $KV --disable-log-requests --disable-log-stats \
    --log-level warning > "$OUT/fleet.log" 2>&1 &
FLEET=$!
ROUTERS=
trap 'kill -TERM $FLEET $ROUTERS 2>/dev/null; wait' EXIT
until grep -qs "fleet ready" "$OUT/fleet.log"; do kill -0 $FLEET || { cat "$OUT/fleet.log"; exit 1; }; sleep 1; done
declare -A PORT=([cache_aware]=8300 [kv_aware]=8320 [round_robin]=8310)
for policy in cache_aware round_robin; do
  $PY -m kvmem fleet --worker-urls http://127.0.0.1:8301 http://127.0.0.1:8302 --policy $policy \
      --port ${PORT[$policy]} --router-metrics-port 0 > "$OUT/fleet_$policy.log" 2>&1 &
  ROUTERS="$ROUTERS $!"
  until grep -qs "fleet ready" "$OUT/fleet_$policy.log"; do kill -0 $! || { cat "$OUT/fleet_$policy.log"; exit 1; }; sleep 1; done
done

tenants() {  # policy seed name [bench serve flags]
  local policy=$1 seed=$2 name=$3; shift 3
  locked $PY -m kvmem bench serve --base-url http://127.0.0.1:${PORT[$policy]} --dataset-name prefix_repetition \
      --prefix-repetition-num-prefixes 16 --prefix-repetition-prefix-len 1000 --prefix-repetition-suffix-len 32 \
      --prefix-repetition-output-len 16 --num-prompts $N --seed $seed --input-len 32 "$@" \
      --output-len 16 --metrics-url http://127.0.0.1:8301 http://127.0.0.1:8302 --label "$policy" --no-plot \
      --disable-tqdm --json "$OUT/${name}_${policy}_s$seed.json" > "$OUT/${name}_${policy}_s$seed.txt" 2>&1
}
hop() {  # target seed
  local url=http://127.0.0.1:${PORT[cache_aware]}; [ "$1" = direct ] && url=http://127.0.0.1:8301
  locked $PY -m kvmem bench serve --base-url $url --num-prompts 24 --max-concurrency 1 --input-len 64 \
      --output-len 16 --seed $2 --label "$1" --no-plot --disable-tqdm --json "$OUT/hop_$1_s$2.json" \
      > "$OUT/hop_$1_s$2.txt" 2>&1
}
rotate() {  # k words...: the words, the first k moved to the end
  local k=$1; shift; local a=("$@"); k=$((k % ${#a[@]})); echo "${a[@]:k} ${a[@]:0:k}"
}
for r in $(seq 1 $ROUNDS); do
  order=$(rotate $((r - 1)) $POLICIES)
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
