#!/usr/bin/env bash
# Load-test `sun-edge serve` on this machine (loopback only): for each server, --max-batch 1 and 8,
# `sun-edge bench-serve` at concurrency 1, 4 and 8 with the image check on. Figures go to $OUT/*.json
# and one markdown table to stdout (docs/measurements.md, "Serving").
#   scripts/measure_serve.sh [SERVE ARGS...]      e.g. --bundle /tmp/pocket-onnx
set -euo pipefail
OUT=${OUT:-/tmp/sun-edge-serve-bench}
REQUESTS=${REQUESTS:-24}
PORT=${PORT:-7871}
THREADS=${THREADS:-1}  # torch threads with --model: OpenMP spin-waits crawl when other work shares the cores
mkdir -p "$OUT"
if [ $# -gt 0 ]; then tag=bundle; extra=(); else tag=pytorch; extra=(--threads "$THREADS"); fi
for batch in 1 8; do
    sun-edge serve --port "$PORT" --max-batch "$batch" --batch-window-ms 20 "${extra[@]}" "$@" > "$OUT/serve-$tag-b$batch.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 600); do
        curl -sf "http://127.0.0.1:$PORT/readyz" > /dev/null && break
        kill -0 "$pid" 2> /dev/null || { cat "$OUT/serve-$tag-b$batch.log"; exit 1; }
        sleep 0.5
    done
    sun-edge bench-serve --url "http://127.0.0.1:$PORT" --requests "$REQUESTS" --concurrency 1 4 8 --duration-s 600 \
        --check --json "$OUT/$tag-b$batch.json" || status=$?
    kill -TERM "$pid"; wait "$pid"
done
exit "${status:-0}"
