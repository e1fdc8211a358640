#!/usr/bin/env bash
# The GPU check (issue 25): one command that proves the CUDA path and times the kernels
# on a lent GPU in about 8 minutes, writing everything under $OUT (or the folder given),
# and prints a markdown report (benchmarks/gpu_report.py) at the end.
#
#   benchmarks/gpu_check.sh [OUT_DIR]             # on the GPU machine
#   benchmarks/gpu_check.sh --dry-run [OUT_DIR]   # rehearsal on the CPU: Triton's interpreter,
#                                                 # tiny shapes, the CUDA tests that can run there
#
# Steps, in order, each under its own time limit so that one hang cannot eat the rest
# (a step that runs out is recorded as such, and the next one starts):
#   1. pytest -m cuda                 every CUDA test                               (90 s)
#   2. benchmarks/kernel_speed.py     Triton launch-shape sweep, then every kernel at
#                                     Llama-3-8B shapes beside cuBLAS               (170 s)
#   3. benchmarks/decode_speed.py     decode tokens/s and prefill of a Llama-3-8B-shaped
#                                     model, CUDA graphs                            (140 s)
#   4. benchmarks/cuda_compress.py    SparseGPT 2:4 + GPTQ W4 on CUDA, 4 blocks     (90 s)
# At most 8 files come back from a lent machine: the check writes six.
set -u
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUTDIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUTDIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ $DRY = 1 ]; then
    export TRITON_INTERPRET=1 COMPRESS_REHEARSE_CUDA=1
    SMALL=(--small --device cpu)
    DECODE=(--small --device cpu --graphs off)
    COMPRESS=(--small --device cpu --blocks 2)
    LIMITS=(600 300 300 300)
else
    SMALL=() DECODE=() COMPRESS=()
    LIMITS=(90 170 140 90)
fi
STEPS="$OUTDIR/steps.tsv"
: > "$STEPS"
LOG="$OUTDIR/check.log"
: > "$LOG"

# step NAME LIMIT_S COMMAND...: run it under its limit, its output into check.log
step() {
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    local state=ok
    [ $rc = 124 ] || [ $rc = 137 ] && state="ran out of its ${limit}s"
    [ $rc != 0 ] && [ "$state" = ok ] && state="failed (exit $rc)"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$state" >> "$STEPS"
    echo "== $name: $state after $((SECONDS - t0))s" | tee -a "$LOG"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader 2>/dev/null \
    || echo "no nvidia-smi"; } > "$OUTDIR/device.txt"
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'transformers', transformers.__version__)" >> "$OUTDIR/device.txt" 2>&1

step pytest "${LIMITS[0]}" $PY -m pytest -m cuda -q -p no:cacheprovider -o addopts="" -rfEs tests
step kernels "${LIMITS[1]}" $PY benchmarks/kernel_speed.py --tune --json "$OUTDIR/kernels.json" ${SMALL[@]+"${SMALL[@]}"}
step decode "${LIMITS[2]}" $PY benchmarks/decode_speed.py --json "$OUTDIR/decode.json" ${DECODE[@]+"${DECODE[@]}"}
step compress "${LIMITS[3]}" $PY benchmarks/cuda_compress.py --json "$OUTDIR/compress.json" ${COMPRESS[@]+"${COMPRESS[@]}"}

$PY benchmarks/gpu_report.py "$OUTDIR" | tee "$OUTDIR/report.md"
