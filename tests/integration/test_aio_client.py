"""The asyncio client (`acroscreen.client.aio`) against a real server: same results and errors
as the sync client; and the FHIR output of the async example and of `acroscreen screen --fhir`.
Sync tests that drive coroutines with asyncio.run (no pytest-asyncio)."""

from __future__ import annotations

import asyncio
import json
import runpy
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
from acroscreen.client import (
    Credentials,
    FrameAck,
    FrameData,
    FrameResult,
    ImageKind,
    RetryPolicy,
    ScreenOptions,
    SubjectResult,
)
from acroscreen.client import ScreeningClient
from acroscreen.client.aio import AsyncScreeningClient
from acroscreen.client.client import REQUEST_FRAMING_BYTES
from acroscreen.client.errors import (
    AuthenticationError,
    DeadlineExceededError,
    InvalidRequestError,
    ServerBusyError,
    UnavailableError,
)
from acroscreen.client.sources import video_frames
from acroscreen.client.workers import WORKER_KEY
from acroscreen.server.main import RunningServer

from tests.helpers import jpeg_bytes, png_bytes

from .conftest import start_server

REPO = Path(__file__).resolve().parents[2]


TOKEN = "aio-test-token-0123456789abcdef"
AUTH = Credentials(token=TOKEN)


@pytest.fixture(scope="module")
def aio_server() -> Iterator[RunningServer]:
    running = start_server(max_streams=2, auth_tokens=TOKEN)
    yield running
    running.stop(grace_s=2.0)


def _target(server: RunningServer) -> str:
    return f"127.0.0.1:{server.port}"


def _client(server: RunningServer, timeout_s: float = 60, **kwargs: object) -> AsyncScreeningClient:
    return AsyncScreeningClient(_target(server), timeout_s=timeout_s, credentials=AUTH, **kwargs)  # type: ignore[arg-type]


def test_health_and_model_info(aio_server: RunningServer) -> None:
    async def main() -> tuple[str, str, object]:
        async with _client(aio_server, 30) as client:
            await client.wait_until_serving(10)
            return await client.health(), await client.health("acroscreen.v1.Screening"), await client.model_info()

    overall, screening, info = asyncio.run(main())
    assert overall == screening == "SERVING"
    assert info.input_size == 160 and len(info.class_labels) == 3
    assert info.model.kind in ("untrained", "phantom-demo", "clinical")


def test_stream_a_video_from_an_async_source(aio_server: RunningServer, shared_data: Path) -> None:
    frames = list(video_frames(shared_data / "videos" / "retalking_face1.mp4"))[:24]

    async def source() -> AsyncIterator[FrameData]:
        for frame in frames:
            yield frame
            await asyncio.sleep(0)

    async def main() -> list[FrameResult | SubjectResult]:
        async with _client(aio_server, 120) as client:
            options = ScreenOptions(
                subject_id="aio-video", analyze_every_frame=True, update_every_frames=5, acknowledge_frames=True
            )
            return [event async for event in client.screen_stream(source(), options)]

    events = asyncio.run(main())
    acks = [e for e in events if isinstance(e, FrameAck)]
    results = [e for e in events if isinstance(e, FrameResult)]
    assert sorted(a.index for a in acks) == list(range(24))
    subjects = [e for e in events if isinstance(e, SubjectResult)]
    assert sorted(r.index for r in results) == list(range(24))
    final = subjects[-1]
    assert isinstance(events[-1], SubjectResult) and final.status == "final"
    assert final.subject_id == "aio-video" and final.frames_received == 24
    assert final.frames_analyzed == sum(r.status == "analyzed" for r in results) > 0
    assert final.predicted_score in (1, 2, 3)
    assert any(s.status == "provisional" for s in subjects[:-1])


def test_screen_takes_a_blocking_iterable_and_reports_events(aio_server: RunningServer, shared_data: Path) -> None:
    """A plain generator (PyAV decoding) is advanced off the event loop; on_event sees everything."""
    video = shared_data / "videos" / "retalking_face1.mp4"

    def first_frames() -> Iterator[FrameData]:
        for frame in video_frames(video):
            if frame.index >= 12:
                return
            yield frame

    seen: list[object] = []

    async def main() -> tuple[SubjectResult, int]:
        ticks = 0

        async def ticker() -> None:  # the loop stays responsive while frames are decoded
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        async with _client(aio_server, 120) as client:
            result = await client.screen(first_frames(), ScreenOptions(analyze_every_frame=True), on_event=seen.append)
        task.cancel()
        return result, ticks

    result, ticks = asyncio.run(main())
    assert result.status == "final" and result.frames_received == 12
    assert sum(isinstance(e, FrameResult) for e in seen) == 12 and seen[-1] == result
    assert ticks > 5


def test_screen_images_and_bad_frames(aio_server: RunningServer, portrait_bgr: np.ndarray) -> None:
    images = [
        FrameData(jpeg_bytes(portrait_bgr), ImageKind.JPEG, index=0),
        FrameData(png_bytes(portrait_bgr), ImageKind.PNG, index=1),
        FrameData(b"\xff\xd8garbage", ImageKind.JPEG, index=2),
    ]

    async def main() -> SubjectResult:
        async with _client(aio_server, 60) as client:
            return await client.screen_images(images, ScreenOptions(subject_id="aio-photos"))

    result = asyncio.run(main())
    assert result.subject_id == "aio-photos" and result.frames_received == 3
    assert result.rejected.get("decode_failed") == 1
    assert result.frames_analyzed == 2


def test_screen_photos_streams_a_set_too_large_for_one_request(aio_server: RunningServer, portrait_bgr: np.ndarray) -> None:
    photo = jpeg_bytes(portrait_bgr)
    limit = REQUEST_FRAMING_BYTES + len(photo) + len(photo) // 2  # one photo fits one request, two do not

    async def photos(count: int) -> AsyncIterator[FrameData]:
        for index in range(count):
            yield FrameData(photo, ImageKind.JPEG, index=index)

    async def main() -> tuple[SubjectResult, list[object], SubjectResult, list[object]]:
        one_events: list[object] = []
        three_events: list[object] = []
        async with _client(aio_server, 60, max_message_bytes=limit) as client:
            one = await client.screen_photos(photos(1), ScreenOptions(subject_id="aio-1"), on_event=one_events.append)
            three = await client.screen_photos(photos(3), ScreenOptions(subject_id="aio-3"), on_event=three_events.append)
        return one, one_events, three, three_events

    one, one_events, three, three_events = asyncio.run(main())
    assert one_events == [] and one.frames_analyzed == 1  # one ScreenImages request
    assert sorted(e.index for e in three_events if isinstance(e, FrameResult)) == [0, 1, 2]
    assert three.frames_analyzed == 3 and three.status == "final"


def test_errors_are_the_sync_clients_exceptions(aio_server: RunningServer, portrait_bgr: np.ndarray) -> None:
    quick = RetryPolicy(attempts=2, initial_backoff_s=0.05, max_backoff_s=0.1)

    async def no_server() -> None:
        async with AsyncScreeningClient("127.0.0.1:1", timeout_s=2, retry=quick) as client:
            await client.model_info()

    with pytest.raises(UnavailableError) as caught:
        asyncio.run(no_server())
    assert caught.value.__cause__ is not None

    async def no_server_stream() -> None:
        async with AsyncScreeningClient("127.0.0.1:1", timeout_s=2, retry=quick) as client:
            await client.screen([FrameData(jpeg_bytes(portrait_bgr))])

    with pytest.raises(UnavailableError):
        asyncio.run(no_server_stream())

    async def no_token() -> None:
        async with AsyncScreeningClient(_target(aio_server), timeout_s=10) as client:
            assert await client.health() == "SERVING"  # probes need no token
            await client.model_info()

    with pytest.raises(AuthenticationError):
        asyncio.run(no_token())

    too_long = ScreenOptions(subject_id="x" * 129)  # the API allows 128 characters

    async def photos_with_bad_options() -> None:
        async with _client(aio_server, 30) as client:
            await client.screen_images([FrameData(jpeg_bytes(portrait_bgr))], too_long)

    with pytest.raises(InvalidRequestError) as caught:
        asyncio.run(photos_with_bad_options())
    assert "128" in str(caught.value)

    async def stream_with_bad_options() -> None:
        # No frame is written after the options, so grpc.aio keeps the server's status
        # (see the grpc/grpc#36066 note in acroscreen.client.aio).
        async with _client(aio_server, 30) as client:
            await client.screen([], too_long)

    with pytest.raises(InvalidRequestError):
        asyncio.run(stream_with_bad_options())


def test_a_stream_past_the_clients_timeout_is_a_deadline_with_the_calls_request_id(
    aio_server: RunningServer, portrait_bgr: np.ndarray
) -> None:
    """grpc.aio reported a deadline that struck while a frame was being written as INTERNAL (its
    grpc/grpc#36066), raised as ServerError blaming the server; and neither client named the
    call's request id, which the server sent with its initial metadata."""
    frame = jpeg_bytes(portrait_bgr)
    options = ScreenOptions(analyze_every_frame=True)

    def frames() -> Iterator[FrameData]:
        for index in range(200):  # 4 s of frames, well past the 1.2 s timeout
            yield FrameData(frame, ImageKind.JPEG, index=index)
            time.sleep(0.02)

    async def past_deadline() -> None:
        async with _client(aio_server, 1.2) as client:
            await client.screen(frames(), options)

    for _ in range(3):  # the lost status came most of the time, not every time
        with pytest.raises(DeadlineExceededError) as caught:
            asyncio.run(past_deadline())
        assert caught.value.request_id and caught.value.request_id in str(caught.value)
    with ScreeningClient(_target(aio_server), timeout_s=1.2, credentials=AUTH) as client:
        with pytest.raises(DeadlineExceededError) as caught:
            client.screen(frames(), options)
    assert caught.value.request_id
    # The server ends its side of those calls a moment after the clients gave up (the stream's
    # worker finishes the frame in hand): the module's server has only 2 stream slots.
    deadline = time.monotonic() + 10
    while aio_server.service.active_streams and time.monotonic() < deadline:
        time.sleep(0.05)
    assert aio_server.service.active_streams == 0


def test_streams_beyond_the_limit_get_server_busy_with_a_retry_hint(aio_server: RunningServer) -> None:
    """max_streams=2: a third concurrent stream is refused as RESOURCE_EXHAUSTED → ServerBusyError."""

    async def main() -> BaseException | None:
        async with _client(aio_server, 60) as client:
            hold = asyncio.Event()
            opened = asyncio.Semaphore(0)

            async def held_source() -> AsyncIterator[FrameData]:
                opened.release()
                await hold.wait()
                return
                yield  # an async generator that sends no frame until released

            async def held_stream() -> None:
                async for _ in client.screen_stream(held_source()):
                    pass

            holders = [asyncio.create_task(held_stream()) for _ in range(2)]
            for _ in range(2):
                await opened.acquire()
            await asyncio.sleep(0.5)  # both streams are open on the server
            error: BaseException | None = None
            try:
                async for _ in client.screen_stream(held_source()):
                    pass
            except ServerBusyError as busy:
                error = busy
            hold.set()
            await asyncio.gather(*holders)
            return error

    error = asyncio.run(main())
    assert isinstance(error, ServerBusyError)
    assert error.retry_after_s is not None and error.retry_after_s > 0
    assert error.request_id is not None and error.request_id in str(error)


def test_the_async_fhir_example_runs_against_the_server(
    aio_server: RunningServer, shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    video = shared_data / "videos" / "retalking_face1.mp4"
    out = tmp_path / "fhir"
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    argv = [
        "async_to_fhir.py",
        "--server",
        f"dns:///localhost:{aio_server.port}",  # looked up, as a headless Service's name would be
        "--spread",
        "--token-file",
        str(token_file),
        "--out",
        str(out),
        "--max-frames",
        "15",
        f"{video}=Patient/example-1",
        f"{video}=Patient/example-2",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(REPO / "examples" / "async_to_fhir.py"), run_name="__main__")
    assert done.value.code == 0
    written = sorted(out.glob("*.json"))
    assert len(written) == 2
    observations = [json.loads(p.read_text()) for p in written]
    assert {o["subject"]["reference"] for o in observations} == {"Patient/example-1", "Patient/example-2"}
    assert all(o["resourceType"] == "Observation" and o["meta"]["security"][0]["code"] == "AIAST" for o in observations)


def test_cli_screen_writes_a_fhir_observation(
    aio_server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`acroscreen screen PHOTO --fhir out.json --fhir-subject Patient/123` (in process)."""
    from acroscreen.client.cli import main

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    out = tmp_path / "observation.json"
    photo = REPO / "server" / "demo" / "eileen_collins_nasa.jpg"
    common = ["--server", _target(aio_server), "--token-file", str(token_file)]
    code = main(["screen", str(photo), "--json", "--fhir", str(out), "--fhir-subject", "Patient/123", *common])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    observation = json.loads(out.read_text())
    assert observation["resourceType"] == "Observation" and observation["subject"] == {"reference": "Patient/123"}
    assert observation["method"]["coding"][0]["code"] == "photographs"
    assert observation["contained"][0]["deviceName"][0]["name"] == printed["model"]["name"]
    received = next(c for c in observation["component"] if c["code"]["coding"][0]["code"] == "frames-received")
    assert received["valueInteger"] == printed["frames_received"] == 1

    # a malformed subject, or a file that cannot be written, is refused before anything is sent
    assert main(["screen", str(photo), "--fhir", str(out), "--fhir-subject", "123", *common]) == 2
    assert "not a FHIR reference" in capsys.readouterr().err
    assert main(["screen", str(photo), "--fhir", str(tmp_path / "absent" / "o.json"), *common]) == 2
    refused = capsys.readouterr()
    assert "no folder" in refused.err and refused.out == ""


def test_spreading_over_workers_with_a_one_process_server(aio_server: RunningServer, portrait_bgr: np.ndarray) -> None:
    """A one-process server names itself worker 0 of 1 (behind the token check, like every call):
    a spreading client, sync or async, then needs no more connections and screens as usual."""
    images = [FrameData(jpeg_bytes(portrait_bgr), ImageKind.JPEG, index=i) for i in range(2)]

    async def main() -> tuple[object, SubjectResult, int]:
        async with _client(aio_server, spread_over_workers=True) as client:
            info = await client.model_info()
            result = await client.screen_images(images, ScreenOptions(subject_id="spread-a"))
            return info, result, [len(pool.connections) for pool in await client._pools(False)]

    info, result, connections = asyncio.run(main())
    assert info.input_size == 160 and result.frames_received == 2 and connections == [1]
    with ScreeningClient(_target(aio_server), timeout_s=60, credentials=AUTH, spread_over_workers=True) as client:
        frames = [FrameData(jpeg_bytes(portrait_bgr), ImageKind.JPEG, index=i) for i in range(2)]
        assert client.screen(frames, ScreenOptions(subject_id="spread-s")).frames_received == 2
        (pool,) = client._pools(False)
        assert len(pool.connections) == 1 and pool.run is not None
        # A stream accepted by another run (a restart) makes the client search again.
        client._servers.accepted([(WORKER_KEY, "another-run:0/1")])
        assert client._pools(False) != [pool]
    with pytest.raises(AuthenticationError):  # the search itself is refused without the token
        with ScreeningClient(_target(aio_server), timeout_s=10, spread_over_workers=True) as client:
            client.model_info()
