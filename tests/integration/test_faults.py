"""Malformed input, limits, disconnects: the server answers, frees everything and goes on."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest
from acroscreen.client import (
    FrameData,
    FrameResult,
    ImageKind,
    ScreeningClient,
    ScreenOptions,
    SubjectResult,
)
from acroscreen.client.cli import main as cli_main
from acroscreen.client.errors import ServerBusyError, UnavailableError
from acroscreen.server.errors import INFERENCE_FAILED
from acroscreen.server.main import RunningServer
from acroscreen.server.service import pipeline
from acroscreen.v1 import screening_pb2 as pb
from acroscreen.v1 import screening_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import jpeg_bytes, png_bytes

from .conftest import start_server


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[RunningServer]:
    running = start_server(metrics_port=-1, max_streams=8)
    yield running
    running.stop(grace_s=1.0)


def _stub(server: RunningServer) -> tuple[grpc.Channel, pb_grpc.ScreeningStub]:
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    return channel, pb_grpc.ScreeningStub(channel)


def _reference_run(server: RunningServer, portrait: np.ndarray) -> SubjectResult:
    frames = [FrameData(jpeg_bytes(np.roll(portrait, shift, axis=1)), ImageKind.JPEG, index=i) for i, shift in enumerate((0, 6, 12))]
    with ScreeningClient(f"127.0.0.1:{server.port}", timeout_s=60) as client:
        return client.screen(frames, ScreenOptions(subject_id="reference", analyze_every_frame=True))


def _gradient(size: int) -> np.ndarray:
    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    return np.dstack([np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), np.full((size, size), 128, np.uint8)])


_VALID_JPEG = jpeg_bytes(_gradient(96))
_VALID_PNG = png_bytes(_gradient(96))
frame_payloads = st.one_of(
    st.binary(max_size=2048).map(lambda data: pb.Frame(jpeg=data)),
    st.binary(max_size=2048).map(lambda data: pb.Frame(png=data)),
    st.integers(0, len(_VALID_JPEG) - 1).map(lambda cut: pb.Frame(jpeg=_VALID_JPEG[:cut])),  # truncated JPEG
    st.integers(0, len(_VALID_PNG) - 1).map(lambda cut: pb.Frame(png=_VALID_PNG[:cut])),  # truncated PNG
    st.builds(
        lambda w, h, fmt, data: pb.Frame(raw=pb.RawImage(width=w, height=h, format=fmt, data=data)),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**31 - 1),  # unknown enum values included
        st.binary(max_size=4096),
    ),
    st.just(pb.Frame()),  # no image at all
)


def _png_declaring(width: int, height: int) -> bytes:
    data = bytearray(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    data[16:20] = width.to_bytes(4, "big")
    data[20:24] = height.to_bytes(4, "big")
    return bytes(data)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.lists(frame_payloads, min_size=0, max_size=6), options_again_at=st.one_of(st.none(), st.integers(0, 5)))
def test_fuzzed_streams_get_rejections_or_invalid_argument(fuzz_server: RunningServer, frames, options_again_at) -> None:
    requests = [pb.ScreenRequest(options=pb.SessionOptions(subject_id="fuzz", analyze_every_frame=True))]
    for i, frame in enumerate(frames):
        if options_again_at == i:
            requests.append(pb.ScreenRequest(options=pb.SessionOptions()))
        frame.index = i
        requests.append(pb.ScreenRequest(frame=frame))
    channel, stub = _stub(fuzz_server)
    with channel:
        try:
            responses = list(stub.ScreenStream(iter(requests), timeout=60))
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
            assert options_again_at is not None and options_again_at < len(frames)
            return
    frame_results = [r.frame_result for r in responses if r.WhichOneof("payload") == "frame_result"]
    assert len(frame_results) == len(frames)
    assert all(r.status in (pb.FRAME_STATUS_REJECTED, pb.FRAME_STATUS_ANALYZED) for r in frame_results)
    final = responses[-1].subject
    assert final.frames_received == len(frames)


def test_bytes_that_are_not_protobuf_are_invalid_argument_and_a_stream_keeps_its_result(
    fuzz_server: RunningServer, portrait_bgr
) -> None:
    """grpc's own deserialization failure was INTERNAL with an ERROR log line, and a stream lost the
    final result of the frames before the bad message."""
    garbage = b"\x0a\x05\xff\xfe\xfd\xfc\xfb"  # field 1, length 5, not valid UTF-8 where a string is due
    channel = grpc.insecure_channel(f"127.0.0.1:{fuzz_server.port}")
    with channel:
        info = channel.unary_unary("/acroscreen.v1.Screening/GetModelInfo", request_serializer=bytes,
                                   response_deserializer=pb.ModelInfo.FromString)
        with pytest.raises(grpc.RpcError) as refused:
            info(b"\xff\xff\xff", timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stream = channel.stream_stream("/acroscreen.v1.Screening/ScreenStream", request_serializer=bytes,
                                       response_deserializer=pb.ScreenResponse.FromString)
        requests = [pb.ScreenRequest(options=pb.SessionOptions(analyze_every_frame=True)).SerializeToString(),
                    pb.ScreenRequest(frame=pb.Frame(index=0, jpeg=jpeg_bytes(portrait_bgr))).SerializeToString(),
                    pb.ScreenRequest(frame=pb.Frame(index=1)).SerializeToString() + garbage]
        responses = []
        with pytest.raises(grpc.RpcError) as ended:
            for response in stream(iter(requests), timeout=60):
                responses.append(response)
    assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "protobuf" in ended.value.details()
    assert [r.frame_result.index for r in responses if r.WhichOneof("payload") == "frame_result"] == [0]
    final = responses[-1].subject  # the last answer: no longer provisional (one frame is too few for a score)
    assert final.status == pb.SUBJECT_STATUS_INSUFFICIENT_EVIDENCE and final.frames_analyzed == 1


def test_hostile_frames_then_a_normal_stream_matches_a_fresh_server(fuzz_server: RunningServer, portrait_bgr) -> None:
    good, good_png = jpeg_bytes(portrait_bgr), png_bytes(portrait_bgr)
    hostile = [
        pb.Frame(png=_png_declaring(100_000, 100_000)),
        pb.Frame(png=_png_declaring(2**31, 1)),
        pb.Frame(jpeg=good[: len(good) // 2]),
        pb.Frame(png=good_png[: len(good_png) // 2]),
        pb.Frame(raw=pb.RawImage(width=2**32 - 1, height=2**32 - 1, format=pb.PIXEL_FORMAT_BGR24, data=b"\x00" * 100)),
        pb.Frame(raw=pb.RawImage(width=10, height=10, format=99, data=b"\x00" * 300)),
    ]
    channel, stub = _stub(fuzz_server)
    with channel:
        requests = [pb.ScreenRequest(options=pb.SessionOptions(analyze_every_frame=True))]
        requests += [pb.ScreenRequest(frame=frame) for frame in hostile]
        responses = list(stub.ScreenStream(iter(requests), timeout=60))
    reasons = [r.frame_result.reject_reason for r in responses if r.WhichOneof("payload") == "frame_result"]
    assert reasons == [
        pb.REJECT_REASON_TOO_LARGE,
        pb.REJECT_REASON_TOO_LARGE,
        pb.REJECT_REASON_DECODE_FAILED,
        pb.REJECT_REASON_DECODE_FAILED,
        pb.REJECT_REASON_TOO_LARGE,
        pb.REJECT_REASON_BAD_FORMAT,
    ]
    after_abuse = _reference_run(fuzz_server, portrait_bgr)
    fresh = start_server(metrics_port=-1)
    try:
        baseline = _reference_run(fresh, portrait_bgr)
    finally:
        fresh.stop(grace_s=1.0)
    assert after_abuse.frames_analyzed == baseline.frames_analyzed == 3
    assert after_abuse.probabilities == pytest.approx(baseline.probabilities, abs=1e-5)


@pytest.mark.parametrize("max_analysis_fps", [0.0, 5.0], ids=["backlog", "best-frame-per-interval"])
def test_disconnect_storm_leaves_no_state(portrait_bgr, max_analysis_fps: float) -> None:
    running = start_server(max_streams=16, max_analysis_fps=max_analysis_fps)
    try:
        good = jpeg_bytes(portrait_bgr)

        def endless() -> Iterator[pb.ScreenRequest]:
            yield pb.ScreenRequest(options=pb.SessionOptions(analyze_every_frame=True))
            index = 0
            while True:
                yield pb.ScreenRequest(frame=pb.Frame(index=index, timestamp_us=index * 10_000, jpeg=good))
                index += 1
                time.sleep(0.01)

        channels = [grpc.insecure_channel(f"127.0.0.1:{running.port}") for _ in range(8)]
        calls = [pb_grpc.ScreeningStub(channel).ScreenStream(endless(), timeout=60) for channel in channels]
        for call in calls:
            next(call)  # every stream has produced a result
        assert running.service.active_streams == 8
        for call in calls:
            call.cancel()
        for channel in channels:
            channel.close()
        _wait_until(lambda: running.service.active_streams == 0, 15)
        assert running.service.active_streams == 0
        metrics = running.metrics
        assert metrics.active_streams._value.get() == 0
        queues = [metrics.queue_depth.labels(queue=name) for name in ("analysis", "inference")]
        _wait_until(lambda: not any(q._value.get() for q in queues), 10)
        assert [q._value.get() for q in queues] == [0, 0]
        # Faces whose stream ended while they waited for the model are skipped, not model failures.
        assert metrics.frames_rejected.labels(reason="inference_failed")._value.get() == 0
    finally:
        running.stop(grace_s=1.0)


def test_frame_limit_ends_the_stream_with_its_final_result(
    portrait_bgr, shared_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    running = start_server(metrics_port=-1, max_frames_per_stream=3)
    try:
        frames = [FrameData(jpeg_bytes(portrait_bgr), ImageKind.JPEG, index=i) for i in range(5)]
        with ScreeningClient(f"127.0.0.1:{running.port}", timeout_s=60) as client:
            with pytest.raises(ServerBusyError) as caught:
                client.screen(frames, ScreenOptions(analyze_every_frame=True))
        final = caught.value.final_result
        assert isinstance(final, SubjectResult) and final.status == "final"
        assert final.frames_received == 3 and final.frames_analyzed == 3
        assert caught.value.retry_after_s is None  # the same frames would meet the same limit: no retry hint

        # The CLI printed only the error and threw the result away: now the result, then the error.
        video = shared_data / "videos" / "retalking_face1.mp4"
        assert cli_main(["screen", str(video), "--json", "--server", f"127.0.0.1:{running.port}"]) == 1
        printed = capsys.readouterr()
        assert json.loads(printed.out)["frames_received"] == 3 and "stream limit of 3 frames" in printed.err
    finally:
        running.stop(grace_s=1.0)


def test_idle_stream_is_finished_with_its_result(portrait_bgr) -> None:
    running = start_server(metrics_port=-1, idle_timeout_s=1.0)
    try:
        release = threading.Event()

        def requests() -> Iterator[pb.ScreenRequest]:
            yield pb.ScreenRequest(options=pb.SessionOptions(analyze_every_frame=True))
            yield pb.ScreenRequest(frame=pb.Frame(index=0, jpeg=jpeg_bytes(portrait_bgr)))
            release.wait(20)  # the client goes quiet without closing

        channel, stub = _stub(running)
        with channel:
            started = time.monotonic()
            responses = list(stub.ScreenStream(requests(), timeout=30))
            elapsed = time.monotonic() - started
        release.set()
        final = responses[-1].subject
        assert final.status == pb.SUBJECT_STATUS_INSUFFICIENT_EVIDENCE and final.frames_received == 1
        assert elapsed < 10
        assert running.service.active_streams == 0
    finally:
        running.stop(grace_s=1.0)


def test_per_token_quota(portrait_bgr) -> None:
    token = "quota-token-0123456789abcdef"
    running = start_server(metrics_port=-1, auth_tokens=token, max_streams_per_token=1)
    try:
        gate = threading.Event()
        metadata = (("authorization", f"Bearer {token}"),)

        channel, stub = _stub(running)
        with channel:
            first = stub.ScreenStream(_held_stream(gate), timeout=30, metadata=metadata)
            _wait_until(lambda: running.service.active_streams > 0, 10)
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.ScreenStream(iter([pb.ScreenRequest(options=pb.SessionOptions())]), timeout=30, metadata=metadata))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            gate.set()
            assert list(first)[-1].subject.status == pb.SUBJECT_STATUS_INSUFFICIENT_EVIDENCE
    finally:
        running.stop(grace_s=1.0)


def test_a_corrupt_weights_file_stops_the_server_at_start(tmp_path) -> None:
    from acroscreen.server.errors import ModelError

    corrupt = tmp_path / "model.safetensors"
    corrupt.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    with pytest.raises(ModelError, match="model.safetensors"):
        start_server(model=corrupt, metrics_port=-1)


def test_load_limits_hold_and_admitted_streams_finish(portrait_bgr) -> None:
    """8 clients at once against 3 stream slots: 3 finish with a final result, 5 are refused."""
    running = start_server(metrics_port=-1, max_streams=3)
    try:
        good = jpeg_bytes(portrait_bgr)
        gate = threading.Barrier(8)
        outcomes: list[str] = []
        lock = threading.Lock()

        def client_run() -> None:
            def frames():  # ~1.8 s per stream, so the admitted three still hold their slots
                for index in range(6):
                    yield FrameData(good, ImageKind.JPEG, index=index)
                    time.sleep(0.3)

            gate.wait(10)
            try:
                with ScreeningClient(f"127.0.0.1:{running.port}", timeout_s=60) as client:
                    result = client.screen(frames(), ScreenOptions(analyze_every_frame=True))
                outcome = f"final:{result.frames_received}"
            except ServerBusyError:
                outcome = "busy"
            with lock:
                outcomes.append(outcome)

        rss_before = _rss_mb()
        threads = [threading.Thread(target=client_run) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
        assert sorted(outcomes) == ["busy"] * 5 + ["final:6"] * 3
        assert running.service.active_streams == 0
        assert _rss_mb() - rss_before < 300
    finally:
        running.stop(grace_s=1.0)


def test_client_retries_until_the_server_is_up(portrait_bgr) -> None:
    """UNAVAILABLE before anything was sent is retried with backoff; nothing is lost."""
    import socket

    from acroscreen.client import RetryPolicy

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started: list[RunningServer] = []
    timer = threading.Timer(1.0, lambda: started.append(start_server(port=port, metrics_port=-1)))
    timer.start()
    try:
        with ScreeningClient(f"127.0.0.1:{port}", timeout_s=60, retry=RetryPolicy(attempts=8, initial_backoff_s=0.3)) as client:
            result = client.screen_images([FrameData(jpeg_bytes(portrait_bgr), ImageKind.JPEG)])
        assert result.frames_received == 1 and result.frames_analyzed == 1
    finally:
        timer.join()
        for running in started:
            running.stop(grace_s=1.0)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


def test_a_full_inference_queue_sheds_frames_with_a_reason_and_every_stream_finishes(portrait_bgr) -> None:
    """Queue of 1 face, 4 streams analysing every frame: shed frames come back REJECTED overloaded; none is lost."""
    running = start_server(metrics_port=-1, max_batch_size=1, batch_queue_capacity=1)
    try:
        frames = [FrameData(jpeg_bytes(np.roll(portrait_bgr, 4 * i, axis=1)), ImageKind.JPEG, index=i) for i in range(8)]
        outcomes: dict[str, list] = {}

        def stream(name: str) -> None:
            with ScreeningClient(f"127.0.0.1:{running.port}", timeout_s=120) as client:
                outcomes[name] = list(client.screen_stream(frames, ScreenOptions(subject_id=name, analyze_every_frame=True)))

        threads = [threading.Thread(target=stream, args=(f"s{i}",)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert sorted(outcomes) == ["s0", "s1", "s2", "s3"]
        shed = 0
        for events in outcomes.values():
            results = [e for e in events if isinstance(e, FrameResult)]
            assert sorted(r.index for r in results) == list(range(8))  # every frame answered once
            overloaded = [r for r in results if r.reject_reason == "overloaded"]
            assert all("shed" in r.detail for r in overloaded)
            shed += len(overloaded)
            final = events[-1]
            assert isinstance(final, SubjectResult) and final.status != "provisional"  # final, or too few frames
            assert final.frames_analyzed + sum(final.rejected.values()) == 8
        assert shed > 0, "four streams on a one-face queue should have shed some frames"
    finally:
        running.stop(grace_s=1.0)
    # The shedding is visible in the metrics too, under the reason the frames and subject results gave.
    rejected_overloaded = sum(events[-1].rejected.get("overloaded", 0) for events in outcomes.values())
    assert rejected_overloaded == shed
    assert running.metrics.frames_rejected.labels(reason="overloaded")._value.get() == shed


Batch = Sequence[np.ndarray]
BatchRunner = Callable[[Batch], list]


def _start_with_model(monkeypatch: pytest.MonkeyPatch, wrap: Callable[[BatchRunner], BatchRunner], **overrides: object) -> RunningServer:
    """A real server whose model batches go through `wrap(real runner)`: a fault or a delay at the model's edge."""
    real = pipeline.model_batch_runner
    monkeypatch.setattr(pipeline, "model_batch_runner", lambda predict: wrap(real(predict)))
    return start_server(metrics_port=-1, **overrides)


def _slow_model(seconds: float, calls: list[int] | None = None) -> Callable[[BatchRunner], BatchRunner]:
    """`calls` gets each batch's size as the model starts it: a face counts once it reached the model."""

    def wrap(run: BatchRunner) -> BatchRunner:
        def slow(crops: Batch) -> list:
            if calls is not None:
                calls.append(len(crops))
            time.sleep(seconds)
            return run(crops)

        return slow

    return wrap


def _held_stream(gate: threading.Event) -> Iterator[pb.ScreenRequest]:
    """A stream that opens a session and sends nothing more until the gate is set (at most 20 s)."""
    yield pb.ScreenRequest(options=pb.SessionOptions())
    gate.wait(20)


def _wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def _assert_no_state_left(running: RunningServer) -> None:
    """No stream open, no ScreenImages call under way, nothing queued for analysis or for the model."""
    depth = running.metrics.queue_depth
    assert _wait_until(lambda: running.service.active_streams == 0, 10)
    assert _wait_until(lambda: running.service.active_image_calls == 0, 10)
    assert running.metrics.active_streams._value.get() == 0
    assert _wait_until(lambda: depth.labels(queue="analysis")._value.get() == 0, 10)
    assert _wait_until(lambda: depth.labels(queue="inference")._value.get() == 0, 10)


def _marked(crop: np.ndarray) -> bool:
    """A crop of a colour-swapped frame (blue face): the one the test's model fails on."""
    return float(crop[..., 2].mean()) > float(crop[..., 0].mean())


def test_a_failing_batch_fails_only_its_bad_frame_with_a_fixed_message(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, portrait_bgr
) -> None:
    """The model raises for any batch holding a marked face: the batch is split until that face fails alone."""
    secret = "CUDA out of memory at 0x7f3a1c (simulated)"
    calls: list[list[bool]] = []

    def failing(run: BatchRunner) -> BatchRunner:
        def run_or_fail(crops: Batch) -> list:
            marks = [_marked(crop) for crop in crops]
            calls.append(marks)
            if any(marks):
                raise RuntimeError(secret)
            return run(crops)

        return run_or_fail

    # Batches of exactly three (the delay is never what closes one): frames 0-2 and 3-5, each with one bad face.
    running = _start_with_model(monkeypatch, failing, max_batch_size=3, max_batch_delay_ms=5000)
    try:
        bad = {1, 4}
        shifted = [np.roll(portrait_bgr, 4 * i, axis=1) for i in range(6)]
        frames = [
            FrameData(jpeg_bytes(image[..., ::-1] if i in bad else image), ImageKind.JPEG, index=i)  # bad: blue face
            for i, image in enumerate(shifted)
        ]
        with (
            caplog.at_level(logging.ERROR, logger="acroscreen.server.service.batcher"),
            ScreeningClient(f"127.0.0.1:{running.port}", timeout_s=60) as client,
        ):
            events = list(client.screen_stream(frames, ScreenOptions(subject_id="faulty", analyze_every_frame=True)))
            after = client.screen(frames[:1] + frames[2:4], ScreenOptions(subject_id="next", analyze_every_frame=True))
        results = {e.index: e for e in events if isinstance(e, FrameResult)}
        assert sorted(results) == list(range(6))
        for index, result in results.items():
            if index in bad:
                assert (result.status, result.reject_reason, result.detail) == ("rejected", "inference_failed", INFERENCE_FAILED)
            else:
                assert result.status == "analyzed"
        final = events[-1]
        assert isinstance(final, SubjectResult) and final.status == "final"
        assert final.frames_analyzed == 4 and final.rejected == {"inference_failed": 2}
        assert secret not in repr(events)
        split_until_alone = [[False, True, False], [False], [True, False], [True], [False]]
        assert calls[:10] == split_until_alone * 2  # each failing batch halved until its bad face failed alone
        assert after.status == "final" and after.frames_analyzed == 3  # the server keeps serving
        failures = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(failures) == 2  # once per failing batch, not once per retry
        assert all("RuntimeError" in r.getMessage() and "faulty" not in r.getMessage() for r in failures)
        assert running.metrics.frames_rejected.labels(reason="inference_failed")._value.get() == 2
    finally:
        running.stop(grace_s=1.0)


def test_a_full_backlog_skips_frames_promptly_and_says_so(monkeypatch: pytest.MonkeyPatch, portrait_bgr) -> None:
    """A live stream at 20 frames/s against a model taking 0.4 s a face: frames the backlog cannot take are
    answered SKIPPED (backlog_full) at once, so every frame is answered within a bound instead of queueing."""
    running = _start_with_model(monkeypatch, _slow_model(0.4), max_batch_size=1, analysis_backlog=1)
    try:
        good = jpeg_bytes(portrait_bgr)
        count = 30
        sent_at: dict[int, float] = {}

        def requests() -> Iterator[pb.ScreenRequest]:
            yield pb.ScreenRequest(options=pb.SessionOptions(subject_id="live", acknowledge_frames=True))
            for index in range(count):
                sent_at[index] = time.monotonic()
                yield pb.ScreenRequest(frame=pb.Frame(index=index, timestamp_us=index * 50_000, jpeg=good))
                time.sleep(0.05)

        answered_at: dict[int, float] = {}
        skipped: list[int] = []
        channel, stub = _stub(running)
        with channel:
            for response in stub.ScreenStream(requests(), timeout=60):
                kind = response.WhichOneof("payload")
                if kind == "frame_ack":
                    answered_at.setdefault(response.frame_ack.index, time.monotonic())
                elif kind == "frame_result" and response.frame_result.status == pb.FRAME_STATUS_SKIPPED:
                    answered_at.setdefault(response.frame_result.index, time.monotonic())
                    skipped.append(response.frame_result.index)
                    assert "backlog full" in response.frame_result.detail
                elif kind == "subject":
                    final = response.subject
        assert sorted(answered_at) == list(range(count)), "every frame is acknowledged or skipped"
        worst = max(answered_at[i] - sent_at[i] for i in range(count))
        # Answers come in milliseconds here; 3 s is slack for a loaded 2-core CI VM. Queueing behind the
        # model instead would make the last frame wait ~0.35 s x 30 = 10 s.
        assert worst < 3.0, f"a frame waited {worst:.2f} s for its answer; the model alone would take {0.4 * count:.0f} s"
        # ~27 of 30 are skipped here (the model takes 8 frame intervals a face); a third allows for a sender
        # slowed down by a loaded VM, and is still far more than a backlog that never fills would skip.
        assert len(skipped) >= count // 3
        assert final.status != pb.SUBJECT_STATUS_PROVISIONAL
        assert final.frames_skipped == len(skipped) and final.frames_analyzed == count - len(skipped)
        assert running.metrics.frames_skipped.labels(policy="backlog_full")._value.get() == len(skipped)
    finally:
        running.stop(grace_s=1.0)


def test_client_deadlines_end_both_calls_and_free_everything(monkeypatch: pytest.MonkeyPatch, portrait_bgr) -> None:
    """A slow model (0.3 s a face): ScreenStream and ScreenImages past their deadline end DEADLINE_EXCEEDED,
    the server stops working for them (no further model calls) and every gauge returns to zero."""
    calls: list[int] = []
    running = _start_with_model(monkeypatch, _slow_model(0.3, calls), max_batch_size=1)
    try:
        images = [jpeg_bytes(np.roll(portrait_bgr, 4 * i, axis=1)) for i in range(8)]

        def endless() -> Iterator[pb.ScreenRequest]:
            yield pb.ScreenRequest(options=pb.SessionOptions(analyze_every_frame=True))
            for index in range(10_000):
                yield pb.ScreenRequest(frame=pb.Frame(index=index, jpeg=images[index % len(images)]))
                time.sleep(0.02)

        channel, stub = _stub(running)
        with channel:
            with pytest.raises(grpc.RpcError) as caught:
                for _ in stub.ScreenStream(endless(), timeout=1.5):
                    pass
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            _assert_no_state_left(running)

            calls.clear()
            request = pb.ScreenImagesRequest(
                options=pb.SessionOptions(subject_id="photos"), images=[pb.Frame(index=i, jpeg=image) for i, image in enumerate(images)]
            )
            with pytest.raises(grpc.RpcError) as caught:
                stub.ScreenImages(request, timeout=1.0)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # The handler has ended (no call under way) and nothing waits for the model: no face of
            # this request can reach the model any more.
            _assert_no_state_left(running)
            settled = len(calls)
            assert settled < len(images), "faces of an abandoned request should not reach the model"
        assert _reference_run(running, portrait_bgr).frames_analyzed == 3  # and the server goes on
        assert len(calls) == settled + 3, "only the next run's three faces reached the model"
    finally:
        running.stop(grace_s=1.0)


def _screening_in_background(running: RunningServer, frames: Iterator[FrameData]) -> tuple[threading.Thread, list[object]]:
    """A thread screening `frames` (every frame analysed), and the list that gets its result or its exception."""
    outcome: list[object] = []

    def screen() -> None:
        with ScreeningClient(f"127.0.0.1:{running.port}", timeout_s=60) as client:
            try:
                outcome.append(client.screen(frames, ScreenOptions(analyze_every_frame=True)))
            except Exception as error:  # noqa: BLE001 — examined by the test
                outcome.append(error)

    stream = threading.Thread(target=screen)
    stream.start()
    return stream, outcome


def test_a_stream_that_outlives_the_drains_grace_gets_its_final_result(portrait_bgr) -> None:
    """A stream still sending when the grace period ran out was cut off by the gRPC server's stop:
    UNAVAILABLE "Cancelling all calls", no request id, and the result of every frame it had analysed
    lost. It now gets its final result for those, then UNAVAILABLE saying the server shut down."""
    running = start_server(metrics_port=-1)
    frame = jpeg_bytes(portrait_bgr)
    sent = threading.Event()

    def endless() -> Iterator[FrameData]:
        for index in range(600):
            yield FrameData(frame, ImageKind.JPEG, index=index)
            if index == 5:
                sent.set()
            time.sleep(0.05)

    stream, outcome = _screening_in_background(running, endless())
    try:
        assert sent.wait(30)
        started = time.monotonic()
        running.stop(grace_s=1.0)
        assert time.monotonic() - started < 5
    finally:
        stream.join(30)
    (failure,) = outcome
    assert isinstance(failure, UnavailableError) and "shutting down" in str(failure) and failure.request_id
    final = failure.final_result
    assert isinstance(final, SubjectResult) and final.status == "final" and final.frames_analyzed >= 5


def test_a_stream_that_half_closed_before_the_grace_ran_out_ends_as_usual(monkeypatch: pytest.MonkeyPatch, portrait_bgr) -> None:
    """Its client had closed (its frames were still being analysed, 0.5 s each): it was ended like
    a stream still sending, and the client got UNAVAILABLE after its final result."""
    running = _start_with_model(monkeypatch, _slow_model(0.5), max_batch_size=1)
    frame = jpeg_bytes(portrait_bgr)
    sent_all = threading.Event()

    def three() -> Iterator[FrameData]:
        for index in range(3):
            yield FrameData(frame, ImageKind.JPEG, index=index)
        sent_all.set()

    stream, outcome = _screening_in_background(running, three())
    try:
        assert sent_all.wait(30)
        time.sleep(0.2)  # the half-close reaches the server: only analysis is left (1.5 s)
        running.stop(grace_s=1.0)
    finally:
        stream.join(30)
    (result,) = outcome
    assert isinstance(result, SubjectResult) and result.status == "final" and result.frames_analyzed == 3, result


def test_a_flood_of_calls_beyond_the_call_limit_is_refused_at_once(monkeypatch: pytest.MonkeyPatch, portrait_bgr) -> None:
    """--max-streams 1 admits one ScreenImages call at a time: of 16 simultaneous ones against a slow model
    (two faces of 1 s each), the calls that find one under way get RESOURCE_EXHAUSTED with a retry hint
    without waiting, the admitted ones their final result; health checks answer SERVING throughout."""
    running = _start_with_model(monkeypatch, _slow_model(1.0), max_batch_size=1, max_streams=1)
    try:
        images = [pb.Frame(index=i, jpeg=jpeg_bytes(np.roll(portrait_bgr, 4 * i, axis=1))) for i in range(2)]
        request = pb.ScreenImagesRequest(options=pb.SessionOptions(subject_id="photos"), images=images)
        flood = 16
        gate = threading.Barrier(flood)
        outcomes: list[tuple[str, float]] = []
        pushbacks: set[str] = set()
        lock = threading.Lock()
        channel, stub = _stub(running)
        health = health_pb2_grpc.HealthStub(channel)

        def call() -> None:
            gate.wait(10)
            started = time.monotonic()
            try:
                outcome = "final" if stub.ScreenImages(request, timeout=60).status == pb.SUBJECT_STATUS_FINAL else "other"
            except grpc.RpcError as error:
                outcome = error.code().name
                with lock:
                    pushbacks.update(value for key, value in error.trailing_metadata() or () if key == "grpc-retry-pushback-ms")
            with lock:
                outcomes.append((outcome, time.monotonic() - started))

        with channel:
            threads = [threading.Thread(target=call) for _ in range(flood)]
            for thread in threads:
                thread.start()
            checks: list[int] = []
            while any(thread.is_alive() for thread in threads):  # an admitted call holds for 2 s or more
                checks.append(health.Check(health_pb2.HealthCheckRequest(), timeout=5).status)
                time.sleep(0.1)
            for thread in threads:
                thread.join(90)
        refused = [seconds for outcome, seconds in outcomes if outcome == "RESOURCE_EXHAUSTED"]
        finished = [outcome for outcome, _ in outcomes if outcome != "RESOURCE_EXHAUSTED"]
        assert len(outcomes) == flood
        # Typically 15 refused and 1 final; a loaded VM may spread the calls so that some come after one ended.
        assert finished == ["final"] * len(finished) and 1 <= len(finished) <= flood // 2
        assert max(refused) < 2.0, "refused at once, not after the admitted calls (each takes 2 s or more)"
        assert pushbacks == {"1000"}, "refusals tell the client when to retry"
        assert checks and set(checks) == {health_pb2.HealthCheckResponse.SERVING}
        assert running.service.active_image_calls == 0
        assert _reference_run(running, portrait_bgr).frames_analyzed == 3  # and the server goes on
    finally:
        running.stop(grace_s=1.0)


def test_per_token_quota_counts_screen_images_apart_from_streams(monkeypatch: pytest.MonkeyPatch, portrait_bgr) -> None:
    """--max-streams-per-token 1: a caller holding a stream may still make one ScreenImages call, not a second
    at the same time; another caller's call is admitted meanwhile."""
    tokens = ("first-caller-0123456789", "second-caller-0123456789")
    running = _start_with_model(monkeypatch, _slow_model(1.0), max_batch_size=1, auth_tokens=",".join(tokens), max_streams_per_token=1)
    try:
        first, second = ((("authorization", f"Bearer {token}"),) for token in tokens)
        images = [pb.Frame(index=i, jpeg=jpeg_bytes(np.roll(portrait_bgr, 4 * i, axis=1))) for i in range(2)]
        request = pb.ScreenImagesRequest(options=pb.SessionOptions(), images=images)
        gate = threading.Event()

        channel, stub = _stub(running)
        with channel:
            stream = stub.ScreenStream(_held_stream(gate), timeout=30, metadata=first)
            assert _wait_until(lambda: running.service.active_streams == 1, 10)
            admitted = stub.ScreenImages.future(request, timeout=30, metadata=first)
            assert _wait_until(lambda: running.service.active_image_calls == 1, 10)
            with pytest.raises(grpc.RpcError) as caught:
                stub.ScreenImages(request, timeout=30, metadata=first)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "this caller" in (caught.value.details() or "")
            other = stub.ScreenImages.future(request, timeout=30, metadata=second)
            assert _wait_until(lambda: running.service.active_image_calls == 2 or other.done(), 10)
            assert admitted.result().status == pb.SUBJECT_STATUS_FINAL and other.result().status == pb.SUBJECT_STATUS_FINAL
            gate.set()
            assert list(stream)[-1].subject.status == pb.SUBJECT_STATUS_INSUFFICIENT_EVIDENCE
        _assert_no_state_left(running)
    finally:
        running.stop(grace_s=1.0)


def test_a_stream_past_its_longest_duration_gets_its_final_result(portrait_bgr) -> None:
    """max_stream_duration_s = 1: a client still sending after that gets the final result and RESOURCE_EXHAUSTED;
    so does a client gone quiet (it used to get an OK end, and frames it sent after were dropped unanswered)."""
    running = start_server(metrics_port=-1, max_stream_duration_s=1.0)
    try:
        good = jpeg_bytes(portrait_bgr)

        def frames() -> Iterator[FrameData]:
            for index in range(40):  # 4 s of frames
                yield FrameData(good, ImageKind.JPEG, index=index)
                time.sleep(0.1)

        with ScreeningClient(f"127.0.0.1:{running.port}", timeout_s=60) as client:
            started = time.monotonic()
            with pytest.raises(ServerBusyError, match="1 s") as caught:
                client.screen(frames(), ScreenOptions(analyze_every_frame=True))
            elapsed = time.monotonic() - started
        final = caught.value.final_result
        assert isinstance(final, SubjectResult) and final.status == "final"
        assert 5 <= final.frames_received < 40 and final.frames_analyzed == final.frames_received
        assert elapsed < 3.5

        release = threading.Event()

        def quiet() -> Iterator[pb.ScreenRequest]:
            yield pb.ScreenRequest(options=pb.SessionOptions(analyze_every_frame=True))
            yield pb.ScreenRequest(frame=pb.Frame(index=0, jpeg=good))
            release.wait(20)

        channel, stub = _stub(running)
        responses = []
        with channel:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as ended:
                for response in stub.ScreenStream(quiet(), timeout=30):
                    responses.append(response)
            elapsed = time.monotonic() - started
        release.set()
        assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "1 s" in ended.value.details()
        assert responses[-1].subject.frames_received == 1 and responses[-1].subject.status != pb.SUBJECT_STATUS_PROVISIONAL
        assert elapsed < 5  # the duration limit, not the 60 s idle timeout, ended it
        _assert_no_state_left(running)
    finally:
        running.stop(grace_s=1.0)


_STREAMING_CLIENT = """
import sys, time
import grpc
from acroscreen.v1 import screening_pb2 as pb, screening_pb2_grpc as pb_grpc

image = sys.stdin.buffer.read()

def requests():
    yield pb.ScreenRequest(options=pb.SessionOptions(analyze_every_frame=True))
    index = 0
    while True:
        yield pb.ScreenRequest(frame=pb.Frame(index=index, jpeg=image))
        index += 1
        time.sleep(0.01)

responses = pb_grpc.ScreeningStub(grpc.insecure_channel(sys.argv[1])).ScreenStream(requests())
next(responses)
print("streaming", flush=True)
for _ in responses:
    pass
"""


def test_client_processes_killed_mid_stream_leave_no_state(portrait_bgr) -> None:
    """A disconnect storm of real processes: six clients streaming are SIGKILLed (no goodbye on the wire)."""
    running = start_server(metrics_port=-1, max_streams=8)
    clients: list[subprocess.Popen] = []
    try:
        for _ in range(6):
            process = subprocess.Popen(
                [sys.executable, "-c", _STREAMING_CLIENT, f"127.0.0.1:{running.port}"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            )
            process.stdin.write(jpeg_bytes(portrait_bgr))
            process.stdin.close()
            clients.append(process)
        for process in clients:
            assert process.stdout.readline() == b"streaming\n"  # its stream is open and answering
        assert running.service.active_streams == 6
        for process in clients:
            process.send_signal(signal.SIGKILL)
        for process in clients:
            assert process.wait(10) == -signal.SIGKILL
        _assert_no_state_left(running)
        assert _reference_run(running, portrait_bgr).frames_analyzed == 3
    finally:
        for process in clients:
            if process.poll() is None:
                process.kill()
                process.wait(10)
            process.stdout.close()
        running.stop(grace_s=1.0)
