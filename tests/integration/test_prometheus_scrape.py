"""Deployment integration against a real server: a real Prometheus (Debian's `prometheus`
package) scrapes it on loopback during a screening, and the received and analysed frame counters
come back through Prometheus's HTTP API while the stream is still open, then at their final
values; the image's health-check script answers as probes expect.

Skips, saying so, where the prometheus binary is absent (`make test` installs it when it can).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from acroscreen.client import ScreeningClient, ScreenOptions
from acroscreen.client.sources import video_frames
from acroscreen.server.main import RunningServer

from .conftest import start_server

REPO = Path(__file__).resolve().parents[2]
HEALTHCHECK = REPO / "deploy" / "docker" / "healthcheck.py"
PROMETHEUS = shutil.which("prometheus")
WAIT_S = 30.0
FRAMES = 20


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.fixture()
def prometheus(server: RunningServer, tmp_path: Path) -> Iterator[str]:
    if PROMETHEUS is None:
        pytest.skip("prometheus not installed (Debian package 'prometheus': apt-get install -y prometheus)")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(REPO / "deploy" / "prometheus" / "alerts.yml")],
        "scrape_configs": [
            {"job_name": "acroscreen", "static_configs": [{"targets": [f"127.0.0.1:{server.metrics_port}"]}]}
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "prometheus not ready in time"
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _query(base: str, expression: str) -> list[dict]:
    body = _get_json(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expression}))
    assert body["status"] == "success", body
    return body["data"]["result"]


def _value(base: str, expression: str) -> float | None:
    samples = _query(base, expression)
    return float(samples[0]["value"][1]) if samples else None


def _wait_for(base: str, expression: str, done: Callable[[float], bool]) -> tuple[float | None, float]:
    """Poll Prometheus until `done(value)`; the last value seen and how long it took."""
    started = time.monotonic()
    value = None
    while time.monotonic() - started < WAIT_S:
        value = _value(base, expression)
        if value is not None and done(value):
            break
        time.sleep(0.25)
    return value, time.monotonic() - started


RECEIVED = 'acroscreen_frames_received_total{job="acroscreen"}'
ANALYZED = 'acroscreen_frames_analyzed_total{job="acroscreen"}'
ACTIVE = 'acroscreen_active_streams{job="acroscreen"}'


def test_prometheus_scrapes_the_frame_counters_during_a_screening(
    server: RunningServer, prometheus: str, shared_data: Path
) -> None:
    frames = [frame for _, frame in zip(range(FRAMES), video_frames(shared_data / "videos" / "retalking_face1.mp4"))]
    received_before = _metric_now(server, "acroscreen_frames_received_total")
    analyzed_before = _metric_now(server, "acroscreen_frames_analyzed_total")
    first_half = FRAMES // 2
    during: dict[str, float | None] = {}

    def frames_pausing_halfway() -> Iterator:
        """Send half the clip, then hold the stream open until Prometheus has seen those frames."""
        yield from frames[:first_half]
        during["received"], during["received_after_s"] = _wait_for(
            prometheus, RECEIVED, lambda v: v >= received_before + first_half
        )
        during["analyzed"], _ = _wait_for(prometheus, ANALYZED, lambda v: v > analyzed_before)
        during["active"] = _value(prometheus, ACTIVE)
        yield from frames[first_half:]

    with ScreeningClient(f"127.0.0.1:{server.port}", timeout_s=120) as client:
        result = client.screen(frames_pausing_halfway(), ScreenOptions(subject_id="scrape", analyze_every_frame=True))
    assert result.frames_received == FRAMES and result.frames_analyzed > 0

    # while the stream was open (it held the rest of the clip back meanwhile)
    assert during["received"] == received_before + first_half, f"Prometheus saw {during}, mid-stream"
    assert during["analyzed"] is not None and analyzed_before < during["analyzed"] <= analyzed_before + first_half
    assert during["active"] == 1, "the stream was open when Prometheus was read"
    print(f"\nscrape round trip: received frames visible in Prometheus {during['received_after_s']:.2f} s"
          " after they were sent, mid-stream (interval 1 s)")

    # and after it ended: the final counts, the stream gone
    expected_analyzed = analyzed_before + result.frames_analyzed
    received, _ = _wait_for(prometheus, RECEIVED, lambda v: v >= received_before + FRAMES)
    analyzed, _ = _wait_for(prometheus, ANALYZED, lambda v: v >= expected_analyzed)
    active, _ = _wait_for(prometheus, ACTIVE, lambda v: v == 0)
    assert received == received_before + FRAMES, f"Prometheus saw {received} received"
    assert analyzed == expected_analyzed, f"Prometheus saw {analyzed} analysed, the server counted {expected_analyzed}"
    assert active == 0

    # the scrape carries the labels the rules and dashboards rely on
    (up,) = _query(prometheus, 'up{job="acroscreen"}')
    assert up["value"][1] == "1"
    ready = _query(prometheus, "acroscreen_model_ready")
    assert [s["value"][1] for s in ready] == ["1"]
    stages = {s["metric"]["stage"] for s in _query(prometheus, "acroscreen_stage_seconds_count")}
    assert "end_to_end" in stages
    # and the alert rules load and evaluate against it without error
    rules = _get_json(f"{prometheus}/api/v1/rules")["data"]["groups"]
    assert rules and all(rule["health"] in ("ok", "unknown") for group in rules for rule in group["rules"])


def _metric_now(server: RunningServer, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def _healthcheck(*args: str, port: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), "--port", str(port), *args], capture_output=True, text=True, timeout=30
    )


def test_image_healthcheck_script_answers_like_a_probe(server: RunningServer) -> None:
    serving = _healthcheck(port=server.port)
    assert serving.returncode == 0 and serving.stdout.strip() == "SERVING", serving.stderr
    ready = _healthcheck("--service", "acroscreen.v1.Screening", port=server.port)
    assert ready.returncode == 0, ready.stderr
    unknown = _healthcheck("--service", "no.such.Service", port=server.port)
    assert unknown.returncode == 1
    nobody = _healthcheck("--timeout", "1", port=_free_port())
    assert nobody.returncode == 2


def test_image_healthcheck_finds_the_server_where_its_settings_put_it() -> None:
    """The check read ACROSCREEN_PORT by itself and always asked 127.0.0.1: a server on IPv6's
    loopback (or any one address) failed its container's HEALTHCHECK. It reads the server's settings."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    running = start_server(host="[::1]", metrics_port=-1)
    try:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("ACROSCREEN_")}
        environ |= {"ACROSCREEN_HOST": "[::1]", "ACROSCREEN_PORT": str(running.port)}
        answer = subprocess.run([sys.executable, str(HEALTHCHECK)], capture_output=True, text=True, timeout=30, env=environ)
        assert answer.returncode == 0 and answer.stdout.strip() == "SERVING", answer.stderr
        refused = subprocess.run([sys.executable, str(HEALTHCHECK)], capture_output=True, text=True, timeout=30,
                                 env=environ | {"ACROSCREEN_PORT": "not-a-port"})
        assert refused.returncode == 2 and "ACROSCREEN_PORT" in refused.stderr
    finally:
        running.stop(grace_s=1.0)
