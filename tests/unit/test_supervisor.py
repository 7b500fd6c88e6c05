"""The supervisor's own machinery (`--workers`), in isolation: forking and its early /metrics."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import urllib.request

from acroscreen.server.config import Settings
from acroscreen.server.main import _MetricsSum

# Run apart from pytest's threads: a fork copies only the forking one.
_STOP_BEFORE_THE_CHILDS_HANDLER = """
import os, signal, time
from acroscreen.server import main

signal.signal(signal.SIGTERM, lambda *_: None)  # the parent's handler, which the child inherits

def body():
    time.sleep(0.3)  # the stop arrives meanwhile, before the child's own handler is set
    got = []
    signal.signal(signal.SIGTERM, lambda *_: got.append(1))
    main._accept_stops()
    time.sleep(0.1)
    return 0 if got else 3

pid = main._fork(body, close=[])
os.kill(pid, signal.SIGTERM)
_, status = os.waitpid(pid, 0)
raise SystemExit(os.waitstatus_to_exitcode(status))
"""


def test_a_stop_sent_to_a_child_before_its_handlers_are_set_reaches_them() -> None:
    """A worker ran the supervisor's inherited handler until it set its own, and that handler
    swallowed a SIGTERM: the worker then served on, and the pod waited for SIGKILL."""
    run = subprocess.run([sys.executable, "-c", _STOP_BEFORE_THE_CHILDS_HANDLER], capture_output=True, text=True,
                         timeout=30)
    assert run.returncode == 0, (run.returncode, run.stderr)


def test_early_metrics_answer_while_a_silent_connection_is_open() -> None:
    """Served inline while the model loads: a connection that sends nothing (a TCP probe) held the
    supervisor's only thread, which then saw neither the model ready nor a stop."""
    metrics = _MetricsSum(Settings(workers=2, metrics_port=0))
    port = metrics.socket.getsockname()[1]
    scraped: list[str] = []

    def scrape() -> None:
        scraped.append(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode())

    try:
        with socket.create_connection(("127.0.0.1", port)):  # says nothing
            started = time.monotonic()
            metrics.answer_waiting()
            assert time.monotonic() - started < 3.0
            scraper = threading.Thread(target=scrape)
            scraper.start()
            while scraper.is_alive() and time.monotonic() - started < 15:
                metrics.answer_waiting()
                time.sleep(0.05)
            scraper.join()
    finally:
        metrics.socket.close()
    assert "acroscreen_model_ready 0.0" in scraped[0]  # no process has reported: a model not ready, not a target down


def test_the_server_forbids_core_dumps_for_itself_and_its_children() -> None:
    """A core file of a crashed server holds the frames of faces in its memory: none may be written."""
    probe = (
        "import ctypes, resource, subprocess, sys\n"
        "from acroscreen.server.main import forbid_core_dumps\n"
        "forbid_core_dumps()\n"
        "child = subprocess.run([sys.executable, '-c', 'import resource; print(resource.getrlimit(resource.RLIMIT_CORE))'],"
        " capture_output=True, text=True).stdout.strip()\n"
        "print(resource.getrlimit(resource.RLIMIT_CORE), ctypes.CDLL(None).prctl(3, 0, 0, 0, 0), child)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.split() == ["(0,", "0)", "0", "(0,", "0)"], out
