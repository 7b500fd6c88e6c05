import logging
import threading
import time

import pytest
from acroscreen.server.errors import INFERENCE_FAILED, ModelError, Overloaded
from acroscreen.server.metrics import Metrics
from acroscreen.server.service.batcher import BatcherConfig, DynamicBatcher


def _batcher(run, **config) -> DynamicBatcher:
    batcher = DynamicBatcher(run, BatcherConfig(**config), Metrics())
    batcher.start()
    return batcher


def test_items_from_many_threads_share_batches() -> None:
    sizes: list[int] = []

    def run(items):
        sizes.append(len(items))
        time.sleep(0.01)
        return [item * 2 for item in items]

    batcher = _batcher(run, max_batch_size=8, max_delay_ms=20)
    futures = []
    lock = threading.Lock()

    def submit(start: int) -> None:
        for i in range(start, start + 8):
            future = batcher.submit(i)
            with lock:
                futures.append((i, future))

    threads = [threading.Thread(target=submit, args=(k * 8,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(future.result(timeout=5) == i * 2 for i, future in futures)
    batcher.stop()
    assert sum(sizes) == 32 and max(sizes) <= 8
    assert max(sizes) > 1, "items submitted together should be batched"


def _busy_batcher_with_room_for_three():  # noqa: ANN202
    """A one-item-batch batcher whose worker holds a0 until `release` is set: a0 is out of the
    queue (never shed) and three more places are free."""
    release, holding = threading.Event(), threading.Event()

    def run(items):
        holding.set()
        release.wait(5)
        return items

    batcher = _batcher(run, max_batch_size=1, max_delay_ms=0, queue_capacity=3)
    first = batcher.submit("a0", owner="a")
    assert holding.wait(5)
    return batcher, release, first


def test_full_queue_sheds_the_oldest_item_of_the_busiest_stream() -> None:
    batcher, release, first = _busy_batcher_with_room_for_three()
    a1, a2, b1 = batcher.submit("a1", owner="a"), batcher.submit("a2", owner="a"), batcher.submit("b1", owner="b")
    b2 = batcher.submit("b2", owner="b")  # full: stream a has the most queued, its oldest goes
    with pytest.raises(Overloaded, match="shed"):
        a1.result(timeout=1)
    c1 = batcher.submit("c1", owner="c")  # queued a2, b1, b2: now b has the most, b1 goes
    with pytest.raises(Overloaded):
        b1.result(timeout=1)
    release.set()
    assert [f.result(timeout=5) for f in (first, a2, b2, c1)] == ["a0", "a2", "b2", "c1"]
    batcher.stop()
    with pytest.raises(Overloaded):
        batcher.submit("late", owner="a")


def test_a_failing_item_fails_alone_with_a_fixed_message_and_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[list[str]] = []

    def run(items):
        calls.append(list(items))
        if "bad" in items:
            raise RuntimeError("CUDA out of memory (simulated) at 0x7f3a")
        return [item.upper() for item in items]

    batcher = _batcher(run, max_batch_size=4, max_delay_ms=50)
    with caplog.at_level(logging.ERROR, logger="acroscreen.server.service.batcher"):
        futures = [batcher.submit(item) for item in ("a", "bad", "c", "d")]
        assert futures[0].result(timeout=5) == "A"
        assert futures[2].result(timeout=5) == "C" and futures[3].result(timeout=5) == "D"
        with pytest.raises(ModelError) as failed:
            futures[1].result(timeout=5)
        batcher.stop()
    assert str(failed.value) == INFERENCE_FAILED  # no exception text for the client
    assert calls[0] == ["a", "bad", "c", "d"] and ["bad"] in calls  # split until it failed alone
    [record] = caplog.records  # one line for the whole batch, with the cause
    assert "RuntimeError: CUDA out of memory" in record.getMessage() and "1 failed" in record.getMessage()


def test_cancelled_items_free_their_places_before_anyone_is_shed() -> None:
    batcher, release, first = _busy_batcher_with_room_for_three()
    a1, a2, gone = batcher.submit("a1", owner="a"), batcher.submit("a2", owner="a"), batcher.submit("b1", owner="b")
    assert gone.cancel()  # b's caller went away
    c1 = batcher.submit("c1", owner="c")  # full, but b1's place is free: a1 is not shed
    release.set()
    assert [f.result(timeout=5) for f in (first, a1, a2, c1)] == ["a0", "a1", "a2", "c1"]
    batcher.stop()


def test_wrong_result_count_is_an_error() -> None:
    batcher = _batcher(lambda items: items[:-1] if len(items) > 1 else [], max_batch_size=2, max_delay_ms=50)
    futures = [batcher.submit(1), batcher.submit(2)]
    for future in futures:
        with pytest.raises(ModelError):
            future.result(timeout=5)
    batcher.stop()
