"""TLS, mutual TLS and bearer tokens, with certificates made in the test."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from acroscreen.client import (
    Credentials,
    FrameData,
    ImageKind,
    RetryPolicy,
    ScreeningClient,
    ScreenOptions,
)
from acroscreen.client.cli import main as cli_main
from acroscreen.client.errors import AuthenticationError, UnavailableError
from acroscreen.server.config import Settings
from acroscreen.server.errors import ConfigurationError
from acroscreen.server.main import DEFAULT_WEIGHTS, RunningServer, start
from acroscreen.server.transport.server import GrpcServer
from acroscreen.server.transport.workers import WorkerIdentity
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.helpers import jpeg_bytes

from .conftest import BASE_SETTINGS, start_server

TOKEN = "s3cret-token-for-tests-0123456789"
NO_RETRY = RetryPolicy(attempts=1)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key, issuer: x509.Name, issuer_key, *, ca: bool, dns: str | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if dns:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


class _Pki:
    """A CA, a server certificate for localhost and a client certificate, as PEM files."""

    def __init__(self, folder: Path, ca_name: str = "acroscreen test CA") -> None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _certificate(ca_name, ca_key, _name(ca_name), ca_key, ca=True)
        self.ca = self._write(folder / "ca.pem", ca)
        for role, dns in (("server", "localhost"), ("client", None)):
            key = ec.generate_private_key(ec.SECP256R1())
            cert = _certificate(f"{role}", key, ca.subject, ca_key, ca=False, dns=dns)
            setattr(self, f"{role}_cert", self._write(folder / f"{role}.pem", cert))
            key_path = folder / f"{role}.key"
            key_path.write_bytes(
                key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            )
            setattr(self, f"{role}_key", key_path)

    @staticmethod
    def _write(path: Path, cert: x509.Certificate) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> _Pki:
    return _Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls_server(pki: _Pki) -> Iterator[RunningServer]:
    running = start_server(
        tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca, auth_tokens=TOKEN, metrics_port=-1
    )
    yield running
    running.stop(grace_s=1.0)


def _client(port: int, credentials: Credentials) -> ScreeningClient:
    return ScreeningClient(f"localhost:{port}", timeout_s=30, credentials=credentials, retry=NO_RETRY)


def test_mutual_tls_with_token_screens(mtls_server: RunningServer, pki: _Pki, portrait_bgr) -> None:
    credentials = Credentials.from_files(
        tls_ca=str(pki.ca), tls_cert=str(pki.client_cert), tls_key=str(pki.client_key)
    )
    with _client(mtls_server.port, Credentials(**{**_fields(credentials), "token": TOKEN})) as client:
        result = client.screen_images([FrameData(jpeg_bytes(portrait_bgr), ImageKind.JPEG)])
    assert result.status == "final" and result.frames_analyzed == 1


def test_missing_or_wrong_token_is_unauthenticated(mtls_server: RunningServer, pki: _Pki, portrait_bgr) -> None:
    base = Credentials.from_files(tls_ca=str(pki.ca), tls_cert=str(pki.client_cert), tls_key=str(pki.client_key))
    for token in (None, "wrong-token-but-long-enough-000"):
        with _client(mtls_server.port, Credentials(**{**_fields(base), "token": token})) as client:
            with pytest.raises(AuthenticationError):
                client.model_info()
            with pytest.raises(AuthenticationError):
                client.screen([FrameData(jpeg_bytes(portrait_bgr), ImageKind.JPEG)])
            assert client.health() == "SERVING"  # probes need no token


def test_a_refused_callers_request_is_not_parsed() -> None:
    """A 32 MiB request without a token was parsed in full (+1 GB of memory) before the refusal."""
    from acroscreen.server.transport.auth import TokenAuthInterceptor

    parsed: list[bytes] = []
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: None, request_deserializer=parsed.append)
    details = types.SimpleNamespace(method="/acroscreen.v1.Screening/ScreenImages", invocation_metadata=())
    refusing = TokenAuthInterceptor([TOKEN], health_requires_auth=False).intercept_service(lambda _: handler, details)
    assert refusing.request_deserializer(b"\x0a" * 1000) is not None and parsed == []  # None would be INTERNAL


def test_client_without_certificate_is_refused(mtls_server: RunningServer, pki: _Pki) -> None:
    with _client(mtls_server.port, Credentials(tls=True, tls_ca=pki.ca.read_bytes(), token=TOKEN)) as client:
        with pytest.raises(UnavailableError):
            client.model_info()


def test_server_signed_by_another_ca_is_refused(mtls_server: RunningServer, tmp_path: Path) -> None:
    other = _Pki(tmp_path, ca_name="someone else's CA")
    credentials = Credentials.from_files(
        tls_ca=str(other.ca), tls_cert=str(other.client_cert), tls_key=str(other.client_key)
    )
    with _client(mtls_server.port, Credentials(**{**_fields(credentials), "token": TOKEN})) as client:
        with pytest.raises(UnavailableError):
            client.model_info()


def test_plaintext_client_cannot_talk_to_tls_server(mtls_server: RunningServer) -> None:
    with _client(mtls_server.port, Credentials(token=TOKEN)) as client:
        with pytest.raises(UnavailableError):
            client.model_info()


def test_plaintext_on_a_public_address_needs_insecure() -> None:
    with pytest.raises(ConfigurationError, match="--insecure"):
        start_server(host="0.0.0.0", metrics_port=-1)


def test_short_tokens_are_refused_at_start() -> None:
    with pytest.raises(ConfigurationError, match="16 characters"):
        start_server(auth_tokens="short", metrics_port=-1)


def test_a_tokens_file_without_a_token_is_refused_at_start(tmp_path: Path) -> None:
    """Commenting out the last token of the file (rotating it out) served without authentication,
    with only the open-access warning in the log."""
    tokens = tmp_path / "tokens"
    tokens.write_text("# rotated out: 0123456789abcdef0123\n\n")
    for configured in ({"auth_tokens_file": tokens}, {"auth_tokens": " , "}):
        with pytest.raises(ConfigurationError, match="none was given"):
            start_server(metrics_port=-1, **configured)


def test_a_per_token_quota_without_tokens_is_refused_at_start() -> None:
    """Without tokens nothing checks the one a caller sends: a new made-up token was a new quota."""
    with pytest.raises(ConfigurationError, match="needs tokens"):
        start_server(metrics_port=-1, max_streams_per_token=2)


def _fields(credentials: Credentials) -> dict:
    return {name: getattr(credentials, name) for name in ("tls", "tls_ca", "tls_cert", "tls_key", "token")}


# --- plaintext and open access are always reported in the log -------------------------------------------

def _exposure_warnings(caplog: pytest.LogCaptureFixture, settings: Settings) -> tuple[int, list[str]]:
    """Build the gRPC server (it listens at once), and the warnings it logged."""
    with caplog.at_level(logging.WARNING, logger="acroscreen"):
        grpc_server = GrpcServer(settings, WorkerIdentity.new_instance())
    grpc_server.stop(0)
    return grpc_server.port, [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_plaintext_on_loopback_without_tokens_is_allowed_with_two_warnings(caplog: pytest.LogCaptureFixture) -> None:
    port, warnings = _exposure_warnings(caplog, dataclasses.replace(BASE_SETTINGS, metrics_port=-1))
    plaintext = [w for w in warnings if "PLAINTEXT" in w]
    open_access = [w for w in warnings if "no bearer tokens" in w]
    assert len(plaintext) == 1 and f"127.0.0.1:{port}" in plaintext[0] and "--tls-cert/--tls-key" in plaintext[0]
    assert len(open_access) == 1 and f"127.0.0.1:{port}" in open_access[0]


def test_insecure_plaintext_on_a_public_address_warns_that_frames_cross_the_network(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = dataclasses.replace(BASE_SETTINGS, host="0.0.0.0", insecure=True, auth_tokens=TOKEN, metrics_port=-1)
    port, warnings = _exposure_warnings(caplog, settings)
    assert [w for w in warnings if "PLAINTEXT" in w and f"0.0.0.0:{port}" in w and "unencrypted" in w]
    assert not [w for w in warnings if "no bearer tokens" in w]


def test_tls_with_tokens_logs_no_exposure_warning(caplog: pytest.LogCaptureFixture, pki: _Pki) -> None:
    settings = dataclasses.replace(
        BASE_SETTINGS, tls_cert=pki.server_cert, tls_key=pki.server_key, auth_tokens=TOKEN, metrics_port=-1
    )
    _port, warnings = _exposure_warnings(caplog, settings)
    assert warnings == []


def test_tls_files_that_cannot_be_used_are_refused_at_start_by_name(pki: _Pki, tmp_path: Path) -> None:
    """A certificate file that is not PEM, or a key not the certificate's, made the server fail to
    bind ("cannot listen on …: in use, or not an address of this host"), naming neither file."""
    not_pem = tmp_path / "tokens.txt"
    not_pem.write_text("not-a-certificate-0123456789\n")
    other = _Pki(tmp_path / "other")
    for cert, key, named in ((not_pem, not_pem, "PEM"), (pki.server_cert, other.server_key, "the key the certificate's")):
        settings = dataclasses.replace(BASE_SETTINGS, tls_cert=cert, tls_key=key, metrics_port=-1)
        with pytest.raises(ConfigurationError, match=f"TLS certificate {cert}.*{named}"):
            start(settings)
    locked = tmp_path / "locked.key"  # a key under a pass phrase: OpenSSL would prompt for it at start
    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), password=None)
    locked.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(b"pass phrase")))
    with pytest.raises(ConfigurationError, match=f"key {locked}.*without a pass phrase"):
        start(dataclasses.replace(BASE_SETTINGS, tls_cert=pki.server_cert, tls_key=locked, metrics_port=-1))
    with pytest.raises(ConfigurationError, match=f"client CA {not_pem}"):
        start(dataclasses.replace(BASE_SETTINGS, tls_cert=pki.server_cert, tls_key=pki.server_key,
                                  tls_client_ca=not_pem, metrics_port=-1))


# --- tokens and health through the settings the server reads: environment, flags ------------------------

ENV_TOKEN = "token-from-the-environment-0123"
FILE_TOKEN = "token-from-the-tokens-file-4567"
RETIRED_TOKEN = "retired-token-commented-out-89ab"


@dataclasses.dataclass
class _Configured:
    running: RunningServer
    startup_log: list[str]


@pytest.fixture(scope="module")
def configured_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Configured]:
    """Started as `acroscreen serve` would be: ACROSCREEN_* variables, then flags, read by Settings.load."""
    tokens_file = tmp_path_factory.mktemp("secrets") / "tokens"
    tokens_file.write_text(f"# rotated out:\n# {RETIRED_TOKEN}\n\n{FILE_TOKEN}\n")
    environ = {
        "ACROSCREEN_HOST": "127.0.0.1",
        "ACROSCREEN_PORT": "0",
        "ACROSCREEN_METRICS_PORT": "-1",
        "ACROSCREEN_AUTH_TOKENS": ENV_TOKEN,
        "ACROSCREEN_HEALTH_REQUIRES_AUTH": "true",
    }
    settings = Settings.load(environ, ["--auth-tokens-file", str(tokens_file)])
    records: list[logging.LogRecord] = []
    capture = _ListHandler(records)
    logger = logging.getLogger("acroscreen")
    level = logger.level
    logger.addHandler(capture)
    logger.setLevel(logging.INFO)
    try:
        running = start(settings)
    finally:
        logger.removeHandler(capture)
        logger.setLevel(level)
    yield _Configured(running, [record.getMessage() for record in records])
    running.stop(grace_s=1.0)


class _ListHandler(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self._records = records

    def emit(self, record: logging.LogRecord) -> None:
        self._records.append(record)


def _plain(port: int, token: str | None) -> ScreeningClient:
    return ScreeningClient(f"127.0.0.1:{port}", timeout_s=30, credentials=Credentials(token=token), retry=NO_RETRY)


def test_tokens_from_the_environment_and_from_the_tokens_file_are_accepted(
    configured_server: _Configured, portrait_bgr
) -> None:
    for token in (ENV_TOKEN, FILE_TOKEN):
        with _plain(configured_server.running.port, token) as client:
            result = client.screen([FrameData(jpeg_bytes(portrait_bgr), ImageKind.JPEG)])
        assert result.frames_received == 1
    for token in (RETIRED_TOKEN, None):  # a commented-out line is no token
        with _plain(configured_server.running.port, token) as client, pytest.raises(AuthenticationError) as refused:
            client.model_info()
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_the_images_healthcheck_sends_the_servers_own_token(configured_server: _Configured, tmp_path: Path) -> None:
    """With --health-requires-auth the image's HEALTHCHECK (deploy/docker/healthcheck.py) always failed:
    it sent no token. It reads the server's own settings, as the server does."""
    script = Path(__file__).parents[2] / "deploy" / "docker" / "healthcheck.py"
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"# rotated out:\n# {RETIRED_TOKEN}\n{FILE_TOKEN}\n")

    def check(environ: dict[str, str]) -> subprocess.CompletedProcess:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("ACROSCREEN_")} | environ
        return subprocess.run([sys.executable, str(script), "--port", str(configured_server.running.port)],
                              capture_output=True, text=True, timeout=30, env=environ)

    assert check({}).returncode == 2  # refused: UNAUTHENTICATED
    for environ in ({"ACROSCREEN_AUTH_TOKENS_FILE": str(tokens_file)}, {"ACROSCREEN_AUTH_TOKENS": ENV_TOKEN}):
        answer = check(environ)
        assert answer.returncode == 0 and answer.stdout.strip() == "SERVING", answer.stderr


def test_health_requires_a_token_when_configured(configured_server: _Configured) -> None:
    for token in (None, "not-a-token-but-long-enough-00"):
        with _plain(configured_server.running.port, token) as client, pytest.raises(AuthenticationError) as refused:
            client.health()
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    with _plain(configured_server.running.port, ENV_TOKEN) as client:
        assert client.health() == "SERVING"


def test_the_startup_log_names_the_weights_sha256(configured_server: _Configured) -> None:
    digest = hashlib.sha256(DEFAULT_WEIGHTS.read_bytes()).hexdigest()
    assert [line for line in configured_server.startup_log if f"sha256={digest}" in line]
    assert not [line for line in configured_server.startup_log if "no bearer tokens" in line]


# --- TLS without mutual TLS ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls_server(pki: _Pki) -> Iterator[RunningServer]:
    running = start_server(tls_cert=pki.server_cert, tls_key=pki.server_key, auth_tokens=TOKEN, metrics_port=-1)
    yield running
    running.stop(grace_s=1.0)


def test_server_only_tls_screens_for_a_client_that_trusts_its_ca(tls_server: RunningServer, pki: _Pki, portrait_bgr) -> None:
    credentials = Credentials(tls=True, tls_ca=pki.ca.read_bytes(), token=TOKEN)
    frames = [FrameData(jpeg_bytes(portrait_bgr), ImageKind.JPEG, index=i) for i in range(3)]
    with _client(tls_server.port, credentials) as client:
        # Every frame analysed: three frames at once exceed the default backlog of 2, and a skipped
        # frame would leave the subject one frame short of a score on a busy machine.
        result = client.screen(frames, ScreenOptions(analyze_every_frame=True))
    assert result.status == "final" and result.frames_received == 3


def test_a_client_spreading_over_a_names_addresses_checks_the_certificate_against_the_name(
    tls_server: RunningServer, pki: _Pki, portrait_bgr
) -> None:
    """`spread_over_workers` with a `dns:///` target connects to each address the name has (a
    headless Service's pods) and its calls carry the name, which the certificate names; an
    address alone (`ipv4:`) is not in the certificate and is refused."""
    credentials = Credentials(tls=True, tls_ca=pki.ca.read_bytes(), token=TOKEN)
    frames = [FrameData(jpeg_bytes(portrait_bgr), ImageKind.JPEG, index=i) for i in range(3)]
    with ScreeningClient(f"dns:///localhost:{tls_server.port}", timeout_s=30, credentials=credentials, retry=NO_RETRY,
                         spread_over_workers=True) as client:
        result = client.screen(frames, ScreenOptions(analyze_every_frame=True))
        servers = [server.address.target for server in client._servers.usable()]  # answered: not left out
        assert len(client._pools(False)) == len(servers)
    assert result.status == "final" and result.frames_received == 3
    assert f"ipv4:127.0.0.1:{tls_server.port}" in servers
    with ScreeningClient(f"ipv4:127.0.0.1:{tls_server.port}", timeout_s=30, credentials=credentials, retry=NO_RETRY,
                         spread_over_workers=True) as client:
        with pytest.raises(UnavailableError):
            client.screen(frames)


def test_server_only_tls_is_refused_by_a_client_trusting_another_ca(tls_server: RunningServer, tmp_path: Path) -> None:
    other = _Pki(tmp_path, ca_name="someone else's CA")
    credentials = Credentials(tls=True, tls_ca=other.ca.read_bytes(), token=TOKEN)
    with _client(tls_server.port, credentials) as client, pytest.raises(UnavailableError):
        client.model_info()


# --- the CLI's connection flags ----------------------------------------------------------------------------

def test_cli_screens_over_mutual_tls_with_a_token_file(
    mtls_server: RunningServer, pki: _Pki, portrait_bgr, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "portrait.jpg"
    image.write_bytes(jpeg_bytes(portrait_bgr))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    tls = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
    command = ["screen", str(image), "--server", f"localhost:{mtls_server.port}", "--json", "--timeout", "60", *tls]

    assert cli_main([*command, "--token-file", str(token_file)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "final" and result["frames_analyzed"] == 1

    assert cli_main(command) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "UNAUTHENTICATED" in err and "--token-file" in err
