"""The client's bookkeeping for spreading calls over a server's worker processes (no network)."""

from __future__ import annotations

import pytest
from acroscreen.client import ScreeningClient
from acroscreen.client.aio import AsyncScreeningClient
from acroscreen.client.workers import WORKER_KEY, WorkerId, WorkerPool, WorkerSearch, connection_budget, worker_of
from acroscreen.server.transport.servicer import WorkerIdentity


def test_the_client_reads_the_worker_the_server_names() -> None:
    identity = WorkerIdentity(instance="a1b2", index=2, count=4)
    assert worker_of([("x-request-id", "r"), identity.metadata()]) == WorkerId("a1b2", 2, 4)
    assert worker_of([(WORKER_KEY, b"a1b2:0/1")]) == WorkerId("a1b2", 0, 1)
    assert worker_of([("x-request-id", "r")]) is None  # an older server names none
    assert worker_of(None) is None
    for garbled in ("a1b2", "a1b2:x/4", "a1b2:4/4", "a1b2:-1/4", "a1b2:0/100000"):
        assert worker_of([(WORKER_KEY, garbled)]) is None


def test_each_call_goes_to_the_worker_with_the_fewest_open_and_ties_are_random() -> None:
    pool = WorkerPool("run", {0: "c0", 1: "c1", 2: "c2"})
    first = [pool.acquire() for _ in range(3)]
    assert sorted(first) == [(0, "c0"), (1, "c1"), (2, "c2")]  # one call on each
    pool.release(1)
    assert pool.acquire() == (1, "c1")  # the only one with a free place
    # With all free, many one-call clients pick every worker, not always the first.
    picks = {WorkerPool("run", {0: "c0", 1: "c1", 2: "c2"}).acquire()[0] for _ in range(60)}
    assert picks == {0, 1, 2}


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
def test_spreading_refuses_a_balancing_policy_over_several_servers(client_class: type) -> None:
    with pytest.raises(ValueError, match="one server's workers"):
        client_class("dns:///acroscreen-headless:50051", options=[("grpc.lb_policy_name", "round_robin")],
                     spread_over_workers=True)
