"""The offline tools through the `acroscreen` command: phantom → train → evaluate, and preprocess."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
from acroscreen.client.sources import video_frames
from acroscreen.server.bench import save_clips
from acroscreen.server.runtime.int8 import int8_available
from acroscreen.server.runtime.model import cpu_has_native_bf16

from .serving import ACROSCREEN

PORTRAIT = Path(__file__).resolve().parents[2] / "server" / "demo" / "eileen_collins_nasa.jpg"


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([ACROSCREEN, *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_phantom_train_evaluate(tmp_path: Path) -> None:
    identities = tmp_path / "identities"
    for name, flip in (("Person_A", False), ("Person_B", True), ("Person_C", False)):
        (identities / name).mkdir(parents=True)
        image = cv2.imread(str(PORTRAIT))
        cv2.imwrite(str(identities / name / "1.jpg"), cv2.flip(image, 1) if flip else image)
    phantoms = tmp_path / "phantoms"
    _run("phantom", str(identities), "--out", str(phantoms), "--split", "all", "--seed", "3")
    assert {p.name for p in phantoms.iterdir() if p.is_dir()} == {"1", "2", "3"}
    weights = tmp_path / "m.safetensors"
    _run("train", str(phantoms), "--out", str(weights), "--max-samples", "24", "--batch-size", "8",
         "--device", "cpu", "--val-fraction", "0.34", "--workers", "1", "--kind", "untrained")
    assert weights.is_file() and (tmp_path / "m.config.json").is_file()
    assert (tmp_path / "m.int8.json").is_file() == int8_available()  # int8 scales from the training crops
    report = json.loads(_run("evaluate", str(phantoms), "--model", str(weights), "--json").stdout)
    assert report["frames"]["count"] == 9
    arithmetic = "int8" if int8_available() else "bf16" if cpu_has_native_bf16() else "fp32"
    assert report["source"].endswith(f"({arithmetic})")  # the arithmetic the model ran in, with its scales
    assert len(report["frames"]["confusion"]) == 3


def test_preprocess_writes_crops_and_json(tmp_path: Path) -> None:
    source = tmp_path / "in"
    source.mkdir()
    shutil.copy(PORTRAIT, source / "portrait.jpg")
    out = _run("preprocess", str(source), "--out", str(tmp_path / "crops"), "--json").stdout
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert len(records) == 1 and records[0]["rejected"] is None
    crop = cv2.imread(records[0]["crop"])
    assert crop is not None and crop.shape == (160, 160, 3)
    assert set(records[0]["pose"]) == {"yaw", "pitch", "roll"}


def test_bench_reports_every_workers_metrics_and_the_naive_baseline(shared_data: Path, tmp_path: Path) -> None:
    """A short bench against two servers of --workers 2 (two pods), then the naive pipeline on the
    same frames. Four streams from two load processes, the second starting a second after the
    first: the report adds up the four workers' /metrics, and the clients, given one target naming
    both servers, spread the streams over all four workers."""
    out = tmp_path / "bench.json"
    run = _run("bench", str(shared_data / "videos" / "retalking_face1.mp4"), "--streams", "4", "--duration", "3",
               "--ramp-s", "2", "--load-processes", "2", "--servers", "2", "--server-arg=--workers=2",
               "--baseline", "naive", "--baseline-duration", "2", "--out", str(out))
    report = json.loads(run.stdout)
    assert json.loads(out.read_text()) == report
    assert report["config"]["ramp_s"] == 2.0
    server = report["server"]
    assert server["servers"] == 2 and server["target"].startswith("ipv4:127.0.0.1:")
    assert server["errors"] == [] and server["final_results"] == 4
    assert server["frames_acknowledged"] == server["frames_sent"] > 0
    assert server["analyzed_per_s"] > 0 and server["ack_latency_ms"]["p99"] is not None
    assert server["server_frames_received"] == server["frames_sent"]
    per_worker = server["server_frames_received_per_worker"]
    assert len(per_worker) == 4 and min(per_worker) > 0, per_worker
    assert 0 < server["server_cpu_ms_per_frame"] < 1000
    assert 0 < server["load_cpu_ms_per_frame"] < 1000 and server["load_cpu_cores"] > 0  # both load processes' CPU
    assert server["mean_batch_size"] >= 1 and "infer" in server["server_stage_mean_ms"]
    assert report["naive"]["frames_processed"] > 0
    assert report["machine"]["cpu_count"] >= 1


def test_frame_path_probe_reports_frames_cpu_and_stages(shared_data: Path, tmp_path: Path) -> None:
    """deploy/bench/frame_path_cpu.py, as gpu_bench.sh runs it, on a clip packed like the bench's."""
    clip = []
    for frame in video_frames(shared_data / "videos" / "retalking_face1.mp4", 85):
        clip.append(frame)
        if len(clip) == 20:
            break
    save_clips(tmp_path / "clips.npz", [clip])
    script = Path(__file__).resolve().parents[2] / "deploy" / "bench" / "frame_path_cpu.py"
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "clips.npz"), "--processes", "1,2", "--seconds", "1"],
                         capture_output=True, text=True, timeout=120, check=True)
    one, two = (json.loads(line) for line in run.stdout.splitlines())
    assert (one["processes"], two["processes"]) == (1, 2)
    for report in (one, two):
        assert report["frames_per_s"] > 0 and 0 < report["analysed_per_s"] <= report["frames_per_s"]
        assert 0 < report["cpu_ms_per_frame"] < 1000
        assert {"decode", "landmarks", "warp"} <= set(report["stage_ms_per_frame"])
