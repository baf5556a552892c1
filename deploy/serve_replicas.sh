#!/usr/bin/env bash
# N engine servers on consecutive ports behind the router, on one machine:
#   make serve-replicas N=2                  # router on 127.0.0.1:8000, engines on 8001, 8002
#   deploy/serve_replicas.sh 2 -- --max-num-seqs 64    # extra args go to every engine
# Environment: PY (python, default .venv/bin/python), HOST (default 127.0.0.1), PORT (the
# router's, default 8000; engines take PORT+1..PORT+N), ROUTING (default least-loaded).
# Ctrl-C or SIGTERM stops the router and drains every engine.
set -euo pipefail

N="${1:-}"
shift || true
[ "${1:-}" = "--" ] && shift
PY="${PY:-.venv/bin/python}"
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-8000}"
ROUTING="${ROUTING:-least-loaded}"

if ! [[ "$N" =~ ^[1-9][0-9]*$ ]]; then
    echo "serve_replicas: N must be a positive integer (the number of engine replicas), got '$N'" >&2
    exit 2
fi
if ! [[ "$PORT" =~ ^[0-9]+$ ]] || [ "$PORT" -lt 1 ] || [ $((PORT + N)) -gt 65535 ]; then
    echo "serve_replicas: PORT must leave room for $N engine ports after it, got '$PORT'" >&2
    exit 2
fi
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('router') is None)"; then
    echo "serve_replicas: no 'router' package next to frontend/ (python -m router); cannot front the engines" >&2
    exit 2
fi

pids=()
stop() {
    trap - INT TERM EXIT
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait || true
}
trap stop INT TERM EXIT

backends=()
for i in $(seq 1 "$N"); do
    port=$((PORT + i))
    "$PY" -m frontend --host "$HOST" --port "$port" "$@" &
    pids+=("$!")
    backends+=("http://$HOST:$port")
done

# The router would find the engines without this wait (it health-checks its backends), but
# a ready line after every engine loaded is what a person at the terminal wants to see.
for url in "${backends[@]}"; do
    until "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/health', timeout=2)" "$url" 2>/dev/null; do
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null || { echo "serve_replicas: an engine exited during start-up" >&2; exit 1; }
        done
        sleep 1
    done
done

list=$(IFS=,; echo "${backends[*]}")
"$PY" -m router --backends "$list" --routing-logic "$ROUTING" --host "$HOST" --port "$PORT" &
pids+=("$!")
echo "serve_replicas: router on http://$HOST:$PORT in front of $list"
wait -n "${pids[@]}"
