"""A real server on a free loopback port, shared by the integration tests."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from acroscreen.client import ScreeningClient
from acroscreen.server.config import Settings
from acroscreen.server.main import RunningServer, start

BASE_SETTINGS = Settings(host="127.0.0.1", port=0, metrics_port=0, allow_untrained=True, max_streams=4)


def start_server(**overrides: object) -> RunningServer:
    return start(dataclasses.replace(BASE_SETTINGS, **overrides))


@pytest.fixture(scope="session")
def server() -> Iterator[RunningServer]:
    running = start_server()
    yield running
    running.stop(grace_s=2.0)


@pytest.fixture()
def client(server: RunningServer) -> Iterator[ScreeningClient]:
    with ScreeningClient(f"127.0.0.1:{server.port}", timeout_s=120) as screening_client:
        yield screening_client
