#!/bin/bash
# /dashboard's cost: bench serve against one server with no page open vs one SSE client reading /dashboard/events
cd "$(dirname "$0")/.."
mkdir -p "${OUT:-/tmp/dashboard_cost}"
PORT=8155
.venv/bin/kvmem serve --port $PORT --kv-cache-memory 1GiB --max-model-len 1024 --disable-log-requests --log-level warning > ${OUT:-/tmp/dashboard_cost}/serve.log 2>&1 &
SRV=$!
for i in $(seq 1 120); do curl -s 127.0.0.1:$PORT/health >/dev/null && break; sleep 1; done
.venv/bin/kvmem bench serve --base-url http://127.0.0.1:$PORT --num-prompts 32 --input-len 128 --output-len 64 \
    --vocab-size 49152 --seed 0 --num-warmups 1 > /dev/null 2>&1   # warm-up round, not counted
for r in 1 2 3 4; do
  if [ $((r % 2)) = 1 ]; then order="closed open"; else order="open closed"; fi
  for mode in $order; do
    if [ $mode = open ]; then curl -sN 127.0.0.1:$PORT/dashboard/events > ${OUT:-/tmp/dashboard_cost}/events_$r.txt & CURL=$!; sleep 1; fi
    .venv/bin/kvmem bench serve --base-url http://127.0.0.1:$PORT --num-prompts 32 --input-len 128 --output-len 64 \
        --vocab-size 49152 --seed 0 --num-warmups 1 --json ${OUT:-/tmp/dashboard_cost}/${mode}_r$r.json > /dev/null 2>&1
    if [ $mode = open ]; then kill $CURL; fi
    python3 -c "import json;d=json.load(open('${OUT:-/tmp/dashboard_cost}/${mode}_r$r.json'));print('$mode',$r,round(d['output_throughput'],1),round(d['median_ttft_ms'],1),round(d['median_tpot_ms'],2))"
  done
done
kill $SRV; wait $SRV 2>/dev/null
