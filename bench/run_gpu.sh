#!/usr/bin/env bash
PART=${PART:-all}
case "$PART" in 1|2|3|all) ;; *) echo "error: PART=$PART: use 1, 2, 3 or leave it unset for all" >&2; exit 2;; esac
cd "$(dirname "$0")/.." && PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)} && { "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -r requirements.txt; }
# The benchmarks on one GPU machine; a markdown table of the results goes to $OUT (if set, else
# bench/results/) as bench_<part>_<UTC stamp>.md, with the full log and raw JSON lines.
#   bash bench/run_gpu.sh                      GPU run of every part: batch 256, tile 112, resnet50
#   PART=1|2|3 bash bench/run_gpu.sh           one part, most valuable first (each under BUDGET):
#     1: the bf16 channels_last step of every kind (the table the issues ask for), then the same
#        kinds on vit_small at 224 px (tile 112; W2SSL 98 patch tokens per image and view, MoCo v3 196)
#     2: end to end (bench/e2e.py) and the input pipelines (bench/data.py)
#     3: --compile of W2SSL and supervised, the fp16 NCHW step, W2SSL with --fused-views
#   DEVICE=cpu QUICK=1 bash bench/run_gpu.sh   tiny sizes, to check the script on a CPU
#   COMPILE=0 skips the torch.compile run of part 3 (default: on, off with QUICK=1; it only runs if at
#   least 2.5 minutes are left)
#   BUDGET=<seconds> changes the deadline (default 340); PYTHON=<interpreter> picks Python.
set -u -o pipefail
DEVICE=${DEVICE:-cuda}
RESULTS=${OUT:-bench/results}
BUDGET=${BUDGET:-340}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$RESULTS"
LOG="$RESULTS/bench_${PART}_$STAMP.log" JSONL="$RESULTS/bench_${PART}_$STAMP.jsonl" MD="$RESULTS/bench_${PART}_$STAMP.md"
: >"$JSONL"
# One generated JPEG folder for data.py and e2e.py (same image count), removed at exit.
IMAGES=$(mktemp -d)
trap 'rm -rf "$IMAGES"' EXIT

if [ "${QUICK:-0}" = 1 ]; then
  STEP=(--arch resnet18 --batch-size 4 --tile-size 16 --iters 1 --warmup 0)
  VIT_STEP=(--arch vit_small --batch-size 4 --tile-size 32 --iters 1 --warmup 0)
  DATA=(--images 24 --workers 2 --batch-size 4 --tile-size 16 --iters 2)
  E2E=(--iters 2 --images 24 --batch-size 4 --tile-size 16 --arch resnet18 --workers 2)
  COMPILE=${COMPILE:-0}
else
  STEP=(--arch resnet50 --batch-size 256 --tile-size 112 --iters 30 --warmup 10)
  VIT_STEP=(--arch vit_small --batch-size 256 --tile-size 112 --iters 20 --warmup 5)
  DATA=(--images 3000 --workers 16 --batch-size 256 --tile-size 112 --iters 20)
  E2E=(--iters 50 --images 3000)
fi
[ "$DEVICE" = cpu ] || E2E+=(--gpu-aug)

# bench LABEL MAX_SECONDS CMD...: run CMD with a timeout (capped by the overall deadline), log its output
# and keep its last line (JSON) for the table; a failure is recorded and the next benchmark still runs.
bench() {
  local label=$1 limit=$2 left last
  shift 2
  left=$((BUDGET - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    echo "== $label: skipped (deadline)" | tee -a "$LOG"
    printf '%s\t%s\t%s\n' "$label" "$*" '{"skipped": "deadline"}' >>"$JSONL"
    return 0
  fi
  echo "== $label (timeout ${limit}s): $*" | tee -a "$LOG"
  if last=$(timeout "$limit" "$@" 2>&1 | tee -a "$LOG" | tail -n 1) && [ "${last:0:1}" = "{" ]; then
    printf '%s\t%s\t%s\n' "$label" "$*" "$last" >>"$JSONL"
  else
    echo "== $label failed" | tee -a "$LOG"
    printf '%s\t%s\t%s\n' "$label" "$*" '{"failed": "see the log"}' >>"$JSONL"
  fi
}

# Most important first (the issue's targets), so that a tight deadline only cuts the extras.
if [ "$PART" = 1 ] || [ "$PART" = all ]; then
  bench "step bf16 channels_last" 200 "$PY" -m bench.step --device "$DEVICE" "${STEP[@]}" --precision bf16 \
    --channels-last --no-fused-views || echo failed
  bench "step vit_small bf16" 150 "$PY" -m bench.step --device "$DEVICE" "${VIT_STEP[@]}" --precision bf16 \
    --no-fused-views || echo failed
fi
if [ "$PART" = 2 ] || [ "$PART" = all ]; then
  bench "e2e" 120 "$PY" -m bench.e2e --device "$DEVICE" --root "$IMAGES" "${E2E[@]}" || echo failed
  bench "data" 100 "$PY" -m bench.data --device "$DEVICE" --root "$IMAGES/train" "${DATA[@]}" || echo failed
fi
if [ "$PART" = 3 ] || [ "$PART" = all ]; then
  # Compiling every kind cold would not fit: W2SSL (trunks) and supervised (the model) only.
  if [ "${COMPILE:-1}" = 1 ] && [ $((BUDGET - SECONDS)) -ge 150 ]; then
    bench "step bf16 channels_last compile" 240 "$PY" -m bench.step --device "$DEVICE" "${STEP[@]}" \
      --precision bf16 --channels-last --compile --only w2ssl --only supervised || echo failed
  fi
  bench "step fp16 NCHW" 120 "$PY" -m bench.step --device "$DEVICE" "${STEP[@]}" --precision fp16 --no-fused-views \
    || echo failed
  bench "step bf16 channels_last fused views" 90 "$PY" -m bench.step --device "$DEVICE" "${STEP[@]}" \
    --precision bf16 --channels-last --fused-views --only w2ssl || echo failed
fi

"$PY" - "$JSONL" "$MD" "$SECONDS" "$DEVICE" "$PART" <<'EOF' || echo "failed to write the table"
import json
import sys

from bench.common import device_name, markdown_table, resolve_device, versions

jsonl, md, seconds, device, part = sys.argv[1:]
runs = [line.rstrip("\n").split("\t") for line in open(jsonl)]
runs = [(label, cmd, json.loads(result)) for label, cmd, result in runs]
env = versions()
title = "Benchmarks" if part == "all" else f"Benchmarks, part {part}"
lines = [f"# {title} ({jsonl.rsplit('_', 1)[-1].split('.')[0]})", "",
         f"{device_name(resolve_device(device))}; torch {env['torch']}, torchvision {env['torchvision']}, "
         f"CUDA {env['cuda']}, cuDNN {env['cudnn']}; all runs took {seconds} s."]
# bench/step.py's rows (its JSON's "steps": every registered method, MoCo v3 also fused, supervised)
steps = next((r["steps"] for label, _, r in runs if label.startswith("step") and "steps" in r), [])
rows = []
for label, cmd, r in runs:
    if label.startswith("step") and "steps" in r:
        peaks = "/".join(f"{r[f'{n}_peak_gib']:.1f}" if r[f"{n}_peak_gib"] is not None else "-" for n in steps)
        rows.append((label, *(r[f"{n}_img_s"] for n in steps), *(r[f"ratio_w2ssl_{n}"] for n in steps[1:]), peaks))
    elif label.startswith("step"):
        rows.append((label, *["failed"] * (2 * len(steps))))
if rows:
    lines += ["", "## Training step (source images/s; peak GiB)", ""]
    lines.append(markdown_table(["run", *steps, *(f"w2ssl/{n}" for n in steps[1:]), "peak GiB " + "/".join(steps)],
                                rows))
for label, cmd, r in runs:
    lines += ["", f"## {label}", "", f"`{cmd}`", ""]
    if not label.startswith("step"):
        lines.append(markdown_table(["key", "value"], sorted(r.items())))
    elif r.get("seq_len"):
        lines.append(f"ViT patch tokens per source image and view: W2SSL {r['w2ssl_tokens_per_img_view']}, "
                     f"MoCo v3 {r['mocov3_tokens_per_img_view']}; {r['seq_len']} tokens per sequence.")
open(md, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "results: $MD (log $LOG)"
