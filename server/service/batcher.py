"""One dynamic batcher shared by every stream, so model batches span streams.

Queue + condition + one future per item (after Ray Serve's batching.py). The
queue is bounded and never makes anyone wait: when it is full, the oldest item of
the stream with the most items queued is shed (its future fails with Overloaded)
to make room, so one flooding stream loses its own stale frames instead of
starving the others, and what is analysed stays recent. Cancelled items (their
caller went away) give up their place before anyone is shed. A failing batch is
split and retried so one bad item or an out-of-memory error fails only what it
must; an item that fails alone gets ModelError(INFERENCE_FAILED), and the
exception is logged once per batch, never handed to callers as text.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

from ..errors import INFERENCE_FAILED, ModelError, Overloaded
from ..metrics import Metrics
from .priority import lower_current_thread_priority

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True, slots=True, kw_only=True)
class BatcherConfig:
    max_batch_size: int = 16
    max_delay_ms: float = 5.0
    queue_capacity: int = 256  # when full, the busiest stream's oldest item is shed


@dataclass(slots=True)
class _Pending(Generic[Item, Result]):
    item: Item
    future: Future[Result]
    enqueued_at: float
    owner: Hashable


class DynamicBatcher(Generic[Item, Result]):
    """Collects items until max_batch_size or max_delay_ms, runs them as one batch."""

    def __init__(
        self,
        run_batch: Callable[[Sequence[Item]], Sequence[Result]],
        config: BatcherConfig,
        metrics: Metrics,
    ) -> None:
        self._run_batch = run_batch
        self._config = config
        self._metrics = metrics
        self._queue: collections.deque[_Pending[Item, Result]] = collections.deque()
        self._queued_per_owner: collections.Counter[Hashable] = collections.Counter()
        self._condition = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="acroscreen-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish what is queued, then end the worker thread."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def submit(self, item: Item, owner: Hashable = None) -> Future[Result]:
        """Queue one item; ``owner`` (a stream) is whose items are shed first when it queues the most."""
        future: Future[Result] = Future()
        with self._condition:
            if self._stopping:
                raise Overloaded("the model is shutting down")
            if len(self._queue) >= self._config.queue_capacity:
                self._drop_cancelled()
            shed = self._shed_one() if len(self._queue) >= self._config.queue_capacity else None
            self._queue.append(_Pending(item, future, time.monotonic(), owner))
            self._queued_per_owner[owner] += 1
            self._metrics.queue_depth.labels(queue="inference").set(len(self._queue))
            self._condition.notify()
        if shed is not None and shed.future.set_running_or_notify_cancel():  # outside the lock: callbacks run
            shed.future.set_exception(
                Overloaded(f"shed from the full inference queue ({self._config.queue_capacity} faces) for a newer frame")
            )
        return future

    def _drop_cancelled(self) -> None:
        """Free the places of items whose callers went away (the caller holds the lock)."""
        for pending in [p for p in self._queue if p.future.cancelled()]:
            self._queue.remove(pending)
            self._forget(pending)

    def _shed_one(self) -> _Pending[Item, Result]:
        """Remove the oldest item of the owner with the most items queued (the caller holds the lock)."""
        busiest = max(self._queued_per_owner, key=self._queued_per_owner.__getitem__)
        for position, pending in enumerate(self._queue):
            if pending.owner == busiest:
                del self._queue[position]
                self._forget(pending)
                return pending
        raise AssertionError("per-owner counts out of step with the queue")

    def _forget(self, pending: _Pending[Item, Result]) -> None:
        self._queued_per_owner[pending.owner] -= 1
        if not self._queued_per_owner[pending.owner]:
            del self._queued_per_owner[pending.owner]

    def _take_batch(self) -> list[_Pending[Item, Result]] | None:
        with self._condition:
            while not self._queue:
                if self._stopping:
                    return None
                self._condition.wait()
            deadline = self._queue[0].enqueued_at + self._config.max_delay_ms / 1000.0
            while len(self._queue) < self._config.max_batch_size and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._condition.wait(remaining)
            batch = []
            while self._queue and len(batch) < self._config.max_batch_size:
                pending = self._queue.popleft()
                self._forget(pending)
                if pending.future.set_running_or_notify_cancel():
                    batch.append(pending)
            self._metrics.queue_depth.labels(queue="inference").set(len(self._queue))
            return batch

    def _loop(self) -> None:
        lower_current_thread_priority()
        while (batch := self._take_batch()) is not None:
            if not batch:
                continue
            now = time.monotonic()
            for pending in batch:
                self._metrics.stage_seconds.labels(stage="queue_wait").observe(now - pending.enqueued_at)
            self._run(batch)

    def _run(self, batch: list[_Pending[Item, Result]]) -> None:
        errors: list[Exception] = []
        failed = self._run_or_split(batch, errors)
        if errors:
            first = errors[0]
            log.error(
                "a model batch of %d faces raised %s: %s; after retrying in smaller batches %d failed",
                len(batch), type(first).__name__, first, failed, exc_info=first,
            )

    def _run_or_split(self, batch: list[_Pending[Item, Result]], errors: list[Exception]) -> int:
        """Run the batch; if it raises, run each half on its own. Returns how many items failed."""
        started = time.monotonic()
        try:
            results = self._run_batch([p.item for p in batch])
            if len(results) != len(batch):
                raise ModelError(f"model returned {len(results)} results for a batch of {len(batch)}")
        except Exception as exc:  # noqa: BLE001 — delivered to every waiter, never lost
            errors.append(exc)
            if len(batch) > 1:
                middle = len(batch) // 2
                return self._run_or_split(batch[:middle], errors) + self._run_or_split(batch[middle:], errors)
            batch[0].future.set_exception(exc if isinstance(exc, ModelError) else ModelError(INFERENCE_FAILED))
            return 1
        self._metrics.stage_seconds.labels(stage="infer").observe(time.monotonic() - started)
        self._metrics.batch_size.observe(len(batch))
        for pending, result in zip(batch, results):
            pending.future.set_result(result)
        return 0
