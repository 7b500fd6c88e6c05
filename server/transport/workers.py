"""Which process of a `--workers N` server answers a call, and how busy each of them is.

The kernel hands each connection to one worker (SO_REUSEPORT), so a client that wants its
streams spread over the workers opens connections until it has one to each
(`acroscreen.client.workers`). Every screening call's initial metadata names the worker
(`acroscreen-worker: <run>:<index>/<count>`) and, from a server of several workers, the
screening streams open on each (`acroscreen-worker-streams: 3,5,4`), so a client places its next
stream on the least busy worker of the whole server, not only the least busy for its own calls.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

WORKER_KEY = "acroscreen-worker"
WORKER_STREAMS_KEY = "acroscreen-worker-streams"


class WorkerStreams:
    """Open screening streams of every worker of one run, in memory the supervisor makes before it
    forks them: each worker counts its own (its threads under its own lock), every worker reads all."""

    def __init__(self, count: int) -> None:
        # Anonymous shared memory: the forked workers see one copy, and nothing is backed by a file.
        self._memory = mmap.mmap(-1, ctypes.sizeof(ctypes.c_int32) * count)
        self._counts = (ctypes.c_int32 * count).from_buffer(self._memory)
        self._lock = threading.Lock()  # held by no thread at the fork, so each worker starts with it free

    @contextlib.contextmanager
    def counted(self, index: int) -> Iterator[None]:
        """Counts one stream on worker `index` while the block runs."""
        with self._lock:
            self._counts[index] += 1
        try:
            yield
        finally:
            with self._lock:
                self._counts[index] -= 1

    def metadata(self) -> tuple[str, str]:
        return WORKER_STREAMS_KEY, ",".join(map(str, self._counts[:]))


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerIdentity:
    """Worker `index` of `count` in one server run (`instance`, random per start: a restart is a new one)."""

    instance: str
    index: int = 0
    count: int = 1
    streams: WorkerStreams | None = field(default=None, compare=False)  # shared by the run's workers

    @classmethod
    def new_instance(cls, count: int = 1) -> WorkerIdentity:
        """Worker 0 of a new run; the supervisor gives each worker its index with `dataclasses.replace`."""
        return cls(instance=secrets.token_hex(6), index=0, count=count,
                   streams=WorkerStreams(count) if count > 1 else None)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        named = (WORKER_KEY, f"{self.instance}:{self.index}/{self.count}")
        return (named,) if self.streams is None else (named, self.streams.metadata())

    def stream(self) -> contextlib.AbstractContextManager[None]:
        """One screening stream of this worker, counted for every call's metadata while it runs."""
        return contextlib.nullcontext() if self.streams is None else self.streams.counted(self.index)
