#!/usr/bin/env bash
# One-shot GPU check: build, GPU tests, a reduced benchmark grid and the memory frontier.
#
#   bash bench/gpu_check.sh OUTDIR
#
# For a machine with one CUDA GPU and no network (written for one H100, torch 2.11, triton 3.6,
# Python 3.12). Every step has its own time limit (`timeout`) inside an 8-minute total; a step
# that fails or times out is logged and the script goes on to the next one and the summary.
# Writes under OUTDIR: env.log, build.log, gpu_tests.log (+ .xml), bench.log + bench.json,
# frontier.log + frontier.json, report/ (report.md, PNGs if matplotlib is there), summary.txt.
# The benchmark runner rewrites bench.json after every case, so a cut-short run keeps its results.
set -u

if [ $# -lt 1 ]; then
    echo "usage: bash bench/gpu_check.sh OUTDIR" >&2
    exit 2
fi
OUT=$1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
PY=${PYTHON:-python}
# The source tree is importable even if the editable install fails.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

TOTAL=${GPU_CHECK_TOTAL_S:-470}   # all steps together, seconds (8 minutes minus a margin)
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

# step NAME LIMIT_S COMMAND...: run with a time limit (never past the total), log, record rc.
step() {
    local name=$1 limit=$2
    shift 2
    local now left
    now=$(date +%s)
    left=$((TOTAL - (now - START)))
    if [ "$left" -lt 10 ]; then
        printf '%-10s %-8s %6s  %s\n' "$name" "not run" "0" "total time spent" >> "$SUMMARY"
        echo "== $name: not run (total time spent)"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s): $*"
    local t0 rc status
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status=timeout ;;
        *) status="rc=$rc" ;;
    esac
    printf '%-10s %-8s %6s  %s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$OUT/$name.log" >> "$SUMMARY"
    tail -n 3 "$OUT/$name.log" | sed 's/^/   | /'
}

step env 20 bash -c "nvidia-smi; $PY -m bench.harness"
# On the project's GPU machine the default /opt/gcc g++ 13.3 builds an extension that
# segfaults when a TORCH_CHECK fails; gcc-12 builds a working one.
if command -v g++-12 >/dev/null 2>&1; then export CC=gcc-12 CXX=g++-12; fi
step build 140 $PY -m pip install -e . --no-build-isolation --no-deps
step gpu_tests 90 $PY -m pytest tests -m gpu -q -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml"
# The reduced grid: N = 16384, 131072; M = 4096, 256; C = 256; bf16 then fp32; the operations
# that carry the comparison (the loss forward for the cuBLAS line, forward+backward of both
# modes, the update). The backward-only cases are in the full grid.
step bench 120 $PY -m bench.run --grid gpu --device cuda --ops max-fwd,max-fwd_bwd,all-fwd_bwd,update --rounds 5 --warmup 2 --time-budget 95 --json "$OUT/bench.json"
step frontier 65 $PY -m bench.frontier --device cuda --budget-mib 1024 --M 1024,4096,16384 --dtype bf16 --tol 0.1 --time-budget 50 --json "$OUT/frontier.json"
step report 20 $PY -m bench.report "$OUT/bench.json" --out "$OUT/report" --print --print-ops max-fwd,max-fwd_bwd,all-fwd_bwd,update

{
    echo
    echo "GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1), $(( $(date +%s) - START )) s"
    printf '%-10s %-8s %6s  %s\n' step status seconds log
} > "$OUT/summary.head"
cat "$OUT/summary.head" "$SUMMARY" > "$OUT/summary.tmp" && mv "$OUT/summary.tmp" "$SUMMARY"
rm -f "$OUT/summary.head"
{
    if [ -f "$OUT/gpu_tests.log" ]; then
        echo
        echo "gpu tests: $(grep -E '(passed|failed|error)' "$OUT/gpu_tests.log" | tail -n 1)"
    fi
    if [ -f "$OUT/frontier.log" ]; then
        echo
        sed -n '/^ *M impl/,$p' "$OUT/frontier.log"
    fi
    if [ -f "$OUT/report.log" ]; then
        echo
        sed -n '/^op /,$p' "$OUT/report.log"
    fi
} >> "$SUMMARY"
cat "$SUMMARY"
