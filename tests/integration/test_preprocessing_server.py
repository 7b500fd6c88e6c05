"""Face geometry through the running server: stage timings, the quality settings, quality-weighted
subject scores, and the 68-point model's licence notice."""

from __future__ import annotations

import urllib.request

import cv2
import numpy as np
import pytest
from acroscreen.client import FrameData, FrameResult, ImageKind, ScreeningClient, ScreenOptions, SubjectResult
from acroscreen.server.errors import ConfigurationError
from acroscreen.server.main import RunningServer
from acroscreen.server.runtime.int8 import int8_available
from acroscreen.server.runtime.model import cpu_has_native_bf16

from tests.helpers import png_bytes

from .conftest import start_server


def _stage_totals(server: RunningServer) -> dict[tuple[str, str], float]:
    """(stage, "sum"|"count") → value of acroscreen_stage_seconds."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    totals = {}
    for line in text.splitlines():
        for part in ("sum", "count"):
            prefix = f"acroscreen_stage_seconds_{part}{{stage=\""
            if line.startswith(prefix):
                stage = line[len(prefix) :].split('"', 1)[0]
                totals[(stage, part)] = float(line.rsplit(" ", 1)[1])
    return totals


def _frames(images: list[np.ndarray]) -> list[FrameData]:
    return [FrameData(png_bytes(image), ImageKind.PNG, index=i) for i, image in enumerate(images)]


def test_landmarks_and_warp_stages_are_timed(
    client: ScreeningClient, server: RunningServer, portrait_bgr: np.ndarray
) -> None:
    """Each analysed face adds a landmarks and a warp observation; the warp is the real
    160×160 warp (tens to hundreds of µs), not the copy of an already-warped crop."""
    before = _stage_totals(server)
    frames = 6
    final = client.screen(_frames([portrait_bgr] * frames), ScreenOptions(analyze_every_frame=True))
    assert final.frames_analyzed == frames
    after = _stage_totals(server)
    delta = {key: after[key] - before.get(key, 0.0) for key in after}
    for stage in ("landmarks", "warp", "quality"):
        assert delta[(stage, "count")] == frames, stage
    warp, landmarks = delta[("warp", "sum")], delta[("landmarks", "sum")]
    print(f"per frame: landmarks {landmarks / frames * 1e3:.3f} ms, warp {warp / frames * 1e3:.3f} ms")
    assert warp > 0.03 * landmarks


def test_a_quality_setting_changes_what_is_rejected(portrait_bgr: np.ndarray) -> None:
    """--quality-min-face-px above the portrait's face width turns it away as too small."""
    running = start_server(quality_min_face_px=600.0, quality_good_face_px=700.0)
    try:
        with ScreeningClient(f"127.0.0.1:{running.port}", timeout_s=60) as strict:
            events = list(strict.screen_stream(_frames([portrait_bgr]), ScreenOptions(analyze_every_frame=True)))
    finally:
        running.stop(grace_s=1.0)
    (frame,) = [e for e in events if isinstance(e, FrameResult)]
    assert frame.status == "rejected" and frame.reject_reason == "face_too_small", frame
    assert "< 600 px" in frame.detail and frame.box is not None and frame.box.width < 600


def test_unusable_quality_thresholds_stop_the_server_at_start() -> None:
    with pytest.raises(ConfigurationError, match="min_face_px < good_face_px"):
        start_server(quality_min_face_px=200.0)  # above the default good_face_px (128)


def test_subject_score_is_the_quality_weighted_mean_of_the_frames(
    client: ScreeningClient, portrait_bgr: np.ndarray
) -> None:
    """Frames of clearly different quality: the subject's probabilities are their quality-weighted
    mean, which here differs from the plain mean by far more than the float32 rounding."""
    images = [
        portrait_bgr,
        cv2.GaussianBlur(portrait_bgr, (0, 0), 3.0),
        cv2.convertScaleAbs(portrait_bgr, alpha=0.45),
        cv2.resize(portrait_bgr, None, fx=0.75, fy=0.75, interpolation=cv2.INTER_AREA),
        cv2.GaussianBlur(portrait_bgr, (0, 0), 1.2),
    ]
    events = list(client.screen_stream(_frames(images), ScreenOptions(analyze_every_frame=True)))
    analyzed = [e for e in events if isinstance(e, FrameResult) and e.status == "analyzed"]
    final = events[-1]
    assert isinstance(final, SubjectResult) and final.frames_analyzed == len(analyzed) == len(images)
    weights = np.array([f.quality.score for f in analyzed if f.quality is not None])
    probabilities = np.array([f.probabilities for f in analyzed])
    weighted = weights @ probabilities / weights.sum()
    plain = probabilities.mean(axis=0)
    scores = np.arange(1, 4)
    print(f"quality {np.round(weights, 3)}; expected score weighted {weighted @ scores:.4f}, plain {plain @ scores:.4f}")
    assert np.ptp(weights) > 0.2
    # float32 on the wire: the weighted mean is reproduced to ~1e-7, and the plain mean is 100× further off
    assert final.probabilities == pytest.approx(tuple(weighted), abs=1e-6)
    assert final.expected_score == pytest.approx(float(weighted @ scores), abs=1e-6)
    assert np.abs(weighted - plain).max() > 1e-4


def test_68_point_model_reports_its_licence_in_model_info() -> None:
    running = start_server(landmark_points=68)
    try:
        with ScreeningClient(f"127.0.0.1:{running.port}", timeout_s=60) as research:
            info = research.model_info()
    finally:
        running.stop(grace_s=1.0)
    assert info.landmark_points == 68
    notice = " ".join(info.notices)
    assert "68-point" in notice and "iBUG 300-W" in notice and "non-commercial" in notice, info.notices


def test_5_point_model_info_carries_no_research_only_notice(client: ScreeningClient) -> None:
    info = client.model_info()
    assert info.landmark_points == 5
    # The shipped weights come with int8 scales: a CPU server with PyTorch's x86 kernels uses them.
    assert info.arithmetic == ("int8" if int8_available() else "bf16" if cpu_has_native_bf16() else "fp32")
    assert not any("non-commercial" in notice for notice in info.notices), info.notices


def test_a_frontal_3d_model_is_served_with_68_points_by_default(tmp_path, portrait_bgr: np.ndarray) -> None:
    """A model trained on "frontal-3d-v1" crops needs 68 landmarks: its card decides, not the default 5."""
    import dataclasses

    from acroscreen.server.runtime.weights import save_weights, untrained_weights

    source = untrained_weights(seed=1)
    preprocessing = dataclasses.replace(source.card.preprocessing, alignment="frontal-3d-v1", landmark_points=68)
    model = tmp_path / "frontal3d.safetensors"
    save_weights(model, source.net, dataclasses.replace(source.card, preprocessing=preprocessing))
    running = start_server(model=model, metrics_port=-1)
    try:
        with ScreeningClient(f"127.0.0.1:{running.port}", timeout_s=60) as client:
            info = client.model_info()
            final = client.screen(_frames([portrait_bgr] * 3), ScreenOptions(analyze_every_frame=True))
    finally:
        running.stop(grace_s=1.0)
    assert info.alignment == "frontal-3d-v1" and info.landmark_points == 68
    assert info.arithmetic == ("bf16" if cpu_has_native_bf16() else "fp32")  # no int8 scales beside this file
    assert any("300-W" in notice for notice in info.notices)
    assert final.frames_analyzed == 3
