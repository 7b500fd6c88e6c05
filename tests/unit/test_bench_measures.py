"""What the bench measures: percentiles, the measured window of several load processes, and the
started server's ports read from what it prints."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from acroscreen.client import FrameData
from acroscreen.server import bench

# In a load process of `_started_together`: when it imported this module, to unpickle its task.
IMPORTED_AT = time.monotonic()


def test_percentiles_are_the_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    random.Random(0).shuffle(values)
    assert bench._percentiles(values) == {"p50": 50.0, "p95": 95.0, "p99": 99.0}
    assert bench._percentiles([float(v) for v in range(1, 21)]) == {"p50": 10.0, "p95": 19.0, "p99": 20.0}
    assert bench._percentiles([7.0]) == {"p50": 7.0, "p95": 7.0, "p99": 7.0}
    assert bench._percentiles([]) == {"p50": None, "p95": None, "p99": None}


def _report(clips: list[list[FrameData]], started: float, name: str) -> tuple:
    return name, len(clips), started, IMPORTED_AT, time.monotonic(), os.getpid()


def test_the_clock_starts_once_every_load_process_is_ready() -> None:
    """Spawning the load processes, importing and handing them the clips happen before the clock starts."""
    clocks: list[int] = []

    def start_clock() -> float:
        clocks.append(len(multiprocessing.active_children()))
        return time.monotonic()

    clips = [[FrameData(b"jpeg", index=i) for i in range(3)]] * 2
    results, started = bench._started_together(_report, [("a",), ("b",)], clips, start_clock)
    assert clocks == [2]
    assert [(name, count, given) for name, count, given, *_ in results] == [("a", 2, started), ("b", 2, started)]
    assert all(imported < started <= running for *_, imported, running, _pid in results)
    assert len({pid for *_, pid in results}) == 2 and os.getpid() not in {pid for *_, pid in results}


def test_a_run_called_off_before_the_clock_leaves_no_load_process_waiting() -> None:
    def start_clock() -> float:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        bench._started_together(_report, [("a",)], [[FrameData(b"jpeg")]], start_clock)
    assert multiprocessing.active_children() == []


def _printing(text: str, *, ended: bool = True) -> tuple[SimpleNamespace, int]:
    """A started server's stand-in that printed `text` on stdout (and ended), and its stdout's write end."""
    read, write = os.pipe()
    os.write(write, text.encode())
    if ended:
        os.close(write)
    stdout = open(read, encoding="utf-8")  # noqa: SIM115 — bench's reader closes it at its end
    return SimpleNamespace(stdout=stdout, poll=lambda: 1 if ended else None), write


def test_server_ports_are_read_whatever_the_host_and_without_metrics() -> None:
    process, _ = _printing("acroscreen model process ready (metrics :-1)\n"
                           "acroscreen serving on localhost:5001 (metrics :6001)\n"
                           "acroscreen serving on localhost:5001 (metrics :-1)\n")
    assert bench._read_ports(process, 2, 10) == ("localhost:5001", ["http://127.0.0.1:6001/metrics"], [])
    process, _ = _printing("acroscreen model process ready (metrics :7001)\n"
                           "acroscreen serving on ::1:5001 (metrics :6001)\n")
    assert bench._read_ports(process, 1, 10) == ("[::1]:5001", ["http://[::1]:6001/metrics"], ["http://[::1]:7001/metrics"])
    for host, reached in (("[::1]", "[::1]"), ("::", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"), ("10.0.0.2", "10.0.0.2")):
        assert bench._read_ports(_printing(f"acroscreen serving on {host}:1 (metrics :2)\n")[0], 1, 10)[0] == f"{reached}:1"
    # With several workers each process's own /metrics is on the loopback, whatever --host is.
    process, _ = _printing("acroscreen model process ready (metrics :7001)\n"
                           "acroscreen serving on 10.0.0.2:5001 (metrics :6001)\n"
                           "acroscreen serving on 10.0.0.2:5001 (metrics :6002)\n")
    assert bench._read_ports(process, 2, 10) == (
        "10.0.0.2:5001", ["http://127.0.0.1:6001/metrics", "http://127.0.0.1:6002/metrics"], ["http://127.0.0.1:7001/metrics"]
    )


def test_several_servers_are_named_in_one_target_of_their_address_family() -> None:
    """--servers N named its servers as `ipv4:` whatever their --host: servers on IPv6 or a name
    were a target the clients could not reach."""
    assert bench.several_servers_target(["127.0.0.1:1", "127.0.0.1:2"]) == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert bench.several_servers_target(["[::1]:1", "[::1]:2"]) == "ipv6:[::1]:1,[::1]:2"
    by_name = bench.several_servers_target(["localhost:1", "localhost:2"])
    assert by_name in ("ipv4:127.0.0.1:1,127.0.0.1:2", "ipv6:[::1]:1,[::1]:2")
    with pytest.raises(ValueError, match="address family"):
        bench.several_servers_target(["127.0.0.1:1", "[::1]:2"])


def test_a_server_that_does_not_stop_is_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "SERVER_STOP_TIMEOUT_S", 0.5)
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                 "print(flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
    assert stubborn.stdout is not None and stubborn.stdout.readline()  # its SIGTERM handler is in place
    started = time.monotonic()
    bench._stop([stubborn])
    assert stubborn.returncode == -signal.SIGKILL and time.monotonic() - started < 5
    stubborn.stdout.close()


def test_a_server_that_never_says_it_is_serving_is_an_error_naming_what_it_printed() -> None:
    with pytest.raises(RuntimeError, match=r"ended \(exit status 1\).*'cannot start: no model'"):
        bench._read_ports(_printing("cannot start: no model\n")[0], 1, 10)
    process, write = _printing("acroscreen serving on somewhere (metrics :2)\n", ended=False)
    started = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=r"within 0.3 s.*'acroscreen serving on somewhere \(metrics :2\)'"):
            bench._read_ports(process, 1, 0.3)
        assert time.monotonic() - started < 5
    finally:
        os.close(write)  # the reader sees the end and closes the read end
