"""Bearer-token authentication and TLS credentials for the gRPC port.

Tokens are compared in constant time. The health service stays reachable
without a token unless `health_requires_auth` is set, so probes need no secret.
A caller is known to quotas and logs only by a short hash of its token.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health

from ..config import Settings
from ..errors import ConfigurationError, Unauthenticated
from .handlers import HandlerInterceptor, with_behaviour

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
ANONYMOUS = "anonymous"
_REFLECTION_SERVICES = ("grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")


def load_tokens(settings: Settings) -> tuple[str, ...]:
    tokens = [t.strip() for t in settings.auth_tokens.split(",") if t.strip()]
    if settings.auth_tokens_file is not None:
        try:
            lines = settings.auth_tokens_file.read_text().splitlines()
        except OSError as error:
            raise ConfigurationError(f"cannot read tokens file {settings.auth_tokens_file}: {error.strerror}") from error
        tokens += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not tokens and (settings.auth_tokens.strip() or settings.auth_tokens_file is not None):
        # A file whose last token was commented out must not turn authentication off.
        raise ConfigurationError("tokens were configured but none was given: name at least one, or neither the "
                                 "tokens file nor ACROSCREEN_AUTH_TOKENS to serve without authentication")
    if any(len(token) < 16 for token in tokens):
        raise ConfigurationError("bearer tokens must be at least 16 characters")
    return tuple(tokens)


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == AUTHORIZATION and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    return None


def principal_of(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """A stable, non-reversible name for the caller: a hash of its token, or 'anonymous'."""
    token = bearer_token(metadata)
    if token is None:
        return ANONYMOUS
    return "token-" + hashlib.sha256(token.encode()).hexdigest()[:12]


class TokenAuthInterceptor(HandlerInterceptor):
    def __init__(self, tokens: Sequence[str], *, health_requires_auth: bool) -> None:
        self._tokens = tuple(token.encode() for token in tokens)
        exempt = set(_REFLECTION_SERVICES) if not health_requires_auth else set()
        if not health_requires_auth:
            exempt.add(health.SERVICE_NAME)
        self._exempt = frozenset(exempt)

    def _valid(self, token: str | None) -> bool:
        if token is None:
            return False
        given = token.encode()
        matched = False
        for accepted in self._tokens:  # compare with all, in constant time each
            matched |= hmac.compare_digest(given, accepted)
        return matched

    def handler_for(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        service = details.method.split("/")[1] if details.method.count("/") >= 2 else ""
        if service in self._exempt or self._valid(bearer_token(details.invocation_metadata)):
            return handler
        return _refusing(handler)


class _Unread:
    """What a refused caller's request is taken for: its bytes are never parsed. (Not None: to gRPC,
    a deserializer's None means the bytes could not be parsed, which it answers INTERNAL.)"""


_UNREAD = _Unread()


def _discard(_data: bytes) -> _Unread:
    return _UNREAD


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    def refuse(_request: Any, _context: grpc.ServicerContext) -> Any:
        raise Unauthenticated("missing or invalid bearer token")  # mapped to a status in transport/errors.py

    # A refused caller's bytes are not worth parsing (up to 32 MiB).
    return with_behaviour(handler, refuse, request_deserializer=_discard)


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS (and mTLS with a client CA) when configured; None means plaintext, which must be allowed:
    on a loopback address always (no other host can reach it), elsewhere only with --insecure."""
    if settings.tls_cert is None or settings.tls_key is None:
        if not _is_loopback(settings.host) and not settings.insecure:
            raise ConfigurationError(
                f"refusing plaintext gRPC on {settings.host}: give --tls-cert/--tls-key, or --insecure to accept it"
            )
        return None
    try:
        key = settings.tls_key.read_bytes()
        chain = settings.tls_cert.read_bytes()
        client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    except OSError as error:
        raise ConfigurationError(f"cannot read TLS file {error.filename}: {error.strerror}") from error
    _check_tls_files(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _check_tls_files(cert: Path, key: Path, client_ca: Path | None) -> None:
    """Refuse at start what gRPC would only fail to bind with ("cannot listen"): files that are not
    PEM, or a key that does not match the certificate. Checked by the standard library's TLS."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # A key under a pass phrase gRPC cannot use either: an empty one fails it, where OpenSSL would prompt.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except (ssl.SSLError, OSError) as error:
        reason = getattr(error, "reason", None) or error.strerror or error
        raise ConfigurationError(
            f"TLS certificate {cert} and key {key} cannot be used ({reason}): "
            "both must be PEM, the key the certificate's and without a pass phrase"
        ) from error
    if client_ca is not None:
        try:
            context.load_verify_locations(client_ca)
        except ssl.SSLError as error:
            raise ConfigurationError(f"TLS client CA {client_ca} cannot be used ({error.reason or error}): it must be PEM") from error


def warn_about_exposure(host: str, port: int, *, encrypted: bool, tokens: bool) -> None:
    """A warning in the log for each protection the listening port lacks, so an operator sees it
    even where it was allowed (plaintext on loopback, no tokens)."""
    address = f"{host}:{port}"
    if not encrypted:
        reach = "reachable from this host only" if _is_loopback(host) else "frames of faces cross the network unencrypted"
        log.warning("serving PLAINTEXT gRPC on %s (%s): give --tls-cert/--tls-key to turn TLS on", address, reach)
    if not tokens:
        log.warning(
            "no bearer tokens configured: anyone who can reach %s can screen; give --auth-tokens-file"
            " or ACROSCREEN_AUTH_TOKENS",
            address,
        )


def _is_loopback(host: str) -> bool:
    name = host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
