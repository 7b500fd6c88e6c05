"""The client's bookkeeping for spreading calls over the worker processes of one or several servers (no network)."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from acroscreen.client import ScreeningClient
from acroscreen.client.aio import AsyncScreeningClient
from acroscreen.client.workers import (
    RESOLVE_RETRY_S,
    WORKER_KEY,
    WORKER_STREAMS_KEY,
    ServerAddress,
    ServerSet,
    WorkerId,
    WorkerPool,
    WorkerSearch,
    connection_budget,
    servers_named,
    worker_of,
)
from acroscreen.server.transport.workers import WorkerIdentity


def test_the_client_reads_the_worker_the_server_names() -> None:
    identity = WorkerIdentity(instance="a1b2", index=2, count=4)
    assert worker_of([("x-request-id", "r"), *identity.metadata()]) == WorkerId("a1b2", 2, 4)
    assert worker_of([(WORKER_KEY, b"a1b2:0/1")]) == WorkerId("a1b2", 0, 1)
    assert worker_of([("x-request-id", "r")]) is None  # an older server names none
    assert worker_of(None) is None
    for garbled in ("a1b2", "a1b2:x/4", "a1b2:4/4", "a1b2:-1/4", "a1b2:0/100000"):
        assert worker_of([(WORKER_KEY, garbled)]) is None


def test_each_call_goes_to_the_worker_with_the_fewest_open_and_ties_are_random() -> None:
    pool = WorkerPool("run", {0: "c0", 1: "c1", 2: "c2"})
    first = [pool.acquire() for _ in range(3)]
    assert sorted((p.index, p.connection) for p in first) == [(0, "c0"), (1, "c1"), (2, "c2")]  # one on each
    pool.release(next(p for p in first if p.index == 1))
    assert pool.acquire().connection == "c1"  # the only one with a free place
    # With all free, many one-call clients pick every worker, not always the first.
    picks = {WorkerPool("run", {0: "c0", 1: "c1", 2: "c2"}).acquire().index for _ in range(60)}
    assert picks == {0, 1, 2}


def test_the_streams_a_worker_of_several_reports_open_reach_the_client() -> None:
    run = WorkerIdentity.new_instance(3)
    second = dataclasses.replace(run, index=1)
    with second.stream(), second.stream(), dataclasses.replace(run, index=2).stream():
        assert worker_of(second.metadata()) == WorkerId(run.instance, 1, 3)
        assert worker_of(second.metadata()).streams == (0, 2, 1)
    assert worker_of(run.metadata()).streams == (0, 0, 0)  # each stream uncounted when it ends
    assert len(WorkerIdentity.new_instance().metadata()) == 1  # one process: nothing to balance, no count
    for garbled in ("1,2", "1,x,3", "1,-2,3", ""):
        worker = worker_of([(WORKER_KEY, "r:0/3"), (WORKER_STREAMS_KEY, garbled)])
        assert worker == WorkerId("r", 0, 3) and worker.streams is None  # ignored, never an error


def test_calls_go_to_the_worker_least_busy_by_the_last_report_plus_calls_placed_since() -> None:
    pool = WorkerPool("run", {0: "c0", 1: "c1", 2: "c2"}, streams=(4, 1, 5))  # mostly other clients' streams
    early = [pool.acquire() for _ in range(3)]
    assert [p.index for p in early] == [1, 1, 1]  # worker 1 at 4 now, as busy as worker 0
    pool.accepted(early[0])
    pool.accepted(early[1])
    pool.report((6, 3, 6))  # the server had accepted two of them when it answered
    assert pool.acquire().index == 1  # 3 reported + 1 not accepted yet: 4 of 6 / 4 / 6
    pool.release(early[0])  # the report counted it: 6 / 2 + 2 waiting / 6
    pool.accepted(early[2])  # accepted after the report: counted apart until the next one
    assert [pool.acquire().index for _ in range(2)] == [1, 1]  # 6 / 2 + 1 + 1 / 6, then 6 / 5 / 6
    assert pool.acquire().index in (0, 1, 2)  # 6 / 6 / 6: a tie


def test_a_report_asked_for_while_a_call_waits_to_be_accepted_still_counts_that_call() -> None:
    """Threads of one client each ask for a fresh report, then place a stream: a report the server
    wrote before the other thread's stream was accepted must not make the client forget it."""
    pool = WorkerPool("run", {0: "c0", 1: "c1"}, streams=(0, 0))
    first = pool.acquire()
    pool.report((0, 0))  # the second thread's fresh report, written before the first call was accepted
    second = pool.acquire()
    assert second.index != first.index
    pool.accepted(first)
    pool.report((1, 0) if first.index == 0 else (0, 1))  # the first call's own metadata
    third = pool.acquire()
    assert third.index in (0, 1)  # 1 / 1: a tie
    pool.release(third)
    pool.release(second)  # never accepted: off the calls waiting
    assert pool.acquire().index == second.index


def test_a_pool_without_reports_keeps_counting_its_own_calls() -> None:
    pool = WorkerPool("run", {0: "c0", 1: "c1"})
    a, b = pool.acquire(), pool.acquire()
    assert {a.index, b.index} == {0, 1}
    pool.release(a)
    assert pool.acquire().index == a.index


def test_a_search_keeps_one_connection_per_worker_of_its_run_and_stops_at_its_budget() -> None:
    search = WorkerSearch("first", WorkerId("run", 1, 3))
    assert not search.done
    assert not search.offer("again-1", WorkerId("run", 1, 3))  # a worker already found
    assert not search.offer("other-run", WorkerId("old", 0, 3))  # a worker of another server start
    assert not search.offer("silent", None)
    assert search.offer("c0", WorkerId("run", 0, 3))
    assert search.offer("c2", WorkerId("run", 2, 3))
    assert search.done
    assert sorted(search.pool().connections) == ["c0", "c2", "first"]

    unlucky = WorkerSearch("first", WorkerId("run", 0, 2))
    for _ in range(connection_budget(2)):
        assert not unlucky.done
        unlucky.offer("same", WorkerId("run", 0, 2))
    assert unlucky.done and unlucky.pool().connections == ["first"]  # gave up: calls go to the one found


def test_a_server_that_names_no_worker_needs_no_search() -> None:
    assert WorkerSearch("only", None).done
    assert WorkerSearch("only", WorkerId("run", 0, 1)).done
    with pytest.raises(ValueError, match="needs a connection"):
        WorkerPool("run", {})


@pytest.mark.parametrize("client_class", [ScreeningClient, AsyncScreeningClient])
def test_spreading_refuses_a_balancing_policy_and_a_dns_server_it_cannot_ask(client_class: type) -> None:
    with pytest.raises(ValueError, match="leave grpc.lb_policy_name off"):
        client_class("dns:///acroscreen-headless:50051", options=[("grpc.lb_policy_name", "round_robin")],
                     spread_over_workers=True)
    with pytest.raises(ValueError, match="system resolver"):
        client_class("dns://10.0.0.10/acroscreen-headless:50051", spread_over_workers=True)
    with pytest.raises(ValueError, match="not a host and port"):
        client_class("dns:///acroscreen-headless:grpc", spread_over_workers=True)


def test_the_servers_a_target_names() -> None:
    assert servers_named("127.0.0.1:50051") is None  # one server, reached as given
    assert servers_named("unix:/run/acroscreen.sock") is None
    assert servers_named("ipv4:10.0.0.5:50051,10.0.0.6:50052") == [
        ServerAddress("ipv4:10.0.0.5:50051"), ServerAddress("ipv4:10.0.0.6:50052")]
    assert servers_named("ipv6:[fd00::5]:50051") == [ServerAddress("ipv6:[fd00::5]:50051")]
    # dns: names are looked up with the system resolver, every address, each once.
    assert ServerAddress("ipv4:127.0.0.1:50051", "localhost:50051") in servers_named("dns:///localhost:50051")
    assert servers_named("dns:localhost") == servers_named("dns:///localhost:443")  # gRPC's default port
    assert servers_named("dns:///[::1]:50051") == [ServerAddress("ipv6:[::1]:50051", "[::1]:50051")]
    assert servers_named("dns:///no-such-host.invalid:50051") == []  # none now: looked up again later


def test_every_address_of_a_name_is_a_server_called_by_the_name() -> None:
    """A headless Service's name resolves to its pods (the lookup stands in for cluster DNS): each
    address is a server; calls carry the name, which a TLS certificate names, as their authority."""
    def lookup(host: str, port: int, type: int) -> list[tuple]:
        assert (host, port, type) == ("acroscreen-headless.acroscreen.svc", 50051, socket.SOCK_STREAM)
        return [(socket.AF_INET, type, 6, "", ("10.1.0.7", port)), (socket.AF_INET6, type, 6, "", ("fd00::7", port, 0, 0)),
                (socket.AF_INET, type, 6, "", ("10.1.0.7", port)), (socket.AF_INET, type, 6, "", ("10.1.0.9", port))]

    servers = servers_named("dns:///acroscreen-headless.acroscreen.svc:50051", lookup)
    assert [s.target for s in servers] == ["ipv4:10.1.0.7:50051", "ipv6:[fd00::7]:50051", "ipv4:10.1.0.9:50051"]
    assert {s.authority for s in servers} == {"acroscreen-headless.acroscreen.svc:50051"}
    assert servers[0].channel_options() == [("grpc.default_authority", "acroscreen-headless.acroscreen.svc:50051")]


def test_a_call_goes_to_the_least_busy_worker_of_every_server() -> None:
    a = WorkerPool("a", {0: "a0", 1: "a1"}, streams=(3, 3))
    b = WorkerPool("b", {0: "b0", 1: "b1"}, streams=(1, 5))
    servers = ServerSet("target", several=True)
    with contextlib.ExitStack() as open_calls:
        placed = [open_calls.enter_context(servers.placed([a, b])) for _ in range(5)]
        assert [p.connection for p in placed[:2]] == ["b0", "b0"]  # 1 → 3: now as busy as a0 and a1
        assert sorted(p.connection for p in placed[2:]) == ["a0", "a1", "b0"]
        assert not a.idle
    assert a.idle and b.idle  # each call counted off when it ended
    # Calls placed at once from many threads still spread evenly.
    pools = [WorkerPool(name, {0: f"{name}0", 1: f"{name}1"}) for name in "abc"]
    calls = [servers.placed(pools) for _ in range(12)]
    with ThreadPoolExecutor(12) as threads:
        placements = list(threads.map(lambda call: call.__enter__(), calls))
    assert sorted(Counter(p.connection for p in placements).values()) == [2] * 6


def test_servers_come_and_go_with_the_name() -> None:
    opened: list[str] = []

    def connect(address: ServerAddress) -> str:
        opened.append(address.target)
        return f"first:{address.target}"

    servers = ServerSet("target", several=True)
    assert servers.lookup_due and servers.usable() == []
    assert servers.looked_up([ServerAddress("ipv4:a:1"), ServerAddress("ipv4:b:1")], connect) == []
    assert not servers.lookup_due and opened == ["ipv4:a:1", "ipv4:b:1"]
    a, b = servers.usable()
    b.found(WorkerPool("b", {0: "b0", 1: "b1"}))
    busy = b.pool.acquire()
    assert servers.failed(a) and servers.usable() == [b]  # left out until the next lookup
    # The next lookup: a answers again, b is gone but has a call open, c is new.
    assert servers.looked_up([ServerAddress("ipv4:a:1"), ServerAddress("ipv4:c:1")], connect) == []
    assert [s.address.target for s in servers.usable()] == ["ipv4:a:1", "ipv4:c:1"]
    assert opened == ["ipv4:a:1", "ipv4:b:1", "ipv4:c:1"]  # a kept its connection
    assert "b0" in servers.all()  # still open for its call
    b.pool.release(busy)
    closed = servers.looked_up([ServerAddress("ipv4:a:1"), ServerAddress("ipv4:c:1")], connect)
    assert sorted(closed) == ["b0", "b1", "first:ipv4:b:1"] and "b0" not in servers.all()
    # A name with no server answering is looked up again soon, not in 30 s.
    for server in servers.usable():
        servers.failed(server)
    assert servers._next_lookup - time.monotonic() <= RESOLVE_RETRY_S


def test_one_server_is_never_left_out() -> None:
    servers = ServerSet("target", several=False)
    (only,) = servers.usable()
    assert only.first == "target" and not servers.lookup_due
    assert not servers.failed(only) and servers.usable() == [only]
