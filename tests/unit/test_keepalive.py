"""The clients' keepalive defaults match the server's: a client that pings more often than the
server accepts gets GOAWAY "too_many_pings", which ends every call on its connection."""

from __future__ import annotations

import inspect

import pytest
from acroscreen.client.aio import AsyncScreeningClient
from acroscreen.client.client import (
    KEEPALIVE_TIME_S,
    KEEPALIVE_TIMEOUT_S,
    ScreeningClient,
    channel_options,
)
from acroscreen.server.config import Settings
from acroscreen.server.transport.server import min_client_ping_interval_ms


def test_client_keepalive_constants_are_the_server_defaults() -> None:
    server = Settings()
    assert (KEEPALIVE_TIME_S, KEEPALIVE_TIMEOUT_S) == (server.keepalive_time_s, server.keepalive_timeout_s)


@pytest.mark.parametrize("client_class", [ScreeningClient, AsyncScreeningClient])
def test_clients_default_to_those_constants(client_class: type) -> None:
    parameters = inspect.signature(client_class).parameters
    assert parameters["keepalive_time_s"].default == KEEPALIVE_TIME_S
    assert parameters["keepalive_timeout_s"].default == KEEPALIVE_TIMEOUT_S


def test_client_pings_no_more_often_than_the_server_accepts() -> None:
    options = dict(channel_options(1024))
    assert options["grpc.keepalive_time_ms"] >= min_client_ping_interval_ms(Settings())
    assert options["grpc.keepalive_timeout_ms"] == int(Settings().keepalive_timeout_s * 1000)
