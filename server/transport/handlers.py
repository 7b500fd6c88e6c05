"""The base of the server's interceptors: each replaces a method's handler by one of its own."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc


class HandlerInterceptor(grpc.ServerInterceptor):
    """Hands each method's handler (never a missing one: gRPC answers UNIMPLEMENTED) to `handler_for`."""

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(handler_call_details)
        return None if handler is None else self.handler_for(handler, handler_call_details)

    def handler_for(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        raise NotImplementedError
