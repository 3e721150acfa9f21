#!/usr/bin/env bash
# One call on a GPU machine: install, run the CUDA tests, exercise every GPU launch mode on a small
# generated folder, then all benchmarks (bench/run_gpu.sh). About 9 minutes on one H200.
# Results (logs, tables) go to $OUT if set, else bench/results/.
set -u -o pipefail
cd "$(dirname "$0")/.."
RESULTS=${OUT:-bench/results}
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
PY=${PYTHON:-python3}
"$PY" -c "import torch, torchvision, timm, yaml, skimage" 2>/dev/null || "$PY" -m pip install -q -r requirements-dev.txt
"$PY" -c "import pytest" 2>/dev/null || "$PY" -m pip install -q pytest
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOG"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$LOG"

step() {  # step LABEL SECONDS CMD...: run with a timeout, keep going on failure
  local label=$1 limit=$2
  shift 2
  echo "== $label: $*" | tee -a "$LOG"
  if timeout "$limit" "$@" >>"$LOG" 2>&1; then echo "== $label: ok" | tee -a "$LOG"; else echo "== $label: FAILED" | tee -a "$LOG"; fi
}

step "cuda tests" 120 "$PY" -m pytest -q -k "cuda or gpu" tests/test_gpu_augment.py tests/test_model.py tests/test_bench.py
DATA=$(mktemp -d)
"$PY" -c "from bench.data import make_folder; from pathlib import Path; make_folder(Path('$DATA/train'), 512, 8, 16)"
TINY=(-a resnet50 -b 64 --epochs 2 --print-freq 4 --workers 8 --seed 0 --max-iters 12 --resume none)
step "published launch (mp.spawn)" 120 "$PY" main_moco.py --moco-m-cos --crop-min=.2 --dist-url tcp://localhost:10109 \
  --multiprocessing-distributed --world-size 1 --rank 0 "${TINY[@]}" --save-dir "$DATA/o1" "$DATA"
step "torchrun fp16 NCHW fused views" 120 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 main_moco.py "${TINY[@]}" \
  --precision fp16 --no-channels-last --fused-views --save-dir "$DATA/o2" "$DATA"
step "one GPU --gpu-aug" 120 "$PY" main_moco.py "${TINY[@]}" --gpu-aug --save-dir "$DATA/o3" "$DATA"
grep -h '^{' "$LOG" | tail -n 3
rm -rf "$DATA"
OUT="$RESULTS" bash bench/run_gpu.sh
