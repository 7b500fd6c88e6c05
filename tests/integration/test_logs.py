"""The server's structured logs during real screenings, read back line by line as JSON: every
line about a stream names its request id (the one the client got as `x-request-id`), the
service layer's warnings from the stream's own threads included, and no line holds the raw
subject id or any pixel data."""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from acroscreen.server import logs
from acroscreen.server.main import RunningServer
from acroscreen.server.runtime.preprocess import FacePreprocessor
from acroscreen.server.transport import servicer as servicer_module
from acroscreen.v1 import screening_pb2 as pb
from acroscreen.v1 import screening_pb2_grpc as pb_grpc

from tests.helpers import jpeg_bytes

SUBJECT_ID = "MRN-0048151623-Jane-Doe"
FRAMES = 6


@pytest.fixture()
def log_lines() -> Iterator[io.StringIO]:
    """What the server logs, through the handler `serve` installs (JSON, request-id filter)."""
    output = io.StringIO()
    handler = logs.handler(json_format=True, stream=output)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield output
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _parse(output: io.StringIO) -> list[dict]:
    lines = output.getvalue().splitlines()
    assert lines, "the server logged nothing"
    return [json.loads(line) for line in lines]  # every line is one JSON object


def _requests(frame: bytes) -> Iterator[pb.ScreenRequest]:
    yield pb.ScreenRequest(options=pb.SessionOptions(subject_id=SUBJECT_ID, analyze_every_frame=True))
    for index in range(FRAMES):
        yield pb.ScreenRequest(frame=pb.Frame(index=index, timestamp_us=index * 40_000, jpeg=frame))


def _pixel_markers(frame: bytes, image: np.ndarray) -> list[str]:
    """How pixels could show up in a text log: the JPEG in base64, hex or repr, raw pixel rows."""
    middle = frame[len(frame) // 2 : len(frame) // 2 + 24]
    return [
        base64.b64encode(frame[:48]).decode(),
        base64.b64encode(middle).decode()[:24],
        frame[:24].hex(),
        middle.hex(),
        repr(middle)[2:26],
        "/9j/",  # base64 of a JPEG's start marker
        np.array2string(image[100, 100:110].ravel(), separator=", ")[1:20],
    ]


def _check_privacy(lines: list[dict], raw: str, frame: bytes, image: np.ndarray) -> None:
    assert SUBJECT_ID not in raw, "the raw subject id reached the logs"
    for marker in _pixel_markers(frame, image):
        assert marker not in raw, f"pixel data in the logs: {marker!r}"


def _stream_lines(lines: list[dict], request_id: str) -> list[dict]:
    return [line for line in lines if line.get("request_id") == request_id]


def test_every_line_about_a_stream_names_its_request_id(
    server: RunningServer, log_lines: io.StringIO, portrait_bgr: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One frame's face analysis fails unexpectedly on the stream's worker thread: the service
    # layer logs it (with its traceback) without knowing anything of the call.
    analyze = FacePreprocessor.analyze
    failed = threading.Event()

    def analyze_failing_once(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if not failed.is_set():
            failed.set()
            raise RuntimeError("injected analysis failure")
        return analyze(self, *args, **kwargs)

    monkeypatch.setattr(FacePreprocessor, "analyze", analyze_failing_once)
    frame = jpeg_bytes(portrait_bgr)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = pb_grpc.ScreeningStub(channel).ScreenStream(_requests(frame), timeout=120)
        responses = list(call)
        request_id = dict(call.initial_metadata())["x-request-id"]
    assert responses[-1].subject.status == pb.SUBJECT_STATUS_FINAL
    statuses = [r.frame_result.status for r in responses if r.WhichOneof("payload") == "frame_result"]
    assert statuses.count(pb.FRAME_STATUS_REJECTED) == 1 and len(statuses) == FRAMES

    raw = log_lines.getvalue()
    lines = _parse(log_lines)
    mine = _stream_lines(lines, request_id)
    messages = [line["message"] for line in mine]
    assert messages[0] == "stream opened" and messages[-1] == "stream closed", messages
    assert "analysis of a frame failed" in messages, "the worker thread's warning lacks the request id"
    (failure,) = [line for line in mine if line["message"] == "analysis of a frame failed"]
    assert failure["level"] == "ERROR" and "injected analysis failure" in failure["exception"]
    assert mine[0]["subject"] == logs.subject_hash(SUBJECT_ID)
    # no line about this stream lacks its id
    assert not [line for line in lines if "request_id" not in line and "frame" in line["message"]], lines
    _check_privacy(lines, raw, frame, portrait_bgr)


def test_an_unexpected_error_is_logged_with_the_request_id_the_client_got(
    server: RunningServer, log_lines: io.StringIO, portrait_bgr: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    frame_of = servicer_module.convert.frame_of
    seen = []

    def frame_of_failing_at_the_third(request: pb.ScreenRequest):  # noqa: ANN202
        seen.append(request)
        if len(seen) == 3:
            raise KeyError("injected bug in the reader")
        return frame_of(request)

    monkeypatch.setattr(servicer_module.convert, "frame_of", frame_of_failing_at_the_third)
    frame = jpeg_bytes(portrait_bgr)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = pb_grpc.ScreeningStub(channel).ScreenStream(_requests(frame), timeout=120)
        with pytest.raises(grpc.RpcError) as raised:
            list(call)
        request_id = dict(call.initial_metadata())["x-request-id"]
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert "injected" not in raised.value.details(), "raw exception text left the server"
    assert dict(raised.value.trailing_metadata())["x-request-id"] == request_id  # what to quote to support

    raw = log_lines.getvalue()
    lines = _parse(log_lines)
    mine = _stream_lines(lines, request_id)
    messages = [line["message"] for line in mine]
    assert messages[0] == "stream opened"
    assert {"message": "stream closed", "error": "KeyError"}.items() <= next(
        line for line in mine if line["message"] == "stream closed"
    ).items()
    (unexpected,) = [line for line in lines if line["message"].startswith("unexpected error")]
    assert unexpected["request_id"] == request_id and "injected bug" in unexpected["exception"]
    _check_privacy(lines, raw, frame, portrait_bgr)


def test_calls_get_different_request_ids_and_a_unary_call_after_streams_logs_its_own(
    server: RunningServer, log_lines: io.StringIO, portrait_bgr: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two streams, then a ScreenImages call on the same server whose analysis fails: its error
    line names its own request id, never one a stream left behind on a handler thread."""
    frame = jpeg_bytes(portrait_bgr)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ScreeningStub(channel)
        stream_ids = []
        for _ in range(2):
            call = stub.ScreenStream(_requests(frame), timeout=120)
            list(call)
            stream_ids.append(dict(call.initial_metadata())["x-request-id"])
        streams_logged = _wait_for_closed(log_lines, stream_ids)

        def analyze_failing(self, image, tracker, scale=1.0):  # noqa: ANN001, ANN202
            raise RuntimeError("injected analysis failure")

        monkeypatch.setattr(FacePreprocessor, "analyze", analyze_failing)
        result, call = stub.ScreenImages.with_call(
            pb.ScreenImagesRequest(images=[pb.Frame(index=0, jpeg=frame)]), timeout=120
        )
        unary_id = dict(call.initial_metadata())["x-request-id"]
    assert len({*stream_ids, unary_id}) == 3 and all(len(i) == 12 for i in (*stream_ids, unary_id))
    assert result.frames_analyzed == 0  # the one image failed

    after_streams = _parse(log_lines)[streams_logged:]
    (failure,) = [line for line in after_streams if line["message"] == "analysis of a frame failed"]
    assert failure.get("request_id") == unary_id, failure
    assert not [line for line in after_streams if line.get("request_id") != unary_id], after_streams


def _wait_for_closed(log_lines: io.StringIO, stream_ids: list[str]) -> int:
    """How many lines were logged once every stream logged "stream closed" (its handler may
    finish just after the client read the last answer)."""
    deadline = time.monotonic() + 30
    while True:
        lines = _parse(log_lines)
        closed = {line.get("request_id") for line in lines if line["message"] == "stream closed"}
        if closed >= set(stream_ids):
            return len(lines)
        assert time.monotonic() < deadline, f"no 'stream closed' line for {set(stream_ids) - closed}"
        time.sleep(0.05)
