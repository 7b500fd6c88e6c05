#!/opt/acroscreen/bin/python
"""acroscreen-healthcheck: ask the local server's grpc.health.v1 service; exit 0 when SERVING.

Used by the images' HEALTHCHECK and, where the gRPC port serves TLS, by Kubernetes exec probes
(the kubelet's built-in gRPC probe speaks plaintext only before Kubernetes 1.37).

    acroscreen-healthcheck [--service acroscreen.v1.Screening] [--tls-ca ca.crt --server-name NAME]

It reads the server's own settings (the ACROSCREEN_ environment, by the server's own code), so
it finds the server where the server listens: ACROSCREEN_PORT, and ACROSCREEN_HOST (a wildcard
address as the loopback). When ACROSCREEN_TLS_CERT is set, the check uses TLS, trusting --tls-ca
(default: the server's own certificate chain, which suffices for a self-signed certificate) and
checking the certificate against --server-name. Where the server has bearer tokens
(ACROSCREEN_AUTH_TOKENS_FILE or ACROSCREEN_AUTH_TOKENS), the check sends the first one, so it
passes with ACROSCREEN_HEALTH_REQUIRES_AUTH too. Exit codes: 0 SERVING, 1 NOT_SERVING or unknown
service, 2 no answer (or refused, or settings the server would refuse too).
"""

from __future__ import annotations

import argparse
import sys

from acroscreen.server.config import Settings, reachable_host


def main() -> int:
    try:
        settings = Settings.load()
    except ValueError as error:
        print(f"health check failed: {error}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=settings.port)
    parser.add_argument("--service", default="", help='health service name ("" = the whole server)')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    parser.add_argument("--tls-ca", default=None, help="PEM CA bundle that signed the server certificate")
    parser.add_argument("--server-name", default="localhost", help="name the server certificate must carry")
    parser.add_argument("--client-cert", default=None, help="PEM client certificate (mutual TLS)")
    parser.add_argument("--client-key", default=None, help="PEM client key (mutual TLS)")
    args = parser.parse_args()

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = f"{reachable_host(settings.host)}:{args.port}"
    if settings.tls_cert is not None or args.tls_ca:
        root = _read(args.tls_ca or str(settings.tls_cert))
        key = _read(args.client_key) if args.client_key else None
        chain = _read(args.client_cert) if args.client_cert else None
        credentials = grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=chain)
        channel = grpc.secure_channel(target, credentials, options=[("grpc.ssl_target_name_override", args.server_name)])
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        token = _servers_token(settings)
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout,
                metadata=(("authorization", f"Bearer {token}"),) if token else None,
            )
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else None
            print(f"health check failed: {code}", file=sys.stderr)
            return 1 if code == grpc.StatusCode.NOT_FOUND else 2
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(status)
    return 0 if status == "SERVING" else 1


def _servers_token(settings: Settings) -> str | None:
    """The first of the server's own bearer tokens, read by the server's own code from its settings."""
    from acroscreen.server.transport.auth import load_tokens

    tokens = load_tokens(settings)
    return tokens[0] if tokens else None


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


if __name__ == "__main__":
    sys.exit(main())
