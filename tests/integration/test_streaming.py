"""ScreenStream end to end against a real server: real video decoding, detection, model."""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from acroscreen.client import (
    FrameAck,
    FrameData,
    FrameResult,
    ImageKind,
    ScreeningClient,
    ScreenOptions,
    SubjectResult,
)
from acroscreen.client.client import REQUEST_FRAMING_BYTES
from acroscreen.client.errors import InvalidRequestError, ServerBusyError
from acroscreen.client.sources import video_frames
from acroscreen.server.main import RunningServer

from tests.helpers import jpeg_bytes, png_bytes

from .conftest import start_server


def _metric(server: RunningServer, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _grey_gradient() -> np.ndarray:
    """A well-exposed frame with no face in it."""
    row = np.linspace(60, 200, 160, dtype=np.float32)
    return np.repeat(np.tile(row, (120, 1))[:, :, None], 3, axis=2).astype(np.uint8)


def test_health_and_model_info(client: ScreeningClient) -> None:
    assert client.health() == "SERVING"
    assert client.health("acroscreen.v1.Screening") == "SERVING"
    info = client.model_info()
    assert info.model.kind in ("untrained", "phantom-demo", "clinical")
    assert info.input_size == 160 and len(info.class_labels) == 3
    assert info.mean == 127.5 and info.std == 128.0


def test_video_stream_gives_one_result_per_frame_and_a_final_subject(
    client: ScreeningClient, server: RunningServer, shared_data: Path
) -> None:
    video = shared_data / "videos" / "retalking_face1.mp4"
    received_before = _metric(server, "acroscreen_frames_received_total")
    events = list(client.screen_stream(video_frames(video), ScreenOptions(subject_id="s-video", analyze_every_frame=True)))
    frames = [e for e in events if isinstance(e, FrameResult)]
    subjects = [e for e in events if isinstance(e, SubjectResult)]
    assert sorted(f.index for f in frames) == list(range(135))
    final = subjects[-1]
    assert isinstance(events[-1], SubjectResult) and final.status == "final"
    assert final.frames_received == 135
    assert final.frames_analyzed == sum(f.status == "analyzed" for f in frames) >= 100
    assert final.frames_skipped == 0
    assert final.predicted_score in (1, 2, 3)
    assert sum(final.probabilities) == pytest.approx(1.0, abs=1e-4)
    assert final.subject_id == "s-video" and final.model is not None
    assert any(s.status == "provisional" for s in subjects[:-1])
    analyzed = [f for f in frames if f.status == "analyzed"]
    assert all(f.box is not None and f.quality is not None and f.pose is not None for f in analyzed)
    assert _metric(server, "acroscreen_frames_received_total") - received_before == 135


def test_the_same_frames_give_the_same_results_alone_or_beside_another_stream(
    client: ScreeningClient, shared_data: Path
) -> None:
    """A recording screened again gives the same result for every frame and the same subject result,
    whether its faces were batched alone or with another stream's (a hospital re-running a video
    must not see the score move)."""
    frames = list(video_frames(shared_data / "videos" / "retalking_face3.mp4"))[:60]
    other = list(video_frames(shared_data / "videos" / "liveportrait_d3.mp4"))[:60]

    def screen(subject: str, source: list[FrameData]) -> tuple[dict, SubjectResult]:
        per_frame, final = {}, None
        for event in client.screen_stream(iter(source), ScreenOptions(subject_id=subject, analyze_every_frame=True)):
            if isinstance(event, FrameResult):
                per_frame[event.index] = (event.status, event.probabilities, event.quality)
            elif event.status == "final":
                final = event
        assert final is not None
        return per_frame, final

    alone_frames, alone = screen("again-1", frames)
    beside = threading.Thread(target=screen, args=("beside", other))
    beside.start()
    together_frames, together = screen("again-2", frames)
    beside.join()
    assert alone.frames_analyzed >= 50
    assert together_frames == alone_frames
    assert (together.probabilities, together.expected_score, together.frames_analyzed) == (
        alone.probabilities, alone.expected_score, alone.frames_analyzed)


def test_bad_frames_are_rejected_and_the_stream_goes_on(client: ScreeningClient, portrait_bgr: np.ndarray) -> None:
    good = jpeg_bytes(portrait_bgr)
    frames = [
        FrameData(good, ImageKind.JPEG, index=0),
        FrameData(b"", ImageKind.JPEG, index=1),
        FrameData(b"\xff\xd8garbage", ImageKind.JPEG, index=2),
        FrameData(good[: len(good) // 3], ImageKind.JPEG, index=3),
        FrameData(b"\x00" * 10, ImageKind.RAW_BGR24, index=4, width=64, height=48),
        FrameData(png_bytes(_grey_gradient()), ImageKind.PNG, index=5),
        FrameData(png_bytes(portrait_bgr), ImageKind.PNG, index=6),
        FrameData(portrait_bgr.tobytes(), ImageKind.RAW_BGR24, index=7, width=512, height=512),
    ]
    events = list(client.screen_stream(frames, ScreenOptions(subject_id="bad", analyze_every_frame=True)))
    by_index = {e.index: e for e in events if isinstance(e, FrameResult)}
    assert len(by_index) == 8
    assert [by_index[i].status for i in (0, 6, 7)] == ["analyzed"] * 3
    assert by_index[1].reject_reason == "decode_failed"
    assert by_index[2].reject_reason == "decode_failed"
    assert by_index[3].reject_reason == "decode_failed"
    assert by_index[4].reject_reason == "bad_format" and "needs" in by_index[4].detail
    assert by_index[5].reject_reason == "no_face"
    final = events[-1]
    assert isinstance(final, SubjectResult) and final.status == "final"
    assert final.frames_received == 8 and final.frames_analyzed == 3
    assert final.rejected == {"decode_failed": 3, "bad_format": 1, "no_face": 1}


def test_frames_waiting_for_a_face_search_are_settled_without_a_full_decode(
    client: ScreeningClient, server: RunningServer, portrait_bgr: np.ndarray
) -> None:
    """A fixed camera on an empty scene, then a face: the empty frames after the first search wait
    for the next one on a quarter-size grey decode; the face is searched for at once."""
    rng = np.random.default_rng(0)
    scene = cv2.resize(_grey_gradient(), (640, 480))
    empty = [jpeg_bytes(np.clip(scene + rng.normal(0, 2, scene.shape), 0, 255).astype(np.uint8)) for _ in range(20)]
    frames = [FrameData(empty[i], ImageKind.JPEG, index=i) for i in range(20)]
    frames += [FrameData(jpeg_bytes(portrait_bgr), ImageKind.JPEG, index=20 + i) for i in range(3)]
    decodes = _metric(server, 'acroscreen_stage_seconds_count{stage="decode"}')
    checks = _metric(server, 'acroscreen_stage_seconds_count{stage="scene_check"}')
    events = list(client.screen_stream(frames, ScreenOptions(subject_id="empty-room", analyze_every_frame=True)))
    results = {e.index: e for e in events if isinstance(e, FrameResult)}
    assert [results[i].reject_reason for i in range(20)] == ["no_face"] * 20
    assert all("the picture is the one searched" in results[i].detail for i in range(1, 20))
    assert [results[i].status for i in range(20, 23)] == ["analyzed"] * 3
    assert _metric(server, 'acroscreen_stage_seconds_count{stage="decode"}') - decodes == 1 + 3
    assert _metric(server, 'acroscreen_stage_seconds_count{stage="scene_check"}') - checks == 19 + 1


def test_stream_must_start_with_options(server: RunningServer) -> None:
    import grpc
    from acroscreen.v1 import screening_pb2 as pb
    from acroscreen.v1 import screening_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ScreeningStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.ScreenStream(iter([pb.ScreenRequest(frame=pb.Frame(index=0, jpeg=b"x"))]), timeout=30))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.ScreenStream(iter([]), timeout=30))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        options = pb.ScreenRequest(options=pb.SessionOptions(subject_id="twice"))
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.ScreenStream(iter([options, options]), timeout=30))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_client_maps_status_codes_to_its_exceptions(client: ScreeningClient) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        client.screen_images([], ScreenOptions())
    assert caught.value.__cause__ is not None
    # The server names every failed call, and the exception carries the name.
    request_id = caught.value.request_id
    assert request_id is not None and len(request_id) == 12 and f"(request id {request_id})" in str(caught.value)
    with pytest.raises(InvalidRequestError):
        client.screen_images([FrameData(b"x", ImageKind.JPEG)], ScreenOptions(subject_id="x" * 200))


def test_a_request_of_more_images_than_a_few_is_refused_before_they_are_read(server: RunningServer) -> None:
    """An empty image is 2 bytes on the wire: one request of a million held a handler for minutes
    (23 s of CPU, 190 MB) and slowed every other caller's requests from 0.1 to 7.8 s."""
    import time

    import grpc
    from acroscreen.v1 import screening_pb2 as pb
    from acroscreen.v1 import screening_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    with channel:
        stub = pb_grpc.ScreeningStub(channel)
        flood = pb.ScreenImagesRequest(images=[pb.Frame(index=i) for i in range(1_000_000)])
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            stub.ScreenImages(flood, timeout=60)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 64" in refused.value.details()
        assert time.monotonic() - started < 5
        few = stub.ScreenImages(pb.ScreenImagesRequest(images=[pb.Frame(index=i) for i in range(64)]), timeout=60)
        assert few.frames_received == 64  # the most a request may hold (each rejected: no image)


def test_analysis_cap_skips_but_acknowledges(client: ScreeningClient, portrait_bgr: np.ndarray) -> None:
    good = jpeg_bytes(portrait_bgr)
    frames = [FrameData(good, ImageKind.JPEG, index=i, timestamp_us=i * 33_000) for i in range(12)]
    events = list(client.screen_stream(frames, ScreenOptions(max_analyzed_frames=4, analyze_every_frame=True)))
    results = [e for e in events if isinstance(e, FrameResult)]
    assert len(results) == 12
    assert sum(r.status == "skipped" for r in results) == 8
    final = events[-1]
    assert isinstance(final, SubjectResult)
    assert (final.frames_received, final.frames_analyzed, final.frames_skipped) == (12, 4, 8)


def test_streams_beyond_the_limit_are_refused_and_others_go_on(portrait_bgr: np.ndarray) -> None:
    running = start_server(max_streams=1)
    try:
        target = f"127.0.0.1:{running.port}"
        gate = threading.Event()
        good = jpeg_bytes(portrait_bgr)

        def slow_frames():
            yield FrameData(good, ImageKind.JPEG, index=0)
            gate.wait(30)
            yield FrameData(good, ImageKind.JPEG, index=1)

        results: list[SubjectResult] = []
        with ScreeningClient(target, timeout_s=60) as first, ScreeningClient(target, timeout_s=60) as second:
            worker = threading.Thread(target=lambda: results.append(first.screen(slow_frames(), ScreenOptions())))
            worker.start()
            deadline = 100
            while running.service.active_streams == 0 and deadline:
                threading.Event().wait(0.05)
                deadline -= 1
            with pytest.raises(ServerBusyError) as caught:
                second.screen([FrameData(good, ImageKind.JPEG)], ScreenOptions())
            assert caught.value.retry_after_s is not None
            assert caught.value.request_id is not None  # a refused stream is named too
            gate.set()
            worker.join(60)
        assert results and results[0].frames_received == 2 and results[0].frames_analyzed == 2
        assert running.service.active_streams == 0
    finally:
        running.stop(grace_s=1.0)


def test_screen_images_on_photos(client: ScreeningClient, shared_data: Path) -> None:
    faces = sorted((shared_data / "faces" / "identities" / "Barack_Obama").glob("*.jpg"))
    result = client.screen_images([FrameData(p.read_bytes(), ImageKind.JPEG, index=i) for i, p in enumerate(faces)])
    assert result.status == "final" and result.frames_received == len(faces)
    assert result.frames_analyzed >= 1 and result.predicted_score in (1, 2, 3)
    none = sorted((shared_data / "faces" / "none").glob("*.jpg"))
    empty = client.screen_images([FrameData(p.read_bytes(), ImageKind.JPEG) for p in none])
    assert empty.status == "insufficient_evidence" and empty.predicted_score is None
    assert empty.rejected == {"no_face": len(none)}


def test_frames_above_the_pixel_limit_are_rejected(portrait_bgr: np.ndarray) -> None:
    running = start_server(max_frame_pixels=256 * 256, metrics_port=-1)
    try:
        with ScreeningClient(f"127.0.0.1:{running.port}", timeout_s=60) as small:
            big = cv2.resize(portrait_bgr, (300, 300))
            result = small.screen([FrameData(jpeg_bytes(big), ImageKind.JPEG)], ScreenOptions())
        assert result.rejected == {"too_large": 1}
    finally:
        running.stop(grace_s=1.0)


def test_acknowledged_frames_get_an_ack_before_their_result(client: ScreeningClient, portrait_bgr: np.ndarray) -> None:
    good = jpeg_bytes(portrait_bgr)
    frames = [FrameData(good, ImageKind.JPEG, index=i) for i in range(4)]
    events = list(client.screen_stream(frames, ScreenOptions(analyze_every_frame=True, acknowledge_frames=True)))
    order = [(type(e).__name__, e.index) for e in events if isinstance(e, (FrameAck, FrameResult))]
    for i in range(4):
        assert order.index(("FrameAck", i)) < order.index(("FrameResult", i))
    assert isinstance(events[-1], SubjectResult) and events[-1].frames_analyzed == 4


def test_server_analysis_rate_spreads_analysis_in_capture_time(portrait_bgr: np.ndarray) -> None:
    """At most 5 analysed frames per second of capture time; every other frame is acknowledged as skipped."""
    running = start_server(metrics_port=-1, max_analysis_fps=5.0)
    try:
        good = jpeg_bytes(portrait_bgr)
        frames = [FrameData(good, ImageKind.JPEG, index=i, timestamp_us=i * 33_334) for i in range(30)]  # ~1 s at 30 fps
        with ScreeningClient(f"127.0.0.1:{running.port}", timeout_s=60) as rate_client:
            events = list(rate_client.screen_stream(frames, ScreenOptions(analyze_every_frame=True)))
        analyzed = [e.index for e in events if isinstance(e, FrameResult) and e.status == "analyzed"]
        assert analyzed == [0, 6, 12, 18, 24]
        final = events[-1]
        assert isinstance(final, SubjectResult) and (final.frames_analyzed, final.frames_skipped) == (5, 25)
    finally:
        running.stop(grace_s=1.0)


def test_still_images_are_each_analysed_whatever_the_analysis_rate(portrait_bgr: np.ndarray) -> None:
    """A photo set sent as a stream carries no capture times (all 0): under the server's rate cap all
    but one photo were passed over as one interval's frames; as still images every one is analysed."""
    running = start_server(metrics_port=-1, max_analysis_fps=5.0)
    try:
        good = jpeg_bytes(portrait_bgr)
        photos = [FrameData(good, ImageKind.JPEG, index=i) for i in range(8)]
        with ScreeningClient(f"127.0.0.1:{running.port}", timeout_s=60) as rate_client:
            as_video = rate_client.screen(photos, ScreenOptions(analyze_every_frame=True))
            as_stills = rate_client.screen(photos, ScreenOptions(still_images=True))
        assert (as_video.frames_analyzed, as_video.frames_skipped) == (1, 7)
        assert (as_stills.frames_analyzed, as_stills.frames_skipped) == (8, 0) and as_stills.status == "final"
    finally:
        running.stop(grace_s=1.0)


def test_screen_photos_sends_a_set_that_fits_in_one_request_and_a_larger_one_as_still_images(portrait_bgr: np.ndarray) -> None:
    """Two photos fit the client's message limit here, three do not: the two go in one ScreenImages
    request (no stream events), the three as a stream; under the server's rate cap every photo is
    analysed either way."""
    running = start_server(metrics_port=-1, max_analysis_fps=5.0)
    try:
        photo = jpeg_bytes(portrait_bgr)
        limit = REQUEST_FRAMING_BYTES + 2 * len(photo) + len(photo) // 2

        def photos(count: int) -> Iterator[FrameData]:  # read as they are sent, as from a folder
            return (FrameData(photo, ImageKind.JPEG, index=i) for i in range(count))

        two_events: list[object] = []
        three_events: list[object] = []
        with ScreeningClient(f"127.0.0.1:{running.port}", timeout_s=60, max_message_bytes=limit) as photo_client:
            two = photo_client.screen_photos(photos(2), ScreenOptions(subject_id="P-2"), on_event=two_events.append)
            three = photo_client.screen_photos(photos(3), ScreenOptions(subject_id="P-3"), on_event=three_events.append)
        assert two_events == [] and (two.subject_id, two.frames_analyzed, two.status) == ("P-2", 2, "final")
        assert sorted(e.index for e in three_events if isinstance(e, FrameResult)) == [0, 1, 2]
        assert (three.subject_id, three.frames_analyzed, three.frames_skipped) == ("P-3", 3, 0)
    finally:
        running.stop(grace_s=1.0)


def test_the_same_photos_give_the_same_result_in_one_request_or_as_a_stream(client: ScreeningClient, shared_data: Path) -> None:
    """A photo set too large for one request goes as a still-image stream. That stream scored
    from 3 photos (the video setting) and followed a face from one photo to the next, so the same
    photos could come back insufficient_evidence, or with faces "changed", by file size alone."""
    people = sorted((shared_data / "faces" / "identities").iterdir())
    sets = {
        "one person": sorted(people[0].glob("*.jpg"))[:2],
        "four people": [sorted(person.glob("*.jpg"))[0] for person in people[1:5]],
    }
    for name, paths in sets.items():
        photos = [FrameData(path.read_bytes(), ImageKind.JPEG, index=i) for i, path in enumerate(paths)]
        options = ScreenOptions(subject_id=name, still_images=True)
        one_request = client.screen_images(photos, options)
        stream = client.screen(photos, options)
        assert stream.status == one_request.status == "final", name
        assert (stream.frames_analyzed, stream.rejected) == (one_request.frames_analyzed, one_request.rejected), name
        assert stream.predicted_score == one_request.predicted_score, name
        assert np.allclose(stream.probabilities, one_request.probabilities, atol=1e-4), name


def test_rate_limited_stream_analyses_the_sharpest_frame_of_each_interval(portrait_bgr: np.ndarray) -> None:
    """Five blurred frames and one sharp one per 200 ms interval: the sharp ones are analysed, acked at once."""
    running = start_server(metrics_port=0, max_analysis_fps=5.0)
    try:
        sharp, blurred = jpeg_bytes(portrait_bgr), jpeg_bytes(cv2.GaussianBlur(portrait_bgr, (0, 0), 3.0))
        frames = [FrameData(sharp if i % 6 == 3 else blurred, ImageKind.JPEG, index=i, timestamp_us=i * 33_334)
                  for i in range(30)]
        with ScreeningClient(f"127.0.0.1:{running.port}", timeout_s=60) as rate_client:
            events = list(rate_client.screen_stream(frames, ScreenOptions(analyze_every_frame=True, acknowledge_frames=True)))
        analyzed = [e.index for e in events if isinstance(e, FrameResult) and e.status == "analyzed"]
        assert analyzed == [3, 9, 15, 21, 27]
        answered = [e.index for e in events if isinstance(e, FrameResult)]
        assert sorted(answered) == list(range(30))  # every frame answered once: analysed or skipped
        final = events[-1]
        assert isinstance(final, SubjectResult) and (final.frames_analyzed, final.frames_skipped) == (5, 25)
        order = [(type(e).__name__, e.index) for e in events if isinstance(e, (FrameAck, FrameResult))]
        assert all(order.index(("FrameAck", i)) < order.index(("FrameResult", i)) for i in analyzed)
        text = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=5).read().decode()
        assert 'acroscreen_stage_seconds_count{stage="preview"} 30.0' in text

        # With a cap of 2 analysed frames, the best of the first two intervals; no previews once it is reached.
        with ScreeningClient(f"127.0.0.1:{running.port}", timeout_s=60) as rate_client:
            capped = list(rate_client.screen_stream(frames, ScreenOptions(analyze_every_frame=True, max_analyzed_frames=2)))
        assert [e.index for e in capped if isinstance(e, FrameResult) and e.status == "analyzed"] == [3, 9]
        assert sorted(e.index for e in capped if isinstance(e, FrameResult)) == list(range(30))
        text = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=5).read().decode()
        previews = float(text.split('acroscreen_stage_seconds_count{stage="preview"} ')[1].split()[0])
        assert 30 < previews < 60
    finally:
        running.stop(grace_s=1.0)



def test_frames_a_few_pixels_high_and_jpegs_with_fill_bytes(client: ScreeningClient, portrait_bgr: np.ndarray) -> None:
    """A 4096×4 frame is within the pixel limit: its detection copy was 0 pixels high, so it failed
    as an internal error (logged, counted as an inference failure) instead of having no face. Fill
    bytes before a JPEG marker are legal (T.81 B.1.1.2), and the header check rejected them."""
    stripe = np.full((4, 4096, 3), 128, np.uint8)
    good = jpeg_bytes(portrait_bgr)
    frames = [FrameData(stripe.tobytes(), ImageKind.RAW_BGR24, index=0, width=4096, height=4),
              FrameData(png_bytes(stripe.transpose(1, 0, 2).copy()), ImageKind.PNG, index=1),
              FrameData(good[:2] + b"\xff\xff" + good[2:], ImageKind.JPEG, index=2)]
    events = list(client.screen_stream(frames, ScreenOptions(analyze_every_frame=True)))
    by_index = {e.index: e for e in events if isinstance(e, FrameResult)}
    assert [by_index[i].reject_reason for i in (0, 1)] == ["no_face", "no_face"]
    assert by_index[2].status == "analyzed"
