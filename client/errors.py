"""The client's exceptions. Every gRPC failure is re-raised as one of these,
chosen by status code (never by message text), with the RpcError as __cause__, and
`request_id` set to the server's id for the call (quote it: the server's log lines name it).

    AcroscreenClientError
    ├── InvalidRequestError      INVALID_ARGUMENT, OUT_OF_RANGE, FAILED_PRECONDITION; also raised
    │                            before sending a ScreenImages request over the message limit
    ├── ServerBusyError          RESOURCE_EXHAUSTED (retry_after_s from the server's pushback;
    │                            None for a stream's own limit, which a retry meets again)
    ├── UnavailableError         UNAVAILABLE (server down, starting or draining; safe to retry)
    ├── DeadlineExceededError    DEADLINE_EXCEEDED
    ├── AuthenticationError      UNAUTHENTICATED, PERMISSION_DENIED
    ├── CancelledError           CANCELLED
    └── ServerError              INTERNAL, UNKNOWN and anything else
"""

from __future__ import annotations

import grpc

RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
REQUEST_ID_KEY = "x-request-id"


class AcroscreenClientError(Exception):
    """Base of every error the client raises for a failed call.

    `final_result` holds the subject result the server sent before the call
    failed (e.g. when a stream limit was reached), so no result is lost. `request_id` is the
    server's id for the call, or None when no server answered.
    """

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.final_result: object | None = None
        self.request_id: str | None = None


class InvalidRequestError(AcroscreenClientError):
    """The server refused the request as malformed; retrying will not help."""


class ServerBusyError(AcroscreenClientError):
    """A server limit was reached; retry after `retry_after_s`, or, when it is None (a stream's
    frame or duration limit), not with the same input."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message, code)
        self.retry_after_s = retry_after_s


class UnavailableError(AcroscreenClientError):
    """No server answered, or it is starting or shutting down."""


class DeadlineExceededError(AcroscreenClientError):
    """The call ran past its deadline."""


class AuthenticationError(AcroscreenClientError):
    """Credentials missing or refused."""


class CancelledError(AcroscreenClientError):
    """The call was cancelled."""


class ServerError(AcroscreenClientError):
    """The server failed; details are in its logs, not in this message."""


_BY_CODE: dict[grpc.StatusCode, type[AcroscreenClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequestError,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidRequestError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ServerBusyError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationError,
    grpc.StatusCode.CANCELLED: CancelledError,
}


def from_rpc_error(error: grpc.RpcError) -> AcroscreenClientError:
    """The client exception for a failed call (raise it `from error`)."""
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (error.details() if isinstance(error, grpc.Call) else None) or str(code)
    kind = _BY_CODE.get(code, ServerError)
    trailing = _trailing(error)
    request_id = request_id_of(error)
    message = f"{code.name}: {details}" + (f" (request id {request_id})" if request_id else "")
    if kind is ServerBusyError:
        failure: AcroscreenClientError = ServerBusyError(message, code, retry_after_s=_pushback_s(trailing))
    else:
        failure = kind(message, code)
    failure.request_id = request_id
    return failure


def _trailing(error: grpc.RpcError) -> dict[str, str]:
    if not isinstance(error, grpc.Call):
        return {}
    return {key: value for key, value in error.trailing_metadata() or () if isinstance(value, str)}


def request_id_of(error: grpc.RpcError) -> str | None:
    """The server's id for a failed call. A call that failed after it was accepted (a deadline, a
    server gone) may end without the server's trailing metadata; the id came with the initial then."""
    return _trailing(error).get(REQUEST_ID_KEY) or _initial(error).get(REQUEST_ID_KEY)


def _initial(error: grpc.RpcError) -> dict[str, str]:
    if not isinstance(error, grpc.Call):
        return {}
    return {key: value for key, value in error.initial_metadata() or () if isinstance(value, str)}


def _pushback_s(trailing: dict[str, str]) -> float | None:
    try:
        return int(trailing[RETRY_PUSHBACK_KEY]) / 1000.0
    except (KeyError, ValueError):
        return None
