"""Client for the acroscreen screening service. See `ScreeningClient`."""

from .client import ScreeningClient, ScreenOptions
from .types import FrameData, FrameResult, ImageKind, ModelInfo, SubjectResult

__all__ = ["FrameData", "FrameResult", "ImageKind", "ModelInfo", "ScreenOptions", "ScreeningClient", "SubjectResult"]
