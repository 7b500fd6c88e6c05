#!/usr/bin/env bash
# GPU benchmark of acroscreen for one device-tool call (a bare H100/H200 machine with
# torch and CUDA but no dlib, no OpenCV 4 and no acroscreen install).
#
# Prepared here by deploy/bench/prepare_gpu_bench.sh:
#   .whl/    OpenCV 4.x wheel alone (62 MB): installed to /tmp/site by a first call
#            (`INSTALL_OPENCV_ONLY=1 bash deploy/bench/gpu_bench.sh`), which survives while the machine is warm
#   .whl2/   grpcio, protobuf, dlib-bin, grpcio-health-checking, grpcio-reflection (cp312), and
#            pytest with its dependencies and pytest-timeout, for the `gpu`-marked tests run first
#   .carry/bench/  clips.npz (8 clips × 60 JPEG frames) and the dlib 5-point landmark model
# The device tool sends the working tree and the carried paths, 64 MiB in all, and the shipped
# weights (server/weights/phantom-demo.safetensors, 47 MB, tracked) leave too little room: move
# them out of the tree for the call and back after (neither this script nor its results need them).
# Runs one bench a load in STREAMS (a comma-separated list: the first load is at the latency target's
# 64 streams, the last above the 3,000 frames/s target; the naive baseline runs with the last only).
# Writes $OUT/bench_gpu_<streams>.json (the `acroscreen bench` reports, with the GPU named),
# $OUT/frame_path_cpu.jsonl (deploy/bench/frame_path_cpu.py: the CPUs' ceiling) and $OUT/bench.log.
# CPU dry run here: PYTHON=.venv/bin/python SKIP_INSTALL=1 DEVICE=cpu STREAMS=1,2 DURATION=5 BASELINE=3 WORKERS=2 FRAME_PATH_PROCESSES=1 \
#   OUT=/tmp/benchout bash deploy/bench/gpu_bench.sh
set -euo pipefail
: "${OUT:?set OUT}"
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
STREAMS=${STREAMS:-64,112}  # 64: the p99 <= 150 ms target's load; 112 x 30 fps = 3,360 frames/s offered
DURATION=${DURATION:-30}  # seconds a load runs; more than RAMP_S
RAMP_S=${RAMP_S:-2}  # seconds over which the streams of a load start
BASELINE=${BASELINE:-15}  # seconds of the naive baseline (with the last load); 0: none
FRAME_PATH_PROCESSES=${FRAME_PATH_PROCESSES-1,8,16}  # empty: skip that probe; CHECKS=0 skips the gpu tests and graphs check
WORKERS=${WORKERS:-16}  # a worker a core: 16 beat 12 on the H100 node (2026-11-28); the load generator and the model process take ~1.5 cores
SERVERS=${SERVERS:-1}  # servers of WORKERS workers each, one target naming them all (as pods on one node)
mkdir -p "$OUT"
if [ "${INSTALL_OPENCV_ONLY:-0}" = 1 ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site "$PYTHON" -c "import cv2; print('opencv', cv2.__version__, hasattr(cv2, 'CascadeClassifier'))"
    exit 0
fi
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site2 .whl2/*.whl
fi
SHIM=$(mktemp -d)
mkdir -p "$SHIM/acroscreen" "$SHIM/face_recognition_models/models"
ln -s "$PWD/server" "$SHIM/acroscreen/server"
ln -s "$PWD/client" "$SHIM/acroscreen/client"
ln -s "$PWD/protos/acroscreen/v1" "$SHIM/acroscreen/v1"
touch "$SHIM/face_recognition_models/__init__.py"
cp .carry/bench/shape_predictor_5_face_landmarks.dat "$SHIM/face_recognition_models/models/"
export PYTHONPATH="$SHIM:/tmp/site2:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# OpenCV 5 (the machine's own, when /tmp/site is gone: the machine was handed back since the
# INSTALL_OPENCV_ONLY call) has no CascadeClassifier: every frame would fail and the runs report zeros.
"$PYTHON" -c "import cv2, dlib, grpc, google.protobuf as p, torch; assert hasattr(cv2, 'CascadeClassifier'), 'OpenCV ' + cv2.__version__ + ' has no CascadeClassifier: run INSTALL_OPENCV_ONLY=1 first, on the same warm machine'; print('opencv', cv2.__version__, 'grpc', grpc.__version__, 'protobuf', p.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee "$OUT/bench.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee -a "$OUT/bench.log" || true
if [ "$DEVICE" = cuda ] && [ "${CHECKS:-1}" = 1 ]; then
# The tests no CPU machine runs (the bench goes on either way, the log says how they went), then
# CUDA graphs against eager on this GPU: agreement, and faces/s at batch 64.
"$PYTHON" -m pytest -q -m gpu -p no:cacheprovider $(grep -rl "mark.gpu" tests) 2>&1 | tail -15 | tee -a "$OUT/bench.log" || true
"$PYTHON" - <<'PY' 2>&1 | tee -a "$OUT/bench.log"
import time, numpy as np, torch
from acroscreen.server.runtime.model import SeverityModel
from acroscreen.server.runtime.weights import untrained_weights
card = untrained_weights(0).card
eager = SeverityModel(untrained_weights(0).net, card, "cuda")
graphs = SeverityModel(untrained_weights(0).net, card, "cuda", graph_batch_sizes=(1, 2, 4, 8, 16, 32, 64))
print("graph sizes", graphs.graph_batch_sizes)
crops = np.random.default_rng(0).integers(0, 256, (64, 160, 160, 3), dtype=np.uint8)
for rows in (1, 3, 64):
    diff = np.abs(eager.predict(crops[:rows]).probabilities - graphs.predict(crops[:rows]).probabilities).max()
    print("graphs vs eager, rows", rows, "max |dp|", float(diff))
for name, model in (("eager", eager), ("graphs", graphs)):
    model.predict(crops)
    started = time.perf_counter()
    for _ in range(50):
        model.predict(crops)
    print(name, "batch 64:", round(64 * 50 / (time.perf_counter() - started)), "faces/s with host copies")
PY
fi
# The frame path's CPU ceiling on this machine (no gRPC, no model): 1 process, then several at once.
[ -z "$FRAME_PATH_PROCESSES" ] || "$PYTHON" deploy/bench/frame_path_cpu.py .carry/bench/clips.npz --processes "$FRAME_PATH_PROCESSES" --seconds 8 \
    | tee "$OUT/frame_path_cpu.jsonl" | tee -a "$OUT/bench.log"
LAST=${STREAMS##*,}
for N in ${STREAMS//,/ }; do
    BASE_ARGS=()
    if [ "$N" = "$LAST" ] && [ "$BASELINE" != 0 ]; then BASE_ARGS=(--baseline naive --baseline-duration "$BASELINE"); fi
    "$PYTHON" -m acroscreen.client.cli bench .carry/bench/clips.npz --device "$DEVICE" --streams "$N" \
        --duration "$DURATION" --ramp-s "$RAMP_S" --pace realtime --every-frame "${BASE_ARGS[@]}" \
        --server-arg=--max-streams=160 --server-arg=--max-batch-size=128 --server-arg=--batch-queue-capacity=4096 \
        --server-arg=--analysis-backlog=4 --server-arg=--max-batch-delay-ms=4 --server-arg=--workers="$WORKERS" --servers "$SERVERS" \
        --out "$OUT/bench_gpu_$N.json" 2>>"$OUT/bench.log" >/dev/null
    "$PYTHON" - "$OUT/bench_gpu_$N.json" <<'PY' | tee -a "$OUT/bench.log"
import json, sys
r = json.load(open(sys.argv[1]))
s = r["server"]
print(s["streams"], "streams:", json.dumps({k: s.get(k) for k in (
    "servers", "analyzed_per_s", "acknowledged_per_s", "end_to_end_latency_ms", "ack_latency_ms", "mean_batch_size",
    "server_cpu_utilization_pct", "server_cpu_ms_per_frame", "load_cpu_cores", "load_cpu_ms_per_frame", "server_frames_received_per_worker", "gpu", "errors")}))
if r.get("naive"):
    print("naive", json.dumps(r.get("naive")), "speedup", r.get("speedup_analyzed_per_s"))
PY
done
