"""A call's request id stays with the call: a streaming handler's steps may run, and its
generator be closed, on different pool threads, and none of them keeps the id afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from acroscreen.server import logs


def _handler() -> Iterator[str | None]:
    try:
        yield logs.current_request_id()
        yield logs.current_request_id()
    finally:
        logs.current_request_id()  # the close runs in the scope too (an error logged there is named)


def test_a_scoped_stream_leaves_no_id_on_the_threads_that_ran_or_closed_it() -> None:
    stream = logs.request_scoped("stream-1", _handler())
    with ThreadPoolExecutor(max_workers=1) as first, ThreadPoolExecutor(max_workers=1) as second:
        assert first.submit(next, stream).result() == "stream-1"
        assert first.submit(logs.current_request_id).result() is None  # the same pool thread, between steps
        assert second.submit(next, stream).result() == "stream-1"
        second.submit(stream.close).result()
        assert first.submit(logs.current_request_id).result() is None
        assert second.submit(logs.current_request_id).result() is None
    assert logs.current_request_id() is None


def test_a_unary_scope_is_reset_on_its_thread() -> None:
    with logs.request_scope("call-1"):
        assert logs.current_request_id() == "call-1"
    assert logs.current_request_id() is None
