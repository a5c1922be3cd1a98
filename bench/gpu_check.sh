#!/usr/bin/env bash
# One-shot GPU check: build, GPU tests, compute-sanitizer, kernel resources, the benchmark grid
# of the fused backends' targets, the memory frontier, and a summary.
#
#   bash bench/gpu_check.sh OUTDIR
#
# For a machine with one CUDA GPU and no network (written for one H100 or H200, torch 2.11,
# triton 3.6, Python 3.12). Every step has its own time limit (`timeout`) inside a total of
# GPU_CHECK_TOTAL_S (default 470 s; 560 s with GPU_CHECK_EXTRA=1); a step that fails or times
# out is logged and the script goes on to the next one and the summary.
# Writes under OUTDIR: env.log, build.log, triton_tests.log and cuda_tests.log (+ .xml),
# sanitizer.log, racecheck.log, resources.log (+ .json), bench.log + bench.json, bench_cuda.log + bench_cuda.json,
# targets.log (+ .json, auto_rule.json), frontier.log + frontier.json, with GPU_CHECK_EXTRA=1
# also bench_graph and bench_tf32x3 (.log + .json) with their targets_graph and targets_tf32x3,
# autotune.log (+ .json), frontier_train.log (+ .json) and profile.log (Nsight Compute),
# report/ (report.md, PNGs if matplotlib is there), summary.txt. The benchmark runner rewrites
# bench.json after every case, so a cut-short run keeps its results. The device tool returns at
# most 8 files: pack OUTDIR into one archive, with an outer timeout that leaves time to pack it
# inside the call's limit (see bench/README.md).
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
# The GPU machine's PyTorch lives in its python3.
PY=${PYTHON:-$(command -v python3 || command -v python)}
# The source tree is importable even if the editable install fails.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# GPU_CHECK_EXTRA=1 adds, after every other step (for a 600-second call): graph-replay (device)
# timings, Triton's fp32 at tf32x3, compute-sanitizer, the autotune check, the training-step
# frontier and an Nsight Compute profile, in that order (the last may be cut short by the total);
# the other steps take the same time either way, inside 8 minutes.
EXTRA=${GPU_CHECK_EXTRA:-0}
if [ "$EXTRA" = 1 ]; then DEFAULT_TOTAL=560; else DEFAULT_TOTAL=470; fi
TOTAL=${GPU_CHECK_TOTAL_S:-$DEFAULT_TOTAL}   # all steps together, seconds
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

# GPU_CHECK_STEPS=build,triton_tests,... runs only the steps named (a rerun of what failed or
# changed); the default runs them all.
STEPS=${GPU_CHECK_STEPS:-}
RAN=" "  # the steps run by this invocation: the summary reads only their logs

# ran NAME: whether this invocation ran step NAME (OUTDIR may hold an earlier run's logs).
ran() { [[ "$RAN" == *" $1 "* ]]; }

# step NAME LIMIT_S COMMAND...: run with a time limit (never past the total), log, record rc.
step() {
    local name=$1 limit=$2
    shift 2
    if [ -n "$STEPS" ] && [[ ",$STEPS," != *",$name,"* ]]; then
        return
    fi
    local now left
    now=$(date +%s)
    left=$((TOTAL - (now - START)))
    if [ "$left" -lt 10 ]; then
        printf '%-14s %-8s %6s  %s\n' "$name" "not run" "0" "total time spent" >> "$SUMMARY"
        echo "== $name: not run (total time spent)"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    RAN="$RAN$name "
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
    printf '%-14s %-8s %6s  %s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$OUT/$name.log" >> "$SUMMARY"
    tail -n 3 "$OUT/$name.log" | sed 's/^/   | /'
}

step env 15 bash -c "nvidia-smi; $PY -m bench.harness; compute-sanitizer --version | tail -n 1; cuobjdump --version | tail -n 1"
# On the project's GPU machine the default /opt/gcc g++ 13.3 builds an extension that
# segfaults when a TORCH_CHECK fails; gcc-12 builds a working one.
if command -v g++-12 >/dev/null 2>&1; then export CC=gcc-12 CXX=g++-12; fi
# Build for this GPU only (half the nvcc time of the default sm_80 + sm_90).
ARCH=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
if [ -n "$ARCH" ]; then export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}; fi
export MAX_JOBS=${MAX_JOBS:-16}
step build 90 $PY -m pip install -e . --no-build-isolation --no-deps
# Without the compiled CUDA kernels the cuda_tests and bench_cuda steps skip every case and
# still read "ok": this step fails instead, so the summary says so.
step extension 10 $PY -c "from cossim_fast import _extension as e; print(e.describe()); assert e.has_cuda_kernels() and e.has_cosine_ops(), 'no CUDA kernels loaded: the CUDA tests and benchmarks below skip'"
# The Triton tests first and in their own processes: a fault in the CUDA kernels poisons the
# CUDA context of the process it happens in. Per-test limit where
# pytest-timeout is installed. The Triton tests run on CUDA tensors without a gpu marker.
# Triton compiles every kernel variant the tests reach, on the CPU: pytest-xdist spreads the
# tests over 8 processes where it is installed (80 of 104 tests took 90 s in one process).
PER_TEST=()
$PY -c "import pytest_timeout" 2>/dev/null && PER_TEST=(--timeout=60)
PARALLEL=()
$PY -c "import xdist" 2>/dev/null && PARALLEL=(-n 8)
step triton_tests 120 $PY -m pytest ${PARALLEL[@]+"${PARALLEL[@]}"} -q -p no:cacheprovider ${PER_TEST[@]+"${PER_TEST[@]}"} --junitxml="$OUT/triton_tests.xml" tests/triton
# (The CPU emulation of the CUDA kernels is CI's business: -k leaves it out here.)
step cuda_tests 80 $PY -m pytest ${PARALLEL[@]+"${PARALLEL[@]}"} -q -p no:cacheprovider ${PER_TEST[@]+"${PER_TEST[@]}"} --junitxml="$OUT/cuda_tests.xml" \
    -k "not emulated" tests/test_cuda_backend.py tests/test_gpu.py tests/test_extension.py tests/test_dispatch.py tests/test_errors.py
# Triton kernels as this triton compiles them (the CUDA kernels: same nvcc as at home, README).
step resources 30 $PY -m bench.resources --only triton --arch "$(echo "${ARCH:-9.0}" | tr -d .)" --json "$OUT/resources.json"
# bf16 before fp32 and C = 256 before 2048: a cut-short run keeps the most important cases.
# One memory limit on any card: the reference's N = 131072 cases (110 GB) would run on an H200
# (not on an H100) and take a third of the step's time without feeding any target.
export COSSIM_BENCH_MEMORY_LIMIT_GIB=${COSSIM_BENCH_MEMORY_LIMIT_GIB:-64}
# The CUDA backend in a second process, after the others (same reason as the tests).
# GPU_CHECK_BENCH_OPS narrows the operations (and COSSIM_BENCH_N/M/C/DTYPES the grid) of a rerun.
OPS=${GPU_CHECK_BENCH_OPS:-max-fwd,max-bwd,max-fwd_bwd,all-fwd_bwd,update}
step bench 70 $PY -m bench.run --grid gpu --device cuda --ops $OPS --impls reference,torch,triton,per_class,class_gemm --rounds 5 --warmup 2 --time-budget 60 --json "$OUT/bench.json"
step bench_cuda 40 $PY -m bench.run --grid gpu --device cuda --ops $OPS --impls cuda --rounds 5 --warmup 2 --time-budget 30 --json "$OUT/bench_cuda.json"
RESULTS=()
for results in "$OUT/bench.json" "$OUT/bench_cuda.json"; do
    [ -f "$results" ] && RESULTS+=("$results")
done
# The measured triton-vs-cuda rule goes to OUTDIR, not into the package: it is adopted (by rerunning
# bench.targets --write-rule on the returned JSON) only if the CUDA tests passed.
step targets 10 $PY -m bench.targets ${RESULTS[@]+"${RESULTS[@]}"} --json "$OUT/targets.json" --write-rule "$OUT/auto_rule.json"
step frontier 20 $PY -m bench.frontier --device cuda --budget-mib 1024 --M 4096 --dtype bf16 --tol 0.1 --time-budget 12 --json "$OUT/frontier.json"
step report 15 $PY -m bench.report ${RESULTS[@]+"${RESULTS[@]}"} --out "$OUT/report" --print --print-ops max-fwd,max-fwd_bwd,all-fwd_bwd,update

# The extras last: the core results above are complete whether or not they fit the time left.
if [ "$EXTRA" = 1 ]; then
    # Device time alone: CUDA graph replays of the bf16 forward, forward+backward and update, so
    # that host time (checks, dispatch, launches: the same at every N) is told apart from kernel
    # time, and the forward is held against cuBLAS on device time; its targets apart from the
    # eager ones (bench.targets keeps one row per case).
    step bench_graph 45 env COSSIM_BENCH_DTYPES=bf16 $PY -m bench.run --grid gpu --device cuda --timing graph \
        --ops max-fwd,max-fwd_bwd,update --impls triton,cuda,class_gemm --rounds 5 --warmup 2 --no-memory \
        --time-budget 35 --json "$OUT/bench_graph.json"
    step targets_graph 10 $PY -m bench.targets "$OUT/bench_graph.json" --json "$OUT/targets_graph.json"
    # The product question on fp32: Triton's fp32 dots at tf32x3 (three TF32 products, about fp32
    # accuracy) against the same baselines; the file's Triton rows replace the ieee ones.
    # The per-class baseline again here: the main bench step's time budget ends before its fp32
    # C = 2048 forward+backward cases. Each target row names the precision it was measured at.
    step bench_tf32x3 40 env COSSIM_FAST_TRITON_FP32_PRECISION=tf32x3 COSSIM_BENCH_DTYPES=fp32 $PY -m bench.run \
        --grid gpu --device cuda --ops max-fwd,max-fwd_bwd,all-fwd_bwd --impls triton,per_class --rounds 5 --warmup 2 \
        --no-memory --time-budget 30 --json "$OUT/bench_tf32x3.json"
    step targets_tf32x3 10 $PY -m bench.targets "$OUT/bench.json" "$OUT/bench_tf32x3.json" --dtypes fp32 \
        --json "$OUT/targets_tf32x3.json"
    # memcheck over the GPU tests of the CUDA forward and backward (odd shapes, tile tails, M
    # below a tile, ties, empty inputs, strided maps), without PyTorch's caching allocator so
    # that out-of-bounds accesses hit unallocated memory. By default the 16-bit ones, whose
    # kernels changed since the last memcheck (the fp32 and tf32 paths passed it on the H200,
    # 2026-11-27): all of them took 80 s there. GPU_CHECK_SANITIZER_K="not emulated" runs all.
    # (compute-sanitizer has refused the device on some of these machines: the log says so.)
    SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
    step sanitizer 70 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 9 \
        $PY -m pytest -q -p no:cacheprovider tests/test_cuda_backend.py -m gpu \
        -k "${GPU_CHECK_SANITIZER_K:-not emulated and (bf16 or fp16)}"
    # racecheck (shared-memory hazards) over the 16-bit forwards with 16-byte loads, the ones
    # that pipeline their operands through cp.async buffers: slow, so a few tests only.
    step racecheck 40 "$SANITIZER" --tool racecheck --racecheck-report hazard --error-exitcode 9 \
        $PY -m pytest -q -p no:cacheprovider tests/test_cuda_backend.py -m gpu \
        -k "${GPU_CHECK_RACECHECK_K:-not emulated and vector_loads and bf16 and forward_matches}"
    # The Triton forward's default tiles against autotuning (compiles every candidate: bf16 only).
    step autotune 60 $PY -m bench.autotune_check --dtype bf16 --json "$OUT/autotune.json"
    # The headline frontier: a training iteration of the UDA literature's model (ResNet-101
    # DeepLabv2, bf16 autocast) under an 8 GiB cap, at both ends of the dictionary sizes users run.
    step frontier_train 65 $PY -m bench.frontier --device cuda --step train --model deeplabv2_resnet101 \
        --budget-mib 8192 --M 1024,16384 --dtype bf16 --tol 0.1 --time-budget 55 --json "$OUT/frontier_train.json"
    # Nsight Compute over one bf16 max forward of each fused backend (N = 131072, C = 2048): where
    # their time goes (throughput, occupancy, warp stalls), for the next kernel work.
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
    step profile 45 env COSSIM_BENCH_N=131072 COSSIM_BENCH_M=4096 COSSIM_BENCH_C=2048 COSSIM_BENCH_DTYPES=bf16 \
        "${NCU:-ncu}" --target-processes all -k "regex:class_forward_kernel|_max_forward_kernel" -c 2 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
        $PY -m bench.run --grid gpu --device cuda --ops max-fwd --impls triton,cuda --rounds 1 --warmup 0 \
        --no-memory --json "$OUT/profile_bench.json"
fi

{
    echo
    echo "GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1), $(( $(date +%s) - START )) s"
    printf '%-14s %-8s %6s  %s\n' step status seconds log
} > "$OUT/summary.head"
cat "$OUT/summary.head" "$SUMMARY" > "$OUT/summary.tmp" && mv "$OUT/summary.tmp" "$SUMMARY"
rm -f "$OUT/summary.head"
{
    for tests in triton_tests cuda_tests; do
        if ran "$tests"; then
            echo "$tests: $(grep -E '(passed|failed|error)' "$OUT/$tests.log" | tail -n 1)"
        fi
    done
    for tool in sanitizer racecheck; do
        if ran "$tool"; then
            echo
            echo "compute-sanitizer $tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|passed|failed|not supported' "$OUT/$tool.log" | tail -n 2 | tr '\n' ' ')"
        fi
    done
    for targets in targets targets_graph targets_tf32x3; do
        if ran "$targets"; then
            echo
            echo "$targets:"
            cat "$OUT/$targets.log"
        fi
    done
    if ran autotune; then
        echo
        cat "$OUT/autotune.log"
    fi
    for frontier in frontier frontier_train; do
        if ran "$frontier"; then
            echo
            sed -n '/^ *M impl/,$p' "$OUT/$frontier.log"
        fi
    done
    if ran report; then
        echo
        sed -n '/^op /,$p' "$OUT/report.log"
    fi
} >> "$SUMMARY"
cat "$SUMMARY"
