#!/usr/bin/env bash
# Time-boxed training on a machine with an NVIDIA GPU (`make train-gpu`), e.g. the lent device
# machine: it has torch, OpenCV, scikit-image and typer but no package registry, so edgeflow is
# installed from this checkout without its dependencies. Pairs are generated on all CPU cores but
# one; the net trains in bf16; the checkpoint is written every CHECKPOINT_MINUTES so a cut-off run
# still leaves weights; OUT_DIR/best.pt (fp16, ~10 MB) and log.jsonl are what to bring back (the
# full checkpoint with the optimiser state is ~90 MB). Resume a run with the same command; start
# a later run from the weights it brought back with INIT=path/to/best.pt.
#
#   MINUTES=6 OUT_DIR=$OUT/train bash bench/train_gpu.sh
set -euo pipefail
MODEL=${MODEL:-flownet2-s}
MINUTES=${MINUTES:-6}
CHECKPOINT_MINUTES=${CHECKPOINT_MINUTES:-2}
OUT_DIR=${OUT_DIR:-out/train-gpu}
INIT=${INIT:-default}
NATURAL=${NATURAL:-0.5}
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/edgeflow-site}

if ! "$PYTHON" -c "import edgeflow.training" 2>/dev/null; then
  "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation --no-index --target "$SITE" .
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PYTHON" -c 'import torch, sys; print(torch.cuda.get_device_name(0), "torch", torch.__version__, file=sys.stderr)'
workers=$(( $(nproc) > 2 ? $(nproc) - 1 : 1 ))
exec "$PYTHON" -c 'import sys; from edgeflow.cli import main; sys.exit(main(sys.argv[1:]))' \
  train "$MODEL" --out "$OUT_DIR" --device cuda --bf16 --workers "$workers" --batch 16 --lr 1e-4 \
  --init "$INIT" --natural "$NATURAL" --curriculum 0:256x320 --steps 40000 --eval-every 500 \
  --budget-minutes "$MINUTES" --checkpoint-minutes "$CHECKPOINT_MINUTES"
