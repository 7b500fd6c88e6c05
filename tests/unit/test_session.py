"""A stream session's event order, without gRPC: the reader and the stream's worker are real threads."""

from __future__ import annotations

import queue
import threading
import time
import types
from pathlib import Path

import pytest

from acroscreen.server.metrics import Metrics
from acroscreen.server.runtime.decode import DecodeLimits
from acroscreen.server.runtime.preprocess import FacePreprocessor, PreprocessSettings
from acroscreen.server.runtime.types import EncodedImage, ImageEncoding
from acroscreen.server.service.aggregator import SubjectAggregator
from acroscreen.server.service.batcher import BatcherConfig, DynamicBatcher
from acroscreen.server.service.pipeline import FrameAnalyzer
from acroscreen.server.service import session as session_module
from acroscreen.server.service.session import StreamLimits, StreamSession
from acroscreen.server.service.types import FrameAck, FrameInput, FramePrediction, ModelRef, SessionOptions


class _ReaderDescheduledAfterQueueingAFrame(queue.Queue):
    """The reader loses the CPU for a while right after it queues a frame for analysis, as a
    busy worker process's reader thread does (seen on a 16-core GPU node under 48 streams)."""

    def put(self, item: object, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        if isinstance(item, FrameInput):
            time.sleep(0.05)


def _session(options: SessionOptions, limits: StreamLimits = StreamLimits()) -> StreamSession:
    metrics = Metrics()
    # Undecodable frames are answered before the model, so the batcher never runs.
    batcher: DynamicBatcher = DynamicBatcher(lambda crops: [], BatcherConfig(), metrics)
    analyzer = FrameAnalyzer(preprocessor=FacePreprocessor(PreprocessSettings()), batcher=batcher,
                             decode_limits=DecodeLimits(max_bytes=1 << 20, max_pixels=1 << 22), metrics=metrics)
    model = ModelRef(name="m", version="0", kind="test", sha256="")
    session = StreamSession(options=options, analyzer=analyzer, aggregator=SubjectAggregator("s", model, 1),
                            backlog_size=4, update_every_frames=1, limits=limits, metrics=metrics,
                            on_close=lambda session: None)
    return session


def _order_of_answers(options: SessionOptions) -> list[tuple[str, int]]:
    session = _session(options)
    for index in range(3):
        session.submit(FrameInput(index=index, timestamp_us=index * 33_333, received_at=time.monotonic(),
                                  image=EncodedImage(encoding=ImageEncoding.JPEG, data=b"\xff\xd8 not a jpeg")))
    session.finish()
    return [(type(e).__name__, e.index) for e in session.events() if isinstance(e, (FrameAck, FramePrediction))]


def test_a_frames_ack_comes_before_its_result_even_when_the_result_is_immediate(monkeypatch: pytest.MonkeyPatch) -> None:
    """A frame answered at once (here: undecodable) used to overtake its own ack when the reader
    was descheduled between queueing the frame and queueing the ack; clients key on the ack."""
    monkeypatch.setattr(session_module, "queue", types.SimpleNamespace(
        Queue=_ReaderDescheduledAfterQueueingAFrame, Empty=queue.Empty, Full=queue.Full))
    for options in (SessionOptions(acknowledge_frames=True, analyze_every_frame=True),
                    SessionOptions(acknowledge_frames=True)):
        order = _order_of_answers(options)
        assert len(order) == 6, order
        for index in range(3):
            assert order.index(("FrameAck", index)) < order.index(("FramePrediction", index)), (options, order)


def _undecodable(index: int) -> FrameInput:
    return FrameInput(index=index, timestamp_us=index * 33_333, received_at=time.monotonic(),
                      image=EncodedImage(encoding=ImageEncoding.JPEG, data=b"\xff\xd8 not a jpeg"))


def test_a_cancelled_stream_with_a_full_backlog_stops_at_once() -> None:
    """cancel() could not queue its end marker behind a full backlog, so the stream's worker waited
    for the idle timeout (60 s) and the handler 5 s in close(): under disconnect churn both piled up."""
    session = _session(SessionOptions(analyze_every_frame=True))
    portrait = (Path(__file__).parents[2] / "server" / "demo" / "eileen_collins_nasa.jpg").read_bytes()
    for index in range(4):  # a full backlog: each real face takes the worker milliseconds
        session.submit(FrameInput(index=index, timestamp_us=index * 33_333, received_at=time.monotonic(),
                                  image=EncodedImage(encoding=ImageEncoding.JPEG, data=portrait)))
    session.cancel()
    started = time.monotonic()
    list(session.events())
    assert time.monotonic() - started < 2.0
    assert session.backlog_depth == 0
    session._worker.join(timeout=2.0)
    assert not session._worker.is_alive()


def _sample(session: StreamSession, name: str) -> float:
    return sum(sample.value for metric in session._metrics.registry.collect() for sample in metric.samples
               if sample.name == name + "_total")


@pytest.mark.parametrize("options", [SessionOptions(analyze_every_frame=True), SessionOptions(min_analysis_interval_ms=300)],
                         ids=["backlog", "best-frame-per-interval"])
def test_a_cancelled_streams_frames_are_all_counted(options: SessionOptions) -> None:
    """The frames a cancel dropped (queued, taken by the worker after it, held as the interval's
    best) were in no outcome counter: received exceeded analysed + rejected + skipped, and the
    alerts that divide by received were off by them. They count as skipped (stream_ended)."""
    session = _session(options)
    portrait = (Path(__file__).parents[2] / "server" / "demo" / "eileen_collins_nasa.jpg").read_bytes()
    for index in range(6):
        session.submit(FrameInput(index=index, timestamp_us=index * 33_333, received_at=time.monotonic(),
                                  image=EncodedImage(encoding=ImageEncoding.JPEG, data=portrait)))
    session.cancel()
    session._worker.join(timeout=5.0)
    assert not session._worker.is_alive()
    time.sleep(0.2)  # the last cancelled model requests report on their own threads
    received = _sample(session, "acroscreen_frames_received")
    answered = sum(_sample(session, name) for name in
                   ("acroscreen_frames_analyzed", "acroscreen_frames_rejected", "acroscreen_frames_skipped"))
    assert received == 6 and answered == received


def test_a_client_that_does_not_read_its_answers_stops_the_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    """A live stream's answers (an ack and a result a frame) queue for the client; one that sends
    without reading them must meet flow control, not grow the server's memory frame by frame."""
    monkeypatch.setattr(session_module, "UNREAD_ANSWERS_HIGH_WATER", 256)  # the test's 2,000 frames pass it
    session = _session(SessionOptions(acknowledge_frames=True))
    submitted: list[int] = []

    def send() -> None:
        for index in range(2_000):
            session.submit(_undecodable(index))
            submitted.append(index)
        session.finish()

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    time.sleep(1.0)
    assert len(submitted) <= session_module.UNREAD_ANSWERS_HIGH_WATER  # at least one answer a frame
    answers = [event for event in session.events() if isinstance(event, FramePrediction)]
    sender.join(timeout=10.0)
    assert len(submitted) == 2_000 and sorted(a.index for a in answers) == list(range(2_000))  # each answered once


def test_a_stream_the_server_holds_back_is_not_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    """While the reader waits for the client to read its answers, no frame arrives: the stream
    looked idle, was finished, and every later frame went unanswered under an OK FINAL result."""
    monkeypatch.setattr(session_module, "UNREAD_ANSWERS_HIGH_WATER", 50)
    session = _session(SessionOptions(acknowledge_frames=True), StreamLimits(idle_timeout_s=1.0))

    def send() -> None:
        for index in range(200):
            session.submit(_undecodable(index))
        session.finish()

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    time.sleep(2.5)  # the client reads only now: longer than the idle timeout
    answered = {event.index for event in session.events() if isinstance(event, FramePrediction)}
    sender.join(timeout=10.0)
    assert answered == set(range(200))
