"""ScreenImages requests over the message limit are refused by the client before sending (no network)."""

from __future__ import annotations

import asyncio

import pytest
from acroscreen.client import ScreeningClient
from acroscreen.client.aio import AsyncScreeningClient
from acroscreen.client.client import ScreenOptions, images_request
from acroscreen.client.errors import InvalidRequestError
from acroscreen.client.types import FrameData

# Nothing listens here: a client that sent anything would fail with UnavailableError instead.
NOWHERE = "127.0.0.1:9"
LIMIT = 1024 * 1024


def _photos(count: int, size: int) -> list[FrameData]:
    return [FrameData(b"\xff\xd8" + bytes(size - 2), index=index) for index in range(count)]


def test_a_request_within_the_limit_carries_every_image() -> None:
    request = images_request(_photos(3, 300_000), ScreenOptions(subject_id="S-1"), LIMIT)
    assert len(request.images) == 3 and request.options.subject_id == "S-1"
    assert request.ByteSize() <= LIMIT


def test_a_request_over_the_limit_is_refused_with_its_size() -> None:
    with pytest.raises(InvalidRequestError, match=r"over the 1048576-byte message limit") as refused:
        images_request(_photos(2, 600_000), ScreenOptions(), LIMIT)
    assert refused.value.code is None  # no server answered


def test_both_clients_refuse_before_sending() -> None:
    with ScreeningClient(NOWHERE, max_message_bytes=LIMIT, timeout_s=2.0) as client, pytest.raises(InvalidRequestError):
        client.screen_images(_photos(2, 600_000))

    async def screen() -> None:
        async with AsyncScreeningClient(NOWHERE, max_message_bytes=LIMIT, timeout_s=2.0) as client:
            await client.screen_images(_photos(2, 600_000))

    with pytest.raises(InvalidRequestError):
        asyncio.run(screen())
