"""Client for the acroscreen screening service. See `ScreeningClient`."""

from .client import Credentials, RetryPolicy, ScreeningClient, ScreenOptions
from .types import FrameAck, FrameData, FrameResult, ImageKind, ModelInfo, SubjectResult

__all__ = ["Credentials", "RetryPolicy", "FrameAck", "FrameData", "FrameResult", "ImageKind", "ModelInfo", "ScreenOptions", "ScreeningClient", "SubjectResult"]
