"""Deployment integration against a real server: a real Prometheus (Debian's `prometheus`
package) scrapes it on loopback and the frame counter comes back through Prometheus's HTTP API;
the image's health-check script answers as probes expect.

Skips, saying so, where the prometheus binary is absent (`make test` installs it when it can).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from acroscreen.client import ScreeningClient, ScreenOptions
from acroscreen.client.sources import video_frames
from acroscreen.server.main import RunningServer

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


def test_prometheus_scrapes_the_frame_counter(server: RunningServer, prometheus: str, shared_data: Path) -> None:
    frames = [frame for _, frame in zip(range(FRAMES), video_frames(shared_data / "videos" / "retalking_face1.mp4"))]
    before = float(_metric_now(server, "acroscreen_frames_received_total"))
    with ScreeningClient(f"127.0.0.1:{server.port}", timeout_s=120) as client:
        result = client.screen(frames, ScreenOptions(subject_id="scrape", analyze_every_frame=True))
    assert result.frames_received == FRAMES
    expected = before + FRAMES

    screened_at = time.monotonic()
    deadline = screened_at + WAIT_S
    value = None
    while time.monotonic() < deadline:
        samples = _query(prometheus, 'acroscreen_frames_received_total{job="acroscreen"}')
        if samples:
            value = float(samples[0]["value"][1])
            if value >= expected:
                break
        time.sleep(0.25)
    round_trip = time.monotonic() - screened_at
    assert value == expected, f"Prometheus saw {value}, the server counted {expected}"
    print(f"\nscrape round trip: counter visible in Prometheus {round_trip:.2f} s after the stream ended (interval 1 s)")

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
