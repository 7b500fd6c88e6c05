"""Shared fixtures: the test data pack beside the checkout, and small image helpers."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (faces, videos). CI has it; a checkout without it skips these tests."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"test data pack not found at {SHARED_DATA} (CI provides ../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def portrait_bgr() -> np.ndarray:
    """The public-domain NASA portrait shipped as the demo asset."""
    image = cv2.imread(str(REPO / "server" / "demo" / "eileen_collins_nasa.jpg"))
    assert image is not None
    return image
