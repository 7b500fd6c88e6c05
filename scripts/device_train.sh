#!/usr/bin/env bash
# Train the phantom-demo weights on a GPU machine that has torch but no dlib and
# no acroscreen install, from crop caches built beforehand on a dlib machine:
#   TRAIN_NPZ    phantoms of the TRAIN identities (JPEG-in-npz), comma-separated caches
#   HOLDOUT_NPZ  phantoms of the HOLDOUT identities (evaluation only)
#   CLIPS_NPZ    (optional) every 2nd frame of the HOLDOUT phantom clips the slow test
#                screens (seed 7): per-subject accuracy there is per clip
#   VARIANTS     (optional) space-separated NAME:field=value,... trained side by side
#                (scripts/device_train.py); the best on validation is kept. Distillation onto dlib's
#                face descriptors (TrainConfig.distill): make them on a dlib machine for the same caches
#                in the same order (training.descriptors.write_descriptors on device_train.load_all of
#                them; ~90 ms a crop a core), carry the .npz, and add e.g. d:distill=.carry/desc.npz
# The device tool sends the working tree and the carried paths, 64 MiB in all, and the shipped
# weights (server/weights/phantom-demo.safetensors, 47 MB, tracked) leave too little room: move
# them out of the tree for the call and back after (neither this script nor its results need them).
# Writes to $OUT: the variants' training logs (variant-logs.tgz), variants.json (validation, holdout and clip metrics
# of each), the kept variant's resolved config, and its fp16 weights split in 15 MiB parts
# (join with `cat weights.part-* > M`; sha256 in train.log). The device returns at most 8 files.
# CPU dry run: PYTHON=.venv/bin/python OUT=/tmp/dry MAX_SAMPLES=40 BATCH=8 LOG_EVERY=1 \
#   TRAIN_NPZ=small.npz HOLDOUT_NPZ=small.npz VARIANTS="a: b:ema_decay=0.9" scripts/device_train.sh
set -euo pipefail
: "${OUT:?set OUT to an output folder}"
PYTHON=${PYTHON:-python3}
TRAIN_NPZ=${TRAIN_NPZ:-.carry/crops_train.npz}
HOLDOUT_NPZ=${HOLDOUT_NPZ:-.carry/crops_holdout.npz}
CLIPS_NPZ=${CLIPS_NPZ:-.carry/crops_holdout_clips.npz}
WORK=$(mktemp -d)
mkdir -p "$OUT" "$WORK/p/acroscreen"
ln -s "$PWD/server" "$WORK/p/acroscreen/server"
export PYTHONPATH="$WORK/p${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi: CPU run"
variant_flags=()
for variant in ${VARIANTS:-base:}; do variant_flags+=(--variant "$variant"); done
set -o pipefail
"$PYTHON" scripts/device_train.py --train "$TRAIN_NPZ" --holdout "$HOLDOUT_NPZ" --clips "$CLIPS_NPZ" \
    --out "$OUT" --work "$WORK" --minutes "${MINUTES:-4.5}" --max-samples "${MAX_SAMPLES:-600000}" \
    --batch "${BATCH:-128}" --patience "${PATIENCE:-25}" --log-every "${LOG_EVERY:-20}" "${variant_flags[@]}" \
    2>&1 | tee "$OUT/train.log"
tar czf "$OUT/variant-logs.tgz" -C "$WORK" $(cd "$WORK" && ls *.log)
cp "$WORK/best/phantom-demo.config.json" "$OUT/"
split -b 15M "$WORK/best/phantom-demo.safetensors" "$OUT/weights.part-"
sha256sum "$WORK/best/phantom-demo.safetensors" | tee -a "$OUT/train.log"
ls -l "$OUT"
