#!/usr/bin/env bash
# Everything a GPU machine is lent for, in one run (`make gpu-check`), results under $OUT (default
# out/gpu): gpu.txt (nvidia-smi), kernels.json (bench/gpu_check.py run on the kit that
# `make gpu-kit` wrote here and the run carried: out/gpu-kit), gpu-tests.txt (the `gpu`-marked
# tests, where TVM is importable), dlpack.json (bench/dlpack_gpu.py: the runtime's DLPack handoff of
# page-locked memory to a CUDA kernel) and a time-boxed training run (bench/train_gpu.sh; train/best.pt,
# train/log.jsonl). A failing part does not stop the others; the exit status is the kernel check's.
#
#   run(command="OUT=$OUT TRAIN_MINUTES=5 bash bench/gpu_check.sh", carry=["out/gpu-kit"], timeout_s=540)
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
PYTHONPATH=. timeout 180 python3 bench/gpu_check.py run out/gpu-kit --json > "$OUT/kernels.json"
kernels=$?
if python3 -c "import tvm" 2>/dev/null; then
  timeout 120 python3 -m pytest -q -m gpu tests > "$OUT/gpu-tests.txt" 2>&1
else
  echo "no TVM on this machine: the gpu-marked tests need it" > "$OUT/gpu-tests.txt"
fi
timeout 60 python3 bench/dlpack_gpu.py --json > "$OUT/dlpack.json" 2>&1
MINUTES=${TRAIN_MINUTES:-5} OUT_DIR=$OUT/train bash bench/train_gpu.sh > "$OUT/train.log" 2>&1
exit $kernels
