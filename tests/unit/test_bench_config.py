"""Bench settings that cannot make a meaningful run are refused before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from acroscreen.server.bench import BenchConfig, replayed


def test_streams_must_all_start_before_the_run_ends() -> None:
    assert BenchConfig(videos=(Path("v.mp4"),), duration_s=10.0, ramp_s=9.5).ramp_s == 9.5
    for ramp_s in (-1.0, 10.0, 12.0):
        with pytest.raises(ValueError, match="ramp_s"):
            BenchConfig(videos=(Path("v.mp4"),), duration_s=10.0, ramp_s=ramp_s)


def test_a_replayed_clip_never_jumps_unless_asked_to() -> None:
    assert [replayed(i, 4, "ping-pong") for i in range(10)] == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
    assert [replayed(i, 4, "wrap") for i in range(6)] == [0, 1, 2, 3, 0, 1]
    assert [replayed(i, 1, "ping-pong") for i in range(3)] == [0, 0, 0]
    with pytest.raises(ValueError, match="replay"):
        BenchConfig(videos=(Path("v.mp4"),), replay="shuffle")


def test_several_servers_are_started_not_targeted() -> None:
    assert BenchConfig(videos=(Path("v.mp4"),), servers=2).servers == 2
    for bad in ({"servers": 0}, {"servers": 2, "server": "127.0.0.1:50051"}):
        with pytest.raises(ValueError, match="servers"):
            BenchConfig(videos=(Path("v.mp4"),), **bad)
