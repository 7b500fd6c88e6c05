#!/usr/bin/env bash
# Fetch the cp312 wheels and pack the clips that deploy/bench/gpu_bench.sh needs on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
download() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$1" "$2"
}
mkdir -p .whl .whl2 .carry/bench
download .whl "opencv-python-headless==4.14.0.94"
for spec in grpcio==1.85.3 protobuf==7.36.2 dlib-bin==20.0.1.post1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1; do
    download .whl2 "$spec"
done
# pytest for the `gpu`-marked tests, which gpu_bench.sh runs first (~1 MB).
for spec in pytest pluggy iniconfig packaging pygments pytest-timeout; do
    download .whl2 "$spec==$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$spec'))")"
done
cp "$(.venv/bin/python -c 'import importlib.util as u; print(list(u.find_spec("face_recognition_models").submodule_search_locations)[0])')/models/shape_predictor_5_face_landmarks.dat" .carry/bench/
.venv/bin/python - <<'PY'
from pathlib import Path
import av, cv2
from acroscreen.client import FrameData
from acroscreen.server.bench import save_clips
clips = []
for video in sorted(Path("../shared/data/videos").glob("*.mp4")):
    frames = []
    with av.open(str(video)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i >= 60:
                break
            image = frame.to_ndarray(format="bgr24")
            h, w = image.shape[:2]
            scale = min(1.0, 640 / max(h, w))
            if scale < 1:
                image = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
            frames.append(FrameData(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes(), index=i))
    clips.append(frames)
save_clips(Path(".carry/bench/clips.npz"), clips)
print("packed", [len(c) for c in clips], "clips")
PY
