#!/usr/bin/env bash
# GPU check (issue 16): the default workflow on CUDA, then every bench at SD1.5 size.
#
#   bash scripts/gpu_check.sh            # on a GPU machine: device cuda, SD1.5 (random weights), < 8 min
#   bash scripts/gpu_check.sh --cpu-dry  # anywhere: the same steps on the CPU, tiny sizes, a few minutes
#
# 1. env       Python, torch, CUDA and the GPU (nvidia-smi) are recorded.
# 2. workflow  snakemake on config.yaml with device=<cuda|cpu> into a temporary results root;
#              fails on any job error (--cpu-dry: laid over tests/workflow/tiny_config.yaml).
# 3. model     `diffatlas make-tiny-model sd DIR --size sd15 --dtype float16`, built once and
#              reused by every bench (--cpu-dry: the tiny sd model).
# 4. bench_*   each bench in bench/, given --device/--model/--size where it takes them; its
#              stdout (one line per measure) is printed with the bench's name in front.
# Every part runs under its own `timeout` (capped by one overall deadline, GPU_CHECK_BUDGET_S,
# default 470 s) and independently: one failure does not hide the others. A summary table ends
# the run; the exit status is 1 when any part failed. Logs go to ${OUT:-/tmp/gpu_check_out}.
#
# On a GPU machine without network (Python 3.12 + CUDA torch), the packages diffatlas needs
# come as wheels in .whl/ (see ../shared/gpu/README.md); they are installed into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODE=gpu
case "${1:-}" in
    --cpu-dry) MODE=cpu ;;
    "") ;;
    *) echo "usage: bash scripts/gpu_check.sh [--cpu-dry]" >&2; exit 2 ;;
esac

OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-470}
SUMMARY="$OUT/summary.tsv"
printf 'part\tstatus\tseconds\tlog\n' > "$SUMMARY"

# -- environment: wheels into /tmp/site when present, else the current environment
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > "$OUT/pip.log" 2>&1 \
        || echo "gpu_check: pip install of .whl/*.whl failed (see $OUT/pip.log)" >&2
    mkdir -p /tmp/site/bin
    printf '#!/bin/sh\nexec %s -m diffatlas "$@"\n' "$PY" > /tmp/site/bin/diffatlas
    chmod +x /tmp/site/bin/diffatlas
    export PYTHONPATH=/tmp/site:$ROOT/src PATH=/tmp/site/bin:$PATH
else
    export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
fi
command -v diffatlas > /dev/null || {
    mkdir -p "$WORK/bin"; printf '#!/bin/sh\nexec %s -m diffatlas "$@"\n' "$PY" > "$WORK/bin/diffatlas"
    chmod +x "$WORK/bin/diffatlas"; export PATH=$WORK/bin:$PATH; }

NCPU=$(nproc 2> /dev/null || echo 2)
if [ "$MODE" = gpu ]; then
    DEV=cuda; SIZE=sd15; MODEL_DTYPE=float16; CORES=$NCPU; THREADS=$NCPU
else
    DEV=cpu; SIZE=tiny; MODEL_DTYPE=float32; CORES=2; THREADS=1
fi
export OMP_NUM_THREADS=$THREADS

FAILED=0
# run PART SECONDS CMD...: time-boxed (never past the overall deadline), logged, summarised.
run() {
    local part=$1 want=$2; shift 2
    local left=$(( BUDGET - ($(date +%s) - START) ))
    local limit=$(( want < left ? want : left ))
    local log="$OUT/$part.log" t0 rc status
    if [ "$limit" -lt 5 ]; then
        printf '%s\tskipped (overall budget %ss spent)\t0\t-\n' "$part" "$BUDGET" >> "$SUMMARY"
        FAILED=1; return 1
    fi
    echo "== $part (limit ${limit}s): $*"
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" > "$log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="timed out after ${limit}s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    [ $rc = 0 ] || { FAILED=1; tail -n 15 "$log" | sed "s/^/[$part] ! /"; }
    printf '%s\t%s\t%s\t%s\n' "$part" "$status" "$(( $(date +%s) - t0 ))" "$log" >> "$SUMMARY"
    return $rc
}

# A bench's own lines (its measures), with its name in front.
show() { grep -v '^\[transformers\]\|Warning\|warn(' "$OUT/$1.log" | sed "s/^/[$1] /"; }

# The flags a bench takes (benches gain flags over time: pass only those it knows).
flags() {
    local bench=$1; shift
    local help out=()
    help=$("$PY" "bench/$bench.py" --help 2> /dev/null)
    while [ $# -gt 0 ]; do
        if grep -q -- "$1\b" <<< "$help"; then out+=("$1" "$2"); fi
        shift 2
    done
    echo "${out[@]}"
}

# -- 1. environment
run env 60 "$PY" -c "
import platform, torch
print('python', platform.python_version(), '| torch', torch.__version__, '| cuda available', torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('gpu', p.name, '| memory %.1f GiB' % (p.total_memory / 2**30), '| cuda', torch.version.cuda)
import diffusers, snakemake, zarr; print('diffusers', diffusers.__version__, '| snakemake', snakemake.__version__, '| zarr', zarr.__version__)
"
show env
command -v nvidia-smi > /dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
if [ "$MODE" = gpu ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2> /dev/null; then
    echo "gpu_check: no CUDA GPU visible to torch; run with --cpu-dry for the CPU version" >&2
    exit 1
fi

# -- 2. the default workflow with device cuda into a temporary results root
RES=$WORK/results
if [ "$MODE" = gpu ]; then
    run workflow 240 snakemake --cores "$CORES" --config device="$DEV" results="$RES"
else
    "$PY" - "$WORK" << 'EOF'
import sys, pathlib, yaml
from diffatlas.models.tiny import make_tiny_model
work = pathlib.Path(sys.argv[1])
cfg = yaml.safe_load(pathlib.Path("tests/workflow/tiny_config.yaml").read_text())
cfg["models"] = {"shapesworld": {"path": str(make_tiny_model("pixel", work / "world"))}}
(work / "config.yaml").write_text(yaml.safe_dump(cfg))
EOF
    run workflow 400 snakemake --cores "$CORES" --configfile "$WORK/config.yaml" --config device="$DEV" results="$RES"
fi
tail -n 3 "$OUT/workflow.log" | sed 's/^/[workflow] /'
[ -d "$RES/logs" ] && cp -r "$RES/logs" "$OUT/workflow_job_logs" 2> /dev/null

# -- 3. one SD1.5-sized model (random weights), reused by every bench
MODEL=$WORK/model_$SIZE
run model 120 diffatlas make-tiny-model sd "$MODEL" --size "$SIZE" --dtype "$MODEL_DTYPE" && show model

# -- 4. the benches, one line per measure
# bench_geometry: pullback basis; peak memory of the chunked forward-AD attention (item 4).
run bench_geometry 120 "$PY" bench/bench_geometry.py --model "$MODEL" --device "$DEV" --threads "$THREADS" \
    --n 8 --iters 2 --repeats 1 --memory && show bench_geometry
# bench_extract: extraction vs the bare forward (its --device/--model/--size when it has them).
# --quick: the rate ÷ bare forward with and without maps, fixed costs apart (no diagnostic rows).
run bench_extract 120 "$PY" bench/bench_extract.py --threads "$THREADS" --device "$DEV" --model "$MODEL" \
    $( [ "$MODE" = gpu ] && echo --n 128 --batch-size 32 || echo --n 16 ) --repeats 2 --quick && show bench_extract
# bench_daam: tracing vs plain generation.
run bench_daam 90 "$PY" bench/bench_daam.py --model "$MODEL" --device "$DEV" --threads "$THREADS" \
    --prompts 8 --steps 10 --batch 8 --repeats 2 && show bench_daam
# bench_sae: SAE training vs the matmul limit at SD's channel widths.
run bench_sae 60 "$PY" bench/bench_sae.py --device "$DEV" --threads "$THREADS" --dims 640 1280 \
    $( [ "$MODE" = cpu ] && echo --batch 256 --steps 2 ) && show bench_sae
# bench_diffc: Diff-C training vs store reads at SD1.5's map sizes.
run bench_diffc 60 "$PY" bench/bench_diffc.py --threads "$THREADS" \
    $( [ "$MODE" = gpu ] && echo --sizes 1280x8x8 || echo --sizes 64x4x4 --samples 64 --epochs 1 ) \
    $(flags bench_diffc --device "$DEV") && show bench_diffc
# bench_world_train: ShapesWorld training throughput (the world model, not SD-sized).
run bench_world_train 60 "$PY" bench/bench_world_train.py --threads "$THREADS" --steps 2 --variants default,no_attention \
    $(flags bench_world_train --device "$DEV") && show bench_world_train

# -- summary
echo
echo "gpu_check ($MODE, device $DEV, size $SIZE) in $(( $(date +%s) - START ))s; logs in $OUT"
column -t -s $'\t' "$SUMMARY" 2> /dev/null || cat "$SUMMARY"
rm -rf "$WORK"
exit $FAILED
