#!/usr/bin/env bash
# The prepared GPU check (issue 12): at most BUDGET seconds (default 600) on one GPU, in this order,
# into one markdown report ($OUT/report.md):
#   1. the prediction benchmark (benchmarks/predict.py: stacks/s, files/s, time shares);
#   2. benchmarks/backbones.py for the nine ports, float32 then bfloat16 (ours vs Keras, img/s);
#   3. VGG16 protocol=paper on the built-in cohort (the paper's Table 1 row: 217 minutes of depth-1
#      cross-validation on a Quadro P5000), with Tables 1 and 2 from experiments.report.
# Each step gets what is left of the budget (`timeout`); a step cut short says so in the report,
# and the study resumes from its run_dir when the script is run again.
#
#   bash benchmarks/gpu.sh                                    # on the GPU machine
#   SUBJECTS=2 BACKBONES=mobilenet SIZE=32 STUDY="..." bash benchmarks/gpu.sh   # tiny, on CPU
#
# Settings (environment): OUT (gpu-report), PYTHON (python), BUDGET (600 s), SUBJECTS (100: cohort
# of the prediction benchmark), BACKBONES (the nine ports), BATCH (32), SIZE (each backbone's own),
# STUDY (overrides of the study run; default "backbone=vgg16 depth=1 protocol=paper").
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-gpu-report}
PYTHON=${PYTHON:-python}
BUDGET=${BUDGET:-600}
SUBJECTS=${SUBJECTS:-100}
BACKBONES=${BACKBONES:-"vgg16 mobilenet mobilenet_v2 inception_v3 resnet50_v2 inception_resnet_v2 densenet121 nasnet_mobile xception"}
BATCH=${BATCH:-32}
SIZE=${SIZE:-}
STUDY=${STUDY:-"backbone=vgg16 depth=1 protocol=paper"}

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
REPORT="$OUT/report.md"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" STACKCLS_PROGRESS=0 STACKCLS_RUNS="$OUT/runs"
START=$(date +%s)

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# step NAME CMD...: run CMD under what is left of the budget, its output in $OUT/NAME.log
step() {
  local name=$1; shift
  local t=$(left)
  if (( t <= 5 )); then
    echo "_${name}: not run (budget spent)._" >> "$REPORT"; return 1
  fi
  local t0=$(date +%s)
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - t0 ))
  if (( rc == 124 )); then
    echo "_${name}: cut at the budget after ${took} s (rerun to resume)._" >> "$REPORT"
  elif (( rc != 0 )); then
    echo "_${name}: failed (exit $rc) after ${took} s; last lines of $name.log:_" >> "$REPORT"
    echo '```' >> "$REPORT"; tail -n 15 "$OUT/$name.log" >> "$REPORT"; echo '```' >> "$REPORT"
  else
    echo "_${name}: ${took} s._" >> "$REPORT"
  fi
  return $rc
}

device=$("$PYTHON" -c "import jax; d = jax.devices()[0]; print(f'{d.device_kind} ({d.platform}), {len(jax.devices())} device(s)')" 2>&1 | tail -n 1)
{
  echo "# GPU check ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  echo "Device: $device. Budget: $BUDGET s. Commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')."
  echo
  echo "## 1. Prediction (benchmarks/predict.py, $SUBJECTS subjects)"
  echo
} > "$REPORT"

size_arg=(); [[ -n "$SIZE" ]] && size_arg=(--size "$SIZE")
if step predict "$PYTHON" "$ROOT/benchmarks/predict.py" --subjects "$SUBJECTS" "${size_arg[@]}" --json "$OUT/predict.json"; then
  { echo; echo '```json'; cat "$OUT/predict.json"; echo; echo '```'; } >> "$REPORT"
fi

for dtype in float32 bfloat16; do
  { echo; echo "## 2. Backbones, $dtype (benchmarks/backbones.py, batch $BATCH)"; echo; } >> "$REPORT"
  # shellcheck disable=SC2086
  step "backbones_$dtype" "$PYTHON" "$ROOT/benchmarks/backbones.py" $BACKBONES --batch "$BATCH" \
    --dtype "$dtype" --repeats 3 "${size_arg[@]}"
  { echo; echo '```'; cat "$OUT/backbones_$dtype.log"; echo '```'; } >> "$REPORT"
done

{ echo; echo "## 3. Study: $STUDY"; echo; } >> "$REPORT"
# shellcheck disable=SC2086
step study "$PYTHON" -m experiments.run $STUDY "run_dir=$OUT/runs/study"
if [[ -f "$OUT/runs/study/results.json" ]]; then
  (cd "$OUT" && "$PYTHON" -m experiments.report "$OUT/runs/study" --out "$OUT" > /dev/null 2>&1)
  { echo; echo "Table 1 (minutes):"; echo; cat "$OUT/table1.md"; echo; echo "Table 2:"; echo;
    cat "$OUT/table2.md"; } >> "$REPORT"
fi
echo >> "$REPORT"
echo "Total: $(( $(date +%s) - START )) s." >> "$REPORT"
echo "wrote $REPORT"
