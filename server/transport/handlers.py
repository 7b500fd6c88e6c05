"""The base of the server's interceptors, each replacing a method's handler by one of its own, and
the one way they build the replacement."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

# gRPC's handler factories, by (request streaming, response streaming).
_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class HandlerInterceptor(grpc.ServerInterceptor):
    """Hands each method's handler (never a missing one: gRPC answers UNIMPLEMENTED) to `handler_for`."""

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(handler_call_details)
        return None if handler is None else self.handler_for(handler, handler_call_details)

    def handler_for(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        raise NotImplementedError


def behaviour_of(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    return handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream


def with_behaviour(
    handler: grpc.RpcMethodHandler, behaviour: Callable[..., Any], *,
    request_deserializer: Callable[[bytes], Any] | None, request_streaming: bool | None = None,
) -> grpc.RpcMethodHandler:
    """`handler` doing `behaviour` instead, its requests read by `request_deserializer` (and as a
    stream when `request_streaming` says so); its responses as before."""
    streaming = handler.request_streaming if request_streaming is None else request_streaming
    make = _FACTORIES[(streaming, handler.response_streaming)]
    return make(behaviour, request_deserializer=request_deserializer, response_serializer=handler.response_serializer)
