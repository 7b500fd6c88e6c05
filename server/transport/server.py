"""The gRPC server: servicer, error interceptor, health, reflection, message limits."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from acroscreen.v1 import screening_pb2 as pb
from acroscreen.v1 import screening_pb2_grpc as pb_grpc

from ..config import Settings
from ..service.screening import ScreeningService
from .errors import ErrorMappingInterceptor
from .servicer import ScreeningServicer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Screening"].full_name
# Each stream holds a handler thread and a reader thread; leave room for unary calls.
_THREADS_PER_STREAM = 2
_SPARE_THREADS = 8


class GrpcServer:
    """Starts NOT_SERVING; `attach()` plugs in the service and flips health to SERVING."""

    def __init__(self, settings: Settings) -> None:
        self._servicer = ScreeningServicer()
        self._health = health.HealthServicer()
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=settings.max_streams * _THREADS_PER_STREAM + _SPARE_THREADS),
            interceptors=[ErrorMappingInterceptor()],
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        pb_grpc.add_ScreeningServicer_to_server(self._servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        self.port = self._server.add_insecure_port(f"{settings.host}:{settings.port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {settings.host}:{settings.port}")
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    def start(self) -> None:
        self._server.start()

    def attach(self, service: ScreeningService) -> None:
        self._servicer.attach(service)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def drain(self) -> None:
        """Tell probes and balancers to stop sending work."""
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    def stop(self, grace_s: float) -> None:
        self._server.stop(grace_s).wait()

    def wait(self) -> None:
        self._server.wait_for_termination()

    def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            self._health.set(name, status)
