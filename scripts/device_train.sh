#!/usr/bin/env bash
# Train the phantom-demo weights on a GPU machine that has torch but no dlib and
# no acroscreen install, from crop caches built beforehand on a dlib machine:
#   .carry/crops_train.npz    phantoms of the TRAIN identities (JPEG-in-npz)
#   .carry/crops_holdout.npz  phantoms of the HOLDOUT identities (evaluation only)
#   .carry/crops_holdout_clips.npz (optional) every 2nd frame of the HOLDOUT phantom clips the
#                             slow test screens (seed 7): per-subject accuracy there is per clip
# Writes to $OUT: train.log, the resolved config, holdout metrics and predictions,
# and the fp16 weights split in 15 MiB parts (join with `cat weights.part-* > M`; sha256 at the end of train.log).
# CPU dry run: PYTHON=.venv/bin/python OUT=/tmp/dry MAX_SAMPLES=40 BATCH=8 LOG_EVERY=1 \
#   TRAIN_NPZ=small.npz HOLDOUT_NPZ=small.npz scripts/device_train.sh
set -euo pipefail
: "${OUT:?set OUT to an output folder}"
PYTHON=${PYTHON:-python3}
MINUTES=${MINUTES:-4.5}          # hard wall-clock cap of the training loop
MAX_SAMPLES=${MAX_SAMPLES:-600000}
BATCH=${BATCH:-128}
PATIENCE=${PATIENCE:-25}
LOG_EVERY=${LOG_EVERY:-20}
TRAIN_NPZ=${TRAIN_NPZ:-.carry/crops_train.npz}
HOLDOUT_NPZ=${HOLDOUT_NPZ:-.carry/crops_holdout.npz}
CLIPS_NPZ=${CLIPS_NPZ:-.carry/crops_holdout_clips.npz}
WORK=$(mktemp -d)
mkdir -p "$OUT" "$WORK/p/acroscreen"
ln -s "$PWD/server" "$WORK/p/acroscreen/server"
export PYTHONPATH="$WORK/p" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi: CPU run"
set -o pipefail
"$PYTHON" - "$TRAIN_NPZ" "$HOLDOUT_NPZ" "$WORK/phantom-demo.safetensors" "$OUT" \
    "$MINUTES" "$MAX_SAMPLES" "$BATCH" "$PATIENCE" "$LOG_EVERY" "$CLIPS_NPZ" <<'EOF' 2>&1 | tee "$OUT/train.log"
import json, shutil, sys, time
from pathlib import Path
import torch
from acroscreen.server.training.evaluate import (
    evaluate_predictions, format_report, predict_with_model, report_dict, write_predictions_csv)
from acroscreen.server.training.train import TrainConfig, train
from acroscreen.server.training.crops import load_crops

train_npz, holdout_npz, weights, out = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
minutes, max_samples, batch, patience, log_every = float(sys.argv[5]), *map(int, sys.argv[6:10])
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), flush=True)
assert "dlib" not in sys.modules, "the training loop must not need dlib"
config = TrainConfig(data=Path(train_npz), out=weights, max_minutes=minutes, max_samples=max_samples,
                     batch_size=batch, patience=patience, log_every=log_every)
result = train(config, load_crops(Path(train_npz)))
shutil.copy(weights.with_suffix(".config.json"), out / "phantom-demo.config.json")
started = time.monotonic()
predictions = predict_with_model(weights, Path(holdout_npz))
report = evaluate_predictions(predictions, f"{weights.name} on {holdout_npz}")
print(format_report(report), flush=True)
(out / "holdout_metrics.json").write_text(json.dumps(report_dict(report), indent=1))
write_predictions_csv(predictions, out / "holdout_predictions.csv")
print(f"holdout evaluation {time.monotonic() - started:.1f} s; training {result.seconds:.0f} s, "
      f"{result.samples} samples", flush=True)
clips_npz = Path(sys.argv[10])
if clips_npz.is_file():  # per subject = per phantom clip
    clips = evaluate_predictions(predict_with_model(weights, clips_npz), f"{weights.name} on {clips_npz}")
    print(format_report(clips), flush=True)
    (out / "holdout_clip_metrics.json").write_text(json.dumps(report_dict(clips), indent=1))
EOF
split -b 15M "$WORK/phantom-demo.safetensors" "$OUT/weights.part-"
sha256sum "$WORK/phantom-demo.safetensors" | tee -a "$OUT/train.log"  # the device returns at most 8 files
ls -l "$OUT"
