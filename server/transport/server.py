"""The gRPC server: servicer, error interceptor, health, reflection, message limits."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import grpc
from acroscreen.v1 import screening_pb2 as pb
from acroscreen.v1 import screening_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..config import Settings
from ..errors import ConfigurationError
from ..service.screening import ScreeningService
from .auth import (
    TokenAuthInterceptor,
    load_tokens,
    server_credentials,
    warn_about_exposure,
)
from .admission import CallAdmission
from .errors import ErrorMappingInterceptor
from .servicer import ScreeningServicer
from .workers import WorkerIdentity

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Screening"].full_name
METHODS = tuple(method.name for method in pb.DESCRIPTOR.services_by_name["Screening"].methods)
# Handler threads: the service admits up to --max-streams streams and as many ScreenImages calls
# (refusing the rest at once), each holding one, and as many calls of each method may wait for
# their first message (admission refuses more, and cancels a silent one); spare threads keep model
# info and those refusals from queueing behind them. Health and reflection have threads of their own.
_CAPPED_CALL_KINDS = 2 + len(METHODS)
_SPARE_THREADS = 8


def min_client_ping_interval_ms(settings: Settings) -> int:
    """The shortest gap between a client's pings (without data) that the server accepts: half its own
    keepalive interval. More frequent pings get GOAWAY "too_many_pings"; the client's defaults
    (acroscreen.client.client.KEEPALIVE_TIME_S) match the server's and so stay above this."""
    return int(settings.keepalive_time_s * 1000 / 2)


# Messages up to this many times --max-message-bytes are read, so that a frame over the limit is
# rejected by itself (too_large, from decoding's byte check) and its stream goes on; gRPC would end
# the whole call at its receive limit. Beyond it (a runaway sender) the call still ends.
OVERSIZE_READ_FACTOR = 4

class GrpcServer:
    """Starts NOT_SERVING; `attach()` plugs in the service and flips health to SERVING."""

    def __init__(self, settings: Settings, worker: WorkerIdentity) -> None:
        self._servicer = ScreeningServicer(worker)
        self._admission = CallAdmission(
            main_service=SERVICE_NAME, main_methods=METHODS, max_waiting=settings.max_streams,
            max_waiting_per_caller=settings.max_streams_per_token or settings.max_streams,
            large_requests=frozenset({f"/{SERVICE_NAME}/ScreenImages"}),
        )
        self._health = health.HealthServicer()
        credentials = server_credentials(settings)
        # The error mapping is outermost, so it also maps what the authentication refuses; admission
        # is innermost, so a refused caller is refused before its request is awaited or read.
        interceptors: list[grpc.ServerInterceptor] = [ErrorMappingInterceptor()]
        tokens = load_tokens(settings)
        if settings.max_streams_per_token and not tokens:  # callers claim unchecked tokens: a fresh one, a fresh quota
            raise ConfigurationError("max_streams_per_token is a quota per bearer token: it needs tokens to check")
        if tokens:
            interceptors.append(TokenAuthInterceptor(tokens, health_requires_auth=settings.health_requires_auth))
        interceptors.append(self._admission)
        # No maximum_concurrent_rpcs: it would refuse health checks too (a flood of calls would fail the
        # liveness probe); admission and the service cap calls themselves, with retry pushback.
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=settings.max_streams * _CAPPED_CALL_KINDS + _SPARE_THREADS),
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes * OVERSIZE_READ_FACTOR),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
                ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * 1000)),
                ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * 1000)),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", min_client_ping_interval_ms(settings)),
                ("grpc.http2.max_pings_without_data", 0),
            ],
        )
        pb_grpc.add_ScreeningServicer_to_server(self._servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        address = f"{settings.host}:{settings.port}"
        try:
            if credentials is None:
                self.port = self._server.add_insecure_port(address)
            else:
                self.port = self._server.add_secure_port(address, credentials)
        except RuntimeError as error:  # grpcio's "Failed to bind"
            raise ConfigurationError(f"cannot listen on {address} (in use, or not an address of this host)") from error
        warn_about_exposure(settings.host, self.port, encrypted=credentials is not None, tokens=bool(tokens))
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
        self._admission.stop()

    def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            self._health.set(name, status)
