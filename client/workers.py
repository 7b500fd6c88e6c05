"""One client's calls spread over the worker processes of a `--workers N` server.

The kernel hands each TCP connection to one worker (SO_REUSEPORT hashes the connection), and
gRPC runs every call of a channel over one connection, so every stream of a client would land
on the same worker while the others idle. With `spread_over_workers=True` a client opens
connections, each with a subchannel pool of its own, until it holds one to every worker the
server names in its calls' initial metadata (`acroscreen-worker: <run>:<index>/<count>`), and
closes the duplicates. Each call then goes to the least busy worker: by the streams the server
last reported open on each (`acroscreen-worker-streams: 3,5,4`, every client's, in every call's
metadata; a stream asks for a fresh report first) plus this client's calls not yet counted by a
report, ties broken at random; from a server that reports none, by this client's own calls open.
A stream accepted by a worker of another run (the server restarted) makes the client search again
before its next call.

The sync and async clients make the calls; the bookkeeping is here, once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

WORKER_KEY = "acroscreen-worker"  # sent by server/transport/workers.py
WORKER_STREAMS_KEY = "acroscreen-worker-streams"  # likewise, by a server of several workers

# Its own TCP connection for a channel: gRPC otherwise shares one among channels to one target.
OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)

Connection = TypeVar("Connection")

# More workers than any one machine's cores: a server naming more is not searched (the search
# opens up to 6 connections per worker).
MAX_WORKERS = 256


# More streams than one worker could hold: a larger count is garbled, not a load.
MAX_REPORTED_STREAMS = 1 << 20


@dataclass(frozen=True, slots=True)
class WorkerId:
    run: str  # random per server start
    index: int
    count: int
    streams: tuple[int, ...] | None = field(default=None, compare=False)  # open on each worker, when reported


def check_spread_options(options: Iterable[tuple[str, object]]) -> None:
    """Spreading is over the workers of one server: a load-balancing policy over several servers
    (a `dns:///` target of a headless Service) would have the search keep only the first one's."""
    if any(name == "grpc.lb_policy_name" for name, _ in options):
        raise ValueError("spread_over_workers is for one server's workers; with grpc.lb_policy_name (several "
                         "servers behind one name) leave it off: each server's connection then goes to one worker")


def worker_of(metadata: Iterable[tuple[str, str | bytes]] | None) -> WorkerId | None:
    """The worker a call's initial metadata names, with the streams open on each worker where the
    server reports them; None from a server that names none."""
    values = {key: value.decode() if isinstance(value, bytes) else value for key, value in metadata or ()}
    if WORKER_KEY not in values:
        return None
    run, _, position = values[WORKER_KEY].rpartition(":")
    index, _, count = position.partition("/")
    try:
        worker = WorkerId(run, int(index), int(count))
    except ValueError:
        return None
    if not 0 <= worker.index < worker.count <= MAX_WORKERS:
        return None
    return dataclasses.replace(worker, streams=_streams(values.get(WORKER_STREAMS_KEY), worker.count))


def _streams(text: str | None, count: int) -> tuple[int, ...] | None:
    """`3,5,4`: one count per worker, or None (not reported, or garbled: ignored, never an error)."""
    try:
        streams = tuple(int(part) for part in text.split(",")) if text else ()
    except ValueError:
        return None
    if len(streams) != count or not all(0 <= n <= MAX_REPORTED_STREAMS for n in streams):
        return None
    return streams


def connection_budget(workers: int) -> int:
    """Connections tried to find every worker. Each lands on a random one, so finding all N
    takes about N·ln N tries; with 6·N one of 12 workers stays unfound about 2 % of the time."""
    return 6 * workers


@dataclass(slots=True, eq=False)
class Placement(Generic[Connection]):
    """One call placed on a worker of `pool`; once the server accepted it, how many reports came before."""

    index: int
    connection: Connection
    pool: WorkerPool[Connection]
    accepted_after: int | None = None


class WorkerPool(Generic[Connection]):
    """One connection per worker found, and how busy each worker is. Thread-safe.

    Busy means, once the server has reported its streams: the streams open on the worker at the
    last report (every client's), plus this client's calls there that the server accepted after
    it, plus those not accepted yet (a report asked for meanwhile does not count them); before
    any report, this client's calls open there. A call that ends takes itself off whichever
    count held it.
    """

    def __init__(self, run: str | None, connections: dict[int, Connection],
                 streams: tuple[int, ...] | None = None) -> None:
        if not connections:
            raise ValueError("a worker pool needs a connection")
        self.run = run
        self._connections = connections
        self._open = dict.fromkeys(connections, 0)
        self._reported: dict[int, int] | None = None
        self._accepted_since = dict.fromkeys(connections, 0)
        self._unaccepted = dict.fromkeys(connections, 0)
        self._reports = 0
        self._lock = threading.Lock()
        if streams is not None:
            self.report(streams)

    @property
    def connections(self) -> list[Connection]:
        return list(self._connections.values())

    def report(self, streams: tuple[int, ...]) -> None:
        """The streams a call's metadata reported open on each worker (this client's accepted ones among them)."""
        with self._lock:
            self._reported = {index: streams[index] for index in self._connections if index < len(streams)}
            self._accepted_since = dict.fromkeys(self._connections, 0)
            self._reports += 1

    def acquire(self) -> Placement[Connection]:
        """The least busy worker (ties at random) and its connection; `release` it after."""
        with self._lock:
            reported = self._reported
            busy = self._open if reported is None else {
                i: reported.get(i, 0) + self._accepted_since[i] + self._unaccepted[i] for i in self._connections
            }
            least = min(busy.values())
            index = random.choice([i for i, n in busy.items() if n == least])
            self._open[index] += 1
            self._unaccepted[index] += 1
            return Placement(index, self._connections[index], self)

    def accepted(self, placement: Placement[Connection]) -> None:
        """The server accepted the call: the next report counts it."""
        with self._lock:
            if placement.accepted_after is None:
                self._unaccepted[placement.index] -= 1
                self._accepted_since[placement.index] += 1
                placement.accepted_after = self._reports

    def release(self, placement: Placement[Connection]) -> None:
        with self._lock:
            index = placement.index
            self._open[index] -= 1
            if placement.accepted_after is None:
                self._unaccepted[index] -= 1
            elif placement.accepted_after < self._reports and self._reported is not None:
                self._reported[index] = max(0, self._reported.get(index, 0) - 1)  # a report counted it
            else:
                self._accepted_since[index] = max(0, self._accepted_since[index] - 1)

    @contextlib.contextmanager
    def placed(self) -> Iterator[Placement[Connection]]:
        """One call's placement, counted as open until the block ends."""
        placement = self.acquire()
        try:
            yield placement
        finally:
            self.release(placement)


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

    def accepted(self, metadata: Iterable[tuple[str, str | bytes]] | None,
                 placement: Placement[Connection] | None = None) -> None:
        """A call's initial metadata (the call placed by `placement`, when spread): see `seen`."""
        if placement is not None:
            placement.pool.accepted(placement)  # before the report its metadata carries, which counts it
        self.seen(worker_of(metadata))

    def seen(self, worker: WorkerId | None) -> None:
        """A worker a call reached: the streams it reports open on each worker update the pool; a
        worker of another server run (a restart) makes the client search again before its next call."""
        with self._lock:
            pool = self._pool
            if pool is not None and worker is not None and worker.run != pool.run:
                self._stale.extend(c for c in pool.connections if c is not self.first)
                self._pool = None
                return
        if pool is not None and worker is not None and worker.streams is not None:
            pool.report(worker.streams)

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
        self._streams = worker.streams if worker else None  # the latest report seen

    @property
    def done(self) -> bool:
        return self._worker is None or len(self._found) == self._worker.count or self._tries_left <= 0

    def offer(self, connection: Connection, worker: WorkerId | None) -> bool:
        """True if the search keeps `connection` (a worker not found yet); else the caller closes it."""
        self._tries_left -= 1
        if self._worker is None or worker is None or worker.run != self._worker.run:
            return False
        self._streams = worker.streams or self._streams
        if worker.index in self._found:
            return False
        self._found[worker.index] = connection
        return True

    def pool(self) -> WorkerPool[Connection]:
        return WorkerPool(self._worker.run if self._worker else None, self._found, self._streams)
