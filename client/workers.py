"""One client's calls spread over the worker processes of a `--workers N` server.

The kernel hands each TCP connection to one worker (SO_REUSEPORT hashes the connection), and
gRPC runs every call of a channel over one connection, so every stream of a client would land
on the same worker while the others idle. With `spread_over_workers=True` a client opens
connections, each with a subchannel pool of its own, until it holds one to every worker the
server names in its calls' initial metadata (`acroscreen-worker: <run>:<index>/<count>`), and
closes the duplicates. Each call then goes to the worker with the fewest of this client's calls
open, ties broken at random so that many clients spread too. A stream accepted by a worker of
another run (the server restarted) makes the client search again before its next call.

The sync and async clients make the calls; the bookkeeping is here, once.
"""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

WORKER_KEY = "acroscreen-worker"  # sent by server/transport/servicer.py

# Its own TCP connection for a channel: gRPC otherwise shares one among channels to one target.
OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)

Connection = TypeVar("Connection")

# More workers than any one machine's cores: a server naming more is not searched (the search
# opens up to 6 connections per worker).
MAX_WORKERS = 256


@dataclass(frozen=True, slots=True)
class WorkerId:
    run: str  # random per server start
    index: int
    count: int


def check_spread_options(options: Iterable[tuple[str, object]]) -> None:
    """Spreading is over the workers of one server: a load-balancing policy over several servers
    (a `dns:///` target of a headless Service) would have the search keep only the first one's."""
    if any(name == "grpc.lb_policy_name" for name, _ in options):
        raise ValueError("spread_over_workers is for one server's workers; with grpc.lb_policy_name (several "
                         "servers behind one name) leave it off: each server's connection then goes to one worker")


def worker_of(metadata: Iterable[tuple[str, str | bytes]] | None) -> WorkerId | None:
    """The worker a call's initial metadata names; None from a server that names none."""
    for key, value in metadata or ():
        if key != WORKER_KEY:
            continue
        text = value.decode() if isinstance(value, bytes) else value
        run, _, position = text.rpartition(":")
        index, _, count = position.partition("/")
        try:
            worker = WorkerId(run, int(index), int(count))
        except ValueError:
            return None
        return worker if 0 <= worker.index < worker.count <= MAX_WORKERS else None
    return None


def connection_budget(workers: int) -> int:
    """Connections tried to find every worker. Each lands on a random one, so finding all N
    takes about N·ln N tries; with 6·N one of 12 workers stays unfound about 2 % of the time."""
    return 6 * workers


class WorkerPool(Generic[Connection]):
    """One connection per worker found, and how many of this client's calls each has open. Thread-safe."""

    def __init__(self, run: str | None, connections: dict[int, Connection]) -> None:
        if not connections:
            raise ValueError("a worker pool needs a connection")
        self.run = run
        self._connections = connections
        self._open = dict.fromkeys(connections, 0)
        self._lock = threading.Lock()

    @property
    def connections(self) -> list[Connection]:
        return list(self._connections.values())

    def acquire(self) -> tuple[int, Connection]:
        """The worker with the fewest calls open (ties at random) and its connection; `release` it after."""
        with self._lock:
            fewest = min(self._open.values())
            index = random.choice([i for i, n in self._open.items() if n == fewest])
            self._open[index] += 1
            return index, self._connections[index]

    def release(self, index: int) -> None:
        with self._lock:
            self._open[index] -= 1

    @contextlib.contextmanager
    def placed(self) -> Iterator[Connection]:
        """The connection for one call, counted as open until the block ends."""
        index, connection = self.acquire()
        try:
            yield connection
        finally:
            self.release(index)


class WorkerConnections(Generic[Connection]):
    """A client's connections: its first one, the worker pool searched from it (None until found,
    or once stale), and the connections of stale pools, all closed with the client. Thread-safe."""

    def __init__(self, first: Connection) -> None:
        self.first = first
        self._pool: WorkerPool[Connection] | None = None
        self._stale: list[Connection] = []
        self._lock = threading.Lock()

    @property
    def pool(self) -> WorkerPool[Connection] | None:
        return self._pool

    def found(self, pool: WorkerPool[Connection]) -> WorkerPool[Connection]:
        with self._lock:
            self._pool = pool
        return pool

    def check_run(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> None:
        """A call accepted by a worker of another server run (a restart): search again before the next call."""
        worker = worker_of(metadata)
        with self._lock:
            if self._pool is not None and worker is not None and worker.run != self._pool.run:
                self._stale.extend(c for c in self._pool.connections if c is not self.first)
                self._pool = None

    def all(self) -> list[Connection]:
        """Every connection the client opened and kept, each once."""
        with self._lock:
            pooled = self._pool.connections if self._pool else []
            return list({id(c): c for c in (self.first, *self._stale, *pooled)}.values())


class WorkerSearch(Generic[Connection]):
    """One search: offer it connections with the worker each reached until `done`, then take the `pool`."""

    def __init__(self, first: Connection, worker: WorkerId | None) -> None:
        self._worker = worker
        self._found: dict[int, Connection] = {worker.index if worker else 0: first}
        self._tries_left = connection_budget(worker.count) if worker else 0

    @property
    def done(self) -> bool:
        return self._worker is None or len(self._found) == self._worker.count or self._tries_left <= 0

    def offer(self, connection: Connection, worker: WorkerId | None) -> bool:
        """True if the search keeps `connection` (a worker not found yet); else the caller closes it."""
        self._tries_left -= 1
        if self._worker is None or worker is None or worker.run != self._worker.run or worker.index in self._found:
            return False
        self._found[worker.index] = connection
        return True

    def pool(self) -> WorkerPool[Connection]:
        return WorkerPool(self._worker.run if self._worker else None, self._found)
