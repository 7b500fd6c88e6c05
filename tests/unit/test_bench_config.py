"""Bench settings that cannot make a meaningful run are refused before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from acroscreen.server.bench import BenchConfig


def test_streams_must_all_start_before_the_run_ends() -> None:
    assert BenchConfig(videos=(Path("v.mp4"),), duration_s=10.0, ramp_s=9.5).ramp_s == 9.5
    for ramp_s in (-1.0, 10.0, 12.0):
        with pytest.raises(ValueError, match="ramp_s"):
            BenchConfig(videos=(Path("v.mp4"),), duration_s=10.0, ramp_s=ramp_s)
