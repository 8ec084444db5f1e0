#!/usr/bin/env bash
# psdet's engine on a CUDA machine, end to end through the CLI: synthesize a dataset, train
# ps_gat_tiny in fp32, in bf16 + channels_last and in fp16 (GradScaler), evaluate and predict
# with the bf16 run, and train ps_gat (VGG16, 512x512, batch 32) for one epoch in bf16 +
# channels_last. Each `psdet train` logs images/s per epoch.
#
#   bash benchmarks/gpu_train.sh       # output to $OUT, else benchmarks/results/
#
# Needs python3 with torch, numpy, pyyaml, pillow and tensorboardX (no Ray; the repository
# root goes on PYTHONPATH). DEVICE=cpu runs the same steps on the CPU (a check of the
# script; tests/test_benchmarks.py runs it so, at its smallest); TRAIN, VAL, EPOCHS,
# BIG_EPOCHS, BIG_BATCH, BIG_SIZE and BIG_WORKERS size it; INPUT_ARGS goes to
# input_pipeline.py. About 2 minutes on one H200.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
python="${PYTHON:-python3}"
device="${DEVICE:-cuda}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
psdet=("$python" -m psdet)
common=(-o train.device="$device" -o train.progress=false)

step() { echo; echo "== $*"; }
timed() {  # timed LABEL CMD...: runs CMD, logs to $out/LABEL.log, prints its wall time
  local label=$1 start
  shift
  start=$(date +%s%N)
  "$@" >"$out/$label.log" 2>&1 || { tail -n 30 "$out/$label.log"; echo "$label failed"; return 1; }
  echo "$label: $(( ($(date +%s%N) - start) / 1000000 )) ms wall"
  grep -E "INFO epoch" "$out/$label.log" | tail -n 2 || true
}

step "data"
"${psdet[@]}" synth --out "$work/data" --train "${TRAIN:-512}" --val "${VAL:-64}" --seed 0 | tail -n 1

step "ps_gat_tiny: fp32, bf16 + channels_last, fp16 with GradScaler"
timed tiny_fp32 "${psdet[@]}" train -c ps_gat_tiny --data "$work/data" --out "$work/fp32" \
  "${common[@]}" -o train.epochs="${EPOCHS:-3}"
timed tiny_bf16 "${psdet[@]}" train -c ps_gat_tiny --data "$work/data" --out "$work/bf16" \
  "${common[@]}" -o train.epochs="${EPOCHS:-3}" -o train.precision=bf16 -o train.channels_last=true
timed tiny_fp16 "${psdet[@]}" train -c ps_gat_tiny --data "$work/data" --out "$work/fp16" \
  "${common[@]}" -o train.epochs=1 -o train.precision=fp16

step "eval and predict with the bf16 run's checkpoint"
"${psdet[@]}" eval -c ps_gat_tiny --data "$work/data" --ckpt "$work/bf16" -o train.device="$device" --json \
  | tee "$out/tiny_bf16_eval.json"
"${psdet[@]}" predict --ckpt "$work/bf16" "$work"/data/testing/all/*_00000[01].jpg --draw "$out/predict.png" \
  >"$out/predict.json"
head -c 400 "$out/predict.json"; echo

step "input pipeline: uint8 + colour jitter on the device against float32 jittered in the workers"
timeout 300 "$python" benchmarks/input_pipeline.py --device "$device" ${INPUT_ARGS:-} | tee "$out/input_pipeline.txt"

step "ps_gat (VGG16, 512x512, batch 32), bf16 + channels_last"
timed ps_gat_bf16 "${psdet[@]}" train -c ps_gat --data "$work/data" --out "$work/ps_gat" "${common[@]}" \
  -o train.epochs="${BIG_EPOCHS:-1}" -o train.precision=bf16 -o train.channels_last=true \
  -o data.batch_size="${BIG_BATCH:-32}" -o data.image_size="${BIG_SIZE:-512}" -o data.num_workers="${BIG_WORKERS:-8}"

echo
echo "gpu_train: ok device=$device"
