"""A small typed client for the screening service (sync, gRPC)."""

from __future__ import annotations

import time

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from acroscreen.v1 import screening_pb2 as pb
from acroscreen.v1 import screening_pb2_grpc as pb_grpc

from . import types
from .errors import AcroscreenClientError, ServerError, UnavailableError, from_rpc_error
from .types import FrameData, FrameResult, ModelInfo, SubjectResult

DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024
StreamEvent = FrameResult | SubjectResult


@dataclass(frozen=True, slots=True, kw_only=True)
class ScreenOptions:
    """Per-subject options; zeros mean the server's defaults (see the .proto)."""

    subject_id: str = ""
    max_analyzed_frames: int = 0
    min_analysis_interval_ms: int = 0
    analyze_every_frame: bool = False
    update_every_frames: int = 0

    def message(self) -> pb.SessionOptions:
        return pb.SessionOptions(
            subject_id=self.subject_id,
            max_analyzed_frames=self.max_analyzed_frames,
            min_analysis_interval_ms=self.min_analysis_interval_ms,
            analyze_every_frame=self.analyze_every_frame,
            update_every_frames=self.update_every_frames,
        )


class ScreeningClient:
    """Use as a context manager. Failed calls raise `acroscreen.client.errors` exceptions."""

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._timeout_s = timeout_s
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
            ],
        )
        self._stub = pb_grpc.ScreeningStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> ScreeningClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def screen_stream(self, frames: Iterable[FrameData], options: ScreenOptions = ScreenOptions()) -> Iterator[StreamEvent]:
        """Stream frames; yields each frame's result and subject updates, the FINAL result last."""

        def requests() -> Iterator[pb.ScreenRequest]:
            yield pb.ScreenRequest(options=options.message())
            for frame in frames:
                yield pb.ScreenRequest(frame=types.frame_message(frame))

        try:
            for response in self._stub.ScreenStream(requests(), timeout=self._timeout_s):
                if response.WhichOneof("payload") == "frame_result":
                    yield types.frame_result(response.frame_result)
                else:
                    yield types.subject_result(response.subject)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error

    def screen(
        self,
        frames: Iterable[FrameData],
        options: ScreenOptions = ScreenOptions(),
        on_event: Callable[[StreamEvent], None] | None = None,
    ) -> SubjectResult:
        """Stream frames and return the final subject result."""
        final: SubjectResult | None = None
        for event in self.screen_stream(frames, options):
            if on_event is not None:
                on_event(event)
            if isinstance(event, SubjectResult):
                final = event
        if final is None or final.status not in ("final", "insufficient_evidence"):
            raise ServerError("the stream ended without a final subject result")
        return final

    def screen_images(self, images: Iterable[FrameData], options: ScreenOptions = ScreenOptions()) -> SubjectResult:
        request = pb.ScreenImagesRequest(
            options=options.message(), images=[types.frame_message(image) for image in images]
        )
        try:
            return types.subject_result(self._stub.ScreenImages(request, timeout=self._timeout_s))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error

    def model_info(self) -> ModelInfo:
        try:
            return types.model_info(self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self._timeout_s))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error

    def health(self, service: str = "") -> str:
        """SERVING, NOT_SERVING, … as the server's health service reports it."""
        try:
            response = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self._timeout_s or 5.0)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_until_serving(self, timeout_s: float = 30.0) -> None:
        """Block until health says SERVING (the model is loaded and warmed up)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.health() == "SERVING":
                    return
            except AcroscreenClientError:
                pass
            if time.monotonic() >= deadline:
                raise UnavailableError(f"server not SERVING after {timeout_s:.0f} s")
            time.sleep(0.2)
