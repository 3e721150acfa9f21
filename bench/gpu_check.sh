#!/usr/bin/env bash
# A GPU session's checks in three parts, most valuable first; each part fits one 8-minute call in the
# worst case (every step has a timeout, all under the part's deadline BUDGET, default 450 s):
#   bash bench/gpu_check.sh 1   the CUDA tests, then the bf16 step table of every kind, resnet50 and
#                               vit_small at 224 px (run_gpu.sh part 1)
#   bash bench/gpu_check.sh 2   end to end and the input pipelines (run_gpu.sh part 2), then every GPU
#                               launch mode on a small generated folder
#   bash bench/gpu_check.sh 3   --compile of W2SSL and supervised, the fp16 NCHW and fused-views steps
# Each part writes gpu_check_part<N>.md (what ran, ok or FAILED, seconds; then run_gpu.sh's tables) and
# its logs to $OUT if set, else bench/results/. PYTHON=<interpreter> picks Python.
set -u -o pipefail
PART=${1:-}
case "$PART" in 1|2|3) ;; *) echo "error: give the part to run: bash bench/gpu_check.sh 1 (or 2, 3)" >&2; exit 2;; esac
cd "$(dirname "$0")/.."
RESULTS=${OUT:-bench/results}
BUDGET=${BUDGET:-450}
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check_part$PART.log" MD="$RESULTS/gpu_check_part$PART.md"
PY=${PYTHON:-python3}
"$PY" -c "import torch, torchvision, timm, yaml, skimage" 2>/dev/null || "$PY" -m pip install -q -r requirements-dev.txt
"$PY" -c "import pytest" 2>/dev/null || "$PY" -m pip install -q pytest
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOG"
VERSIONS=$("$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name())" 2>&1)
echo "$VERSIONS" | tee -a "$LOG"
printf '# GPU check, part %s (%s)\n\n%s\n\n| step | result | seconds |\n|---|---|---|\n' \
  "$PART" "$(date -u +%Y-%m-%dT%H:%MZ)" "$VERSIONS" >"$MD"

step() {  # step LABEL SECONDS CMD...: run with a timeout capped by the part's deadline; keep going on failure
  local label=$1 limit=$2 left start result
  shift 2
  left=$((BUDGET - SECONDS - 15))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    echo "== $label: skipped (deadline)" | tee -a "$LOG"
    echo "| $label | skipped (deadline) | 0 |" >>"$MD"
    return 0
  fi
  echo "== $label (timeout ${limit}s): $*" | tee -a "$LOG"
  start=$SECONDS
  if timeout "$limit" "$@" >>"$LOG" 2>&1; then result=ok; else result=FAILED; fi
  echo "== $label: $result" | tee -a "$LOG"
  echo "| $label | $result | $((SECONDS - start)) |" >>"$MD"
}

benchmarks() {  # run_gpu.sh's part $PART with what is left of the deadline, its tables appended to $MD
  local left=$((BUDGET - SECONDS - 15)) before
  before=$(ls "$RESULTS"/bench_"${PART}"_*.md 2>/dev/null)
  # run_gpu.sh's own deadline ends 30 s early: time to write its tables before the timeout.
  step "run_gpu.sh part $PART" "$left" env OUT="$RESULTS" BUDGET="$((left - 30))" PART="$PART" bash bench/run_gpu.sh
  for md in "$RESULTS"/bench_"${PART}"_*.md; do
    [ -f "$md" ] && ! grep -qxF "$md" <<<"$before" && { echo; cat "$md"; } >>"$MD"
  done
}

if [ "$PART" = 1 ]; then
  step "cuda tests" 150 "$PY" -m pytest -q -m "not slow" -k "cuda or gpu" tests/
  benchmarks
elif [ "$PART" = 2 ]; then
  BUDGET=$((BUDGET - 200)) benchmarks  # leaves 200 s for the launch modes below
  DATA=$(mktemp -d)
  trap 'rm -rf "$DATA"' EXIT
  "$PY" -c "from bench.data import make_folder; from pathlib import Path; make_folder(Path('$DATA/train'), 512, 8, 16)"
  MARK=$(wc -l <"$LOG")
  TINY=(-a resnet50 -b 64 --epochs 2 --print-freq 4 --workers 8 --seed 0 --max-iters 12 --resume none)
  step "published launch (mp.spawn)" 90 "$PY" main_moco.py --moco-m-cos --crop-min=.2 --dist-url tcp://localhost:10109 \
    --multiprocessing-distributed --world-size 1 --rank 0 "${TINY[@]}" --save-dir "$DATA/o1" "$DATA"
  step "torchrun fp16 NCHW fused views" 90 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 main_moco.py \
    "${TINY[@]}" --precision fp16 --no-channels-last --fused-views --save-dir "$DATA/o2" "$DATA"
  step "one GPU --gpu-aug" 90 "$PY" main_moco.py "${TINY[@]}" --gpu-aug --save-dir "$DATA/o3" "$DATA"
  { echo; echo "Launch modes, end-to-end JSON lines:"; echo; tail -n +"$((MARK + 1))" "$LOG" | grep '^{' | sed 's/^/    /'; } >>"$MD"
else
  benchmarks
fi
echo "part $PART done in $SECONDS s: $MD"
