"""Client for the acroscreen screening service. See `ScreeningClient`."""

from .client import Credentials, RetryPolicy, ScreeningClient, ScreenOptions
from .types import FrameData, FrameResult, ImageKind, ModelInfo, SubjectResult

__all__ = ["Credentials", "RetryPolicy", "FrameData", "FrameResult", "ImageKind", "ModelInfo", "ScreenOptions", "ScreeningClient", "SubjectResult"]
