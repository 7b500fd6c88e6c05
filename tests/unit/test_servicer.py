"""The servicer's stream bookkeeping, with the gRPC context stood in for where a real channel cannot
time the event (a client cancelling between its options and the server's first answer)."""

from __future__ import annotations

import logging

import grpc
import pytest

from acroscreen.server.metrics import Metrics
from acroscreen.server.runtime.decode import DecodeLimits
from acroscreen.server.runtime.preprocess import FacePreprocessor, PreprocessSettings
from acroscreen.server.service.batcher import BatcherConfig, DynamicBatcher
from acroscreen.server.service.pipeline import FrameAnalyzer
from acroscreen.server.service.screening import ScreeningService
from acroscreen.server.service.session import StreamLimits
from acroscreen.server.service.types import ModelInfo, ModelRef, PreprocessingInfo
from acroscreen.server.transport.errors import ErrorMappingInterceptor
from acroscreen.server.transport.servicer import ScreeningServicer
from acroscreen.server.transport.workers import WorkerIdentity
from acroscreen.v1 import screening_pb2 as pb


class _CancelledBeforeTheFirstAnswer:
    """What grpc does when the client is gone: sending the initial metadata raises."""

    def invocation_metadata(self) -> tuple:
        return ()

    def send_initial_metadata(self, metadata: object) -> None:
        raise grpc.RpcError("the client cancelled")

    def add_callback(self, callback: object) -> bool:
        return False

    def set_trailing_metadata(self, metadata: object) -> None:
        pass

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        raise Exception(details)  # what grpc's abort() raises

    def cancel(self) -> None:
        pass

    def is_active(self) -> bool:
        return True


def test_a_stream_cancelled_before_its_first_answer_gives_its_slot_back(caplog: pytest.LogCaptureFixture) -> None:
    """The slot was given back only by the answer loop, which such a call never reaches: after
    max_streams of them the server refused every stream. Nor is such a call an unexpected error."""
    metrics = Metrics()
    analyzer = FrameAnalyzer(preprocessor=FacePreprocessor(PreprocessSettings()),
                             batcher=DynamicBatcher(lambda crops: [], BatcherConfig(), metrics),
                             decode_limits=DecodeLimits(max_bytes=1 << 20, max_pixels=1 << 22), metrics=metrics)
    info = ModelInfo(model=ModelRef(name="m", version="0", kind="test", sha256=""), class_labels=("1", "2", "3"),
                     preprocessing=PreprocessingInfo(input_size=160, mean=127.5, std=128.0, channel_order="rgb",
                                                     box_height_expand=0.4, alignment="similarity-eyes-v1",
                                                     landmark_points=5),
                     temperature=1.0, arithmetic="fp32", architecture="test", intended_use="test", notices=())
    service = ScreeningService(analyzer=analyzer, model_info=info, metrics=metrics, max_streams=2,
                               max_streams_per_principal=0, limits=StreamLimits(), analysis_backlog=2,
                               update_every_frames=10, min_frames_for_score=1)
    servicer = ScreeningServicer(WorkerIdentity.new_instance())
    servicer.attach(service)
    screen_stream = ErrorMappingInterceptor().intercept_service(
        lambda details: grpc.stream_stream_rpc_method_handler(servicer.ScreenStream), None).stream_stream
    for _ in range(3):  # one more than max_streams: a leaked slot would refuse the last
        requests = iter([pb.ScreenRequest(options=pb.SessionOptions(subject_id="S-1"))])
        context = _CancelledBeforeTheFirstAnswer()
        with caplog.at_level(logging.INFO), pytest.raises(Exception, match="the caller went away"):
            list(screen_stream(requests, context))
        assert context.code is grpc.StatusCode.CANCELLED and service.active_streams == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # no "unexpected error" traceback
    assert service.wait_idle(timeout_s=1.0)  # a drain does not wait for them either
