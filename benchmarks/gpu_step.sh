#!/usr/bin/env bash
# The benchmark run for a CUDA machine: train_step.py's CUDA part (fp32 against bf16 +
# channels_last at ps_gat, 512x512, batch 32; ours against the loop reference with
# torch.cuda.max_memory_allocated) and postprocess.py --device cuda, each printing its table and last line.
#
#   bash benchmarks/gpu_step.sh        # from anywhere; output to $OUT, else benchmarks/results/
#
# Needs python3 with a CUDA torch, numpy and pyyaml: no Ray, no tensorboardX, no install
# (the repository root goes on PYTHONPATH). It took about 1 minute on one H200 (figures in
# benchmarks/README.md); each part is capped so the whole run ends within about 6. PYTHON=... picks another interpreter;
# TRAIN_STEP_ARGS and POSTPROCESS_ARGS add arguments (tests/test_benchmarks.py runs this
# script on the CPU with "--small --amp-device cpu" and "--small", to check it end to end).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  "$python" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
      "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")'
  echo "$(nproc) CPUs"
} 2>&1 | tee "$out/gpu.txt"

status=0
timeout 200 "$python" benchmarks/train_step.py --cuda-only ${TRAIN_STEP_ARGS:-} 2>&1 | tee "$out/train_step.txt" || status=1
timeout 150 "$python" benchmarks/postprocess.py ${POSTPROCESS_ARGS:---device cuda --repeats 7} 2>&1 | tee "$out/postprocess.txt" || status=1
echo "last lines:"
tail -n 1 "$out/train_step.txt" "$out/postprocess.txt"
exit "$status"
