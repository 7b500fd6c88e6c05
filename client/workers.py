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

A target that names several servers — `dns:///acroscreen-headless.acroscreen.svc:50051` (every
pod of a headless Kubernetes Service), `ipv4:10.0.0.5:50051,10.0.0.6:50051` — is spread over
every worker of every server: each address gets its own search and worker pool (a call searches
one server not searched yet, so the first stream to a large cluster waits for one search, not
one a pod), each call goes to the least busy worker of all, and a `dns:` name is looked up again
every RESOLVE_INTERVAL_S, so pods the autoscaler adds get streams and pods that went away get
none (their connections close once their calls have ended). A server that does not answer is
left out until the next lookup.

The sync and async clients make the calls; the bookkeeping is here, once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

WORKER_KEY = "acroscreen-worker"  # sent by server/transport/workers.py
WORKER_STREAMS_KEY = "acroscreen-worker-streams"  # likewise, by a server of several workers

# Its own TCP connection for a channel: gRPC otherwise shares one among channels to one target.
OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)

Connection = TypeVar("Connection")
Metadata = Iterable[tuple[str, str | bytes]]  # a call's initial metadata

# More workers than any one machine's cores: a server naming more is not searched (the search
# opens up to 6 connections per worker).
MAX_WORKERS = 256


# More streams than one worker could hold: a larger count is garbled, not a load.
MAX_REPORTED_STREAMS = 1 << 20

# A spreading client looks a `dns:` name up again this often (pods come and go), and this soon
# while none of its servers answers.
RESOLVE_INTERVAL_S = 30.0
RESOLVE_RETRY_S = 2.0
# A client's next stream waits at most this long for the one before to be accepted (ms on a LAN).
TURN_HOLD_S = 3.0
DEFAULT_PORT = 443  # gRPC's, for a target that names none


@dataclass(frozen=True, slots=True)
class WorkerId:
    run: str  # random per server start
    index: int
    count: int
    streams: tuple[int, ...] | None = field(default=None, compare=False)  # open on each worker, when reported


def check_spread_options(options: Iterable[tuple[str, object]]) -> None:
    """Spreading places each call itself, over every server a target names: a load-balancing policy
    would move calls off the worker they were placed on."""
    if any(name == "grpc.lb_policy_name" for name, _ in options):
        raise ValueError("spread_over_workers balances calls over every server the target names (a dns:/// "
                         "name is looked up for all its addresses): leave grpc.lb_policy_name off")


@dataclass(frozen=True, slots=True)
class ServerAddress:
    """One server of a target that names several: a gRPC target for it alone, and the name its
    calls carry as their authority (what TLS checks the certificate against), if not the address."""

    target: str  # "ipv4:10.0.0.5:50051" or "ipv6:[fd00::5]:50051"
    authority: str | None = None

    def channel_options(self) -> list[tuple[str, Any]]:
        return [("grpc.default_authority", self.authority)] if self.authority else []


Lookup = Callable[..., list[tuple[Any, ...]]]


def names_several_servers(target: str) -> bool:
    """A `dns:`, `ipv4:` or `ipv6:` target, which may name several servers (`servers_named`);
    ValueError for a `dns:` target with a DNS server of its own, which the system resolver cannot ask."""
    scheme, _, rest = target.partition(":")
    if scheme == "dns":
        if rest.startswith("//") and rest[2:].partition("/")[0]:
            raise ValueError(f"spread_over_workers looks names up with the system resolver; {target!r} names a "
                             "DNS server of its own: use dns:///name:port")
        _host_port(rest.removeprefix("//").removeprefix("/"))
    return scheme in ("dns", "ipv4", "ipv6") and bool(rest)


def servers_named(target: str, lookup: Lookup = socket.getaddrinfo) -> list[ServerAddress] | None:
    """Every server a `dns:` (looked up now), `ipv4:` or `ipv6:` target names, in its order; None
    for a target that names one server (`host:port`, `unix:`), reached as it is. A name that does
    not resolve names none ([]): the client looks again later."""
    if not names_several_servers(target):
        return None
    scheme, _, rest = target.partition(":")
    if scheme in ("ipv4", "ipv6"):
        return [ServerAddress(f"{scheme}:{address}") for address in rest.split(",") if address]
    host, port = _host_port(rest.removeprefix("//").removeprefix("/"))
    try:
        found = lookup(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    addresses: dict[str, None] = {}
    for family, _type, _proto, _name, sockaddr in found:
        if family == socket.AF_INET:
            addresses[f"ipv4:{sockaddr[0]}:{port}"] = None
        elif family == socket.AF_INET6:
            addresses[f"ipv6:[{sockaddr[0]}]:{port}"] = None
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return [ServerAddress(address, authority) for address in addresses]


def _host_port(name: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or a bare host (gRPC's default port); ValueError for a bad port."""
    host, port = name, str(DEFAULT_PORT)
    if name.startswith("["):
        host, _, after = name[1:].partition("]")
        port = after[1:] if after.startswith(":") else port
    elif name.count(":") == 1:
        host, _, port = name.partition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not a host and port: {name!r}")
    return host, int(port)


def worker_of(metadata: Metadata | None) -> WorkerId | None:
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

    def least_busy(self) -> int:
        """How busy its least busy worker is: which of several servers' pools to place a call on."""
        with self._lock:
            return min(self._busy().values())

    @property
    def idle(self) -> bool:
        """No call of this client is open on any of its workers."""
        with self._lock:
            return not any(self._open.values())

    def _busy(self) -> dict[int, int]:
        reported = self._reported
        return self._open if reported is None else {
            i: reported.get(i, 0) + self._accepted_since[i] + self._unaccepted[i] for i in self._connections
        }

    def acquire(self) -> Placement[Connection]:
        """The least busy worker (ties at random) and its connection; `release` it after."""
        with self._lock:
            busy = self._busy()
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
    """A client's connections to one server: its first one, the worker pool searched from it (None
    until found, or once stale), and the connections of stale pools, all closed with the client.
    ``address``: the server, where the client's target names several (None: the target itself).
    Thread-safe."""

    def __init__(self, first: Connection, address: ServerAddress | None = None) -> None:
        self.first = first
        self.address = address
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

    def accepted(self, metadata: Metadata | None,
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

    @property
    def idle(self) -> bool:
        """No call of this client is open on this server's workers (their pool)."""
        pool = self._pool
        return pool is None or pool.idle


class ServerSet(Generic[Connection]):
    """The servers a spreading client places calls on: the one its target names, or every address
    of a target that names several (`servers_named`), with when to look the name up again, which
    servers did not answer since, and the servers gone from the name whose connections close once
    idle. The client does the lookups and opens the connections. Thread-safe."""

    def __init__(self, first: Connection, several: bool) -> None:
        self.first = first  # to the target as given: health checks, and calls when no server is known
        self._several = several
        self._servers: dict[str, WorkerConnections[Connection]] = {} if several else {"": WorkerConnections(first)}
        self._failed: set[str] = set()
        self._retired: list[WorkerConnections[Connection]] = []
        self._next_lookup = 0.0
        self._lock = threading.Lock()
        self._placing = threading.Lock()

    @property
    def lookup_due(self) -> bool:
        return self._several and time.monotonic() >= self._next_lookup

    def looked_up(
        self, addresses: Sequence[ServerAddress], connect: Callable[[ServerAddress], Connection],
    ) -> list[Connection]:
        """The servers a fresh lookup named: new ones get a first connection (`connect`), gone ones
        take no more calls. Returns the connections to close now (gone servers with no call open)."""
        with self._lock:
            named = {address.target: address for address in addresses}
            for target in [t for t in self._servers if t not in named]:
                self._retired.append(self._servers.pop(target))
            for target, address in named.items():
                if target not in self._servers:
                    self._servers[target] = WorkerConnections(connect(address), address)
            self._failed.clear()
            self._next_lookup = time.monotonic() + (RESOLVE_INTERVAL_S if self._servers else RESOLVE_RETRY_S)
            retired, self._retired = self._retired, []
            closing = []
            for server in retired:
                (closing if server.idle else self._retired).append(server)
        return [connection for server in closing for connection in server.all()]

    def usable(self) -> list[WorkerConnections[Connection]]:
        """The servers to place calls on: all but those that did not answer since the last lookup."""
        with self._lock:
            return [server for target, server in self._servers.items() if target not in self._failed]

    def failed(self, server: WorkerConnections[Connection]) -> bool:
        """A server did not answer. One of several takes no calls until the next lookup (sooner
        when none is left): True. The only one stays (its calls fail or succeed on their own): False."""
        with self._lock:
            if not self._several or server.address is None:
                return False
            self._failed.add(server.address.target)
            if len(self._failed) >= len(self._servers):
                self._next_lookup = min(self._next_lookup, time.monotonic() + RESOLVE_RETRY_S)
            return True

    @contextlib.contextmanager
    def placed(self, pools: Sequence[WorkerPool[Connection]]) -> Iterator[Placement[Connection]]:
        """One call on the least busy worker of all the pools (ties at random), counted as open
        until the block ends. Picked and counted in one step: calls placed at once by other
        threads would otherwise see the same least busy server and crowd onto it."""
        with self._placing:
            busy = [pool.least_busy() for pool in pools]
            least = min(busy)
            placement = random.choice([pool for pool, n in zip(pools, busy) if n == least]).acquire()
        try:
            yield placement
        finally:
            placement.pool.release(placement)

    def accepted(self, metadata: Metadata | None,
                 placement: Placement[Connection] | None = None) -> None:
        """A call's initial metadata, to the server the call was placed on (see `WorkerConnections.accepted`)."""
        servers = self._known()
        if placement is None:
            if not self._several:
                servers[0].accepted(metadata)
            return
        server = next((s for s in servers if s.pool is placement.pool), None)
        if server is not None:
            server.accepted(metadata, placement)
        else:  # a pool replaced since (its server restarted): only the placement's own count
            placement.pool.accepted(placement)

    def all(self) -> list[Connection]:
        """Every connection the client opened and kept, each once."""
        connections = [self.first, *(c for server in self._known() for c in server.all())]
        return list({id(c): c for c in connections}.values())

    def _known(self) -> list[WorkerConnections[Connection]]:
        """The servers named now and those retired whose connections are still open."""
        with self._lock:
            return [*self._servers.values(), *self._retired]


class StreamAcceptance(Generic[Connection]):
    """Called with a stream's initial metadata: counts the stream on the server it was placed on
    (`placement`, when spread), and gives back the client's turn to place streams (`release_turn`),
    once; `release` gives it back sooner: the stream failed first, or its server is taking longer
    than TURN_HOLD_S (a wedged server must not hold up the client's other streams). Thread-safe."""

    def __init__(self, servers: ServerSet[Connection], release_turn: Callable[[], None] | None) -> None:
        self._servers = servers
        self._release_turn = release_turn
        self._lock = threading.Lock()
        self.placement: Placement[Connection] | None = None

    def __call__(self, metadata: Metadata | None) -> None:
        if metadata:
            self._servers.accepted(metadata, self.placement)
        self.release()

    def release(self) -> None:
        with self._lock:
            release, self._release_turn = self._release_turn, None
        if release is not None:
            release()


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
