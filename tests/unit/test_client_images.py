"""ScreenImages requests over the message limit are refused by the client before sending (no network)."""

from __future__ import annotations

import asyncio

import pytest
from acroscreen.client import ScreeningClient
from acroscreen.client.aio import AsyncScreeningClient
from acroscreen.client.client import IMAGES_PER_REQUEST, REQUEST_FRAMING_BYTES, OneRequestPhotos, ScreenOptions, images_request
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


def test_photos_fit_one_request_up_to_the_count_and_the_byte_room() -> None:
    room = LIMIT - REQUEST_FRAMING_BYTES
    by_count = OneRequestPhotos(LIMIT)
    assert all(by_count.add(photo) for photo in _photos(IMAGES_PER_REQUEST, 100))
    assert not by_count.add(_photos(1, 100)[0])  # one photo too many
    by_bytes = OneRequestPhotos(LIMIT)
    full = _photos(4, room // 4)
    assert all(by_bytes.add(photo) for photo in full)
    images_request(full, ScreenOptions(subject_id="S-1"), LIMIT)  # what fits the room fits the message limit
    assert not by_bytes.add(_photos(1, 10)[0])
