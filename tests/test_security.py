"""Security, end to end with real processes on loopback: bearer tokens, a
separate worker token, TLS and mutual TLS, and the check on public listen
addresses.

The certificates come from a throwaway PKI made at test time: a CA, a server
certificate for 127.0.0.1 / localhost, a client certificate, and a second,
unrelated CA with a client certificate of its own.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from taskfleet.common import cli
from taskfleet.common import config_flags as cfg
from taskfleet.common.channel import open_channel
from taskfleet.common.client import Client
from taskfleet.common.errors import Unauthenticated
from taskfleet.common.tls import client_tls
from taskfleet.master.auth import TokenInterceptor
from taskfleet.v1 import tasks_pb2, tasks_pb2_grpc

from procs import TESTS_DIR, MasterProc, WorkerProc, free_port

TASKFLEET = str(Path(sys.executable).parent / "taskfleet")
# Random, so finding one in a log can only mean it leaked.
TOKEN = f"producer-{secrets.token_hex(12)}"
WORKER_TOKEN = f"worker-{secrets.token_hex(12)}"
WRONG_TOKEN = f"wrong-{secrets.token_hex(12)}"
REFUSED = (grpc.StatusCode.UNAVAILABLE,)  # what a failed TLS handshake looks like to a caller

StartMaster = Callable[..., MasterProc]
StartWorker = Callable[..., WorkerProc]


# -- a throwaway PKI --------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str
    other_client_cert: str
    other_client_key: str


class _Authority:
    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            _builder(self.name, self.name, self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue(
        self, name: str, usage: x509.ObjectIdentifier, san: bool = False
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            _builder(subject, self.name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if san:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
        return builder.sign(self.key, hashes.SHA256()), key


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
    )


def _write_cert(path: Path, cert: x509.Certificate) -> str:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> str:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca, other = _Authority("taskfleet test CA"), _Authority("unrelated CA")
    server_cert, server_key = ca.issue("taskfleet master", ExtendedKeyUsageOID.SERVER_AUTH, True)
    client_cert, client_key = ca.issue("taskfleet client", ExtendedKeyUsageOID.CLIENT_AUTH)
    other_cert, other_key = other.issue("stranger", ExtendedKeyUsageOID.CLIENT_AUTH)
    return Pki(
        ca=_write_cert(root / "ca.pem", ca.cert),
        server_cert=_write_cert(root / "server.pem", server_cert),
        server_key=_write_key(root / "server.key", server_key),
        client_cert=_write_cert(root / "client.pem", client_cert),
        client_key=_write_key(root / "client.key", client_key),
        other_ca=_write_cert(root / "other-ca.pem", other.cert),
        other_client_cert=_write_cert(root / "other-client.pem", other_cert),
        other_client_key=_write_key(root / "other-client.key", other_key),
    )


# -- helpers ----------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TASKFLEET_")}
    clean["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), clean.get("PYTHONPATH")]))
    return subprocess.run(
        [TASKFLEET, *args],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        cwd=TESTS_DIR,
        timeout=60,
        check=False,
    )


def one_error_line(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """The single stderr line of a command that failed cleanly with ``code``."""
    out = f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert proc.returncode == code, out
    assert "Traceback" not in proc.stdout + proc.stderr, out
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out
    assert all(word in lines[0] for word in words), out
    return lines[0]


def stats_status(address: str, token: str = "", **tls: str) -> grpc.StatusCode:
    """The status of one GetStats call, without the client's retries."""
    channel = open_channel(
        address,
        token,
        tls=client_tls(tls.get("ca", ""), tls.get("cert", ""), tls.get("key", "")),
    )
    try:
        tasks_pb2_grpc.TaskServiceStub(channel).GetStats(tasks_pb2.GetStatsRequest(), timeout=10)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return, attr-defined]
    finally:
        channel.close()
    return grpc.StatusCode.OK


def assert_no_secrets(*texts: str) -> None:
    for text in texts:
        for secret in (TOKEN, WORKER_TOKEN, WRONG_TOKEN):
            assert secret not in text


def tls_flags(pki: Pki, mtls: bool = False) -> list[str]:
    flags = ["--tls-cert", pki.server_cert, "--tls-key", pki.server_key]
    return [*flags, "--tls-client-ca", pki.ca] if mtls else flags


# -- tokens -----------------------------------------------------------------------


def test_token_is_required_on_every_call(start_master: StartMaster, queue_name: str) -> None:
    # Given a master with a token
    master = start_master(extra=["--token", TOKEN], client_auth={"token": TOKEN})

    # Then calls without it, or with a wrong one, are refused as UNAUTHENTICATED,
    # streaming ones included, and the error never repeats the token sent
    with Client(master.address) as anonymous:
        with pytest.raises(Unauthenticated, match="missing bearer token"):
            anonymous.stats()
        with pytest.raises(Unauthenticated):
            list(anonymous.wait(["no-such-task"], timeout_s=1))
    with Client(master.address, token=WRONG_TOKEN) as wrong:
        with pytest.raises(Unauthenticated, match="wrong bearer token") as refused:
            wrong.submit("square", [2], queue=queue_name)
        assert_no_secrets(str(refused.value), repr(refused.value))

    # And the right token works
    with master.client() as client:
        task_id = client.submit("square", [3], queue=queue_name)
        assert client.get(task_id).spec.name == "square"

    # And the CLI says so in one line, without a traceback or the token
    line = one_error_line(run_cli("stats", "--master", master.address), 1, "refused", "token")
    assert "missing bearer token" in line
    proc = run_cli("stats", "--master", master.address, env={"TASKFLEET_TOKEN": WRONG_TOKEN})
    one_error_line(proc, 1, "wrong bearer token", "--token")
    assert_no_secrets(proc.stdout, proc.stderr)
    proc = run_cli("stats", "--master", master.address, env={"TASKFLEET_TOKEN": TOKEN})
    assert proc.returncode == 0, proc.stderr
    master.stop()
    assert_no_secrets(master.output())


def test_worker_token_keeps_producers_and_workers_apart(
    start_master: StartMaster, start_worker: StartWorker, queue_name: str
) -> None:
    # Given a master with a producer token and a separate worker token
    master = start_master(
        extra=["--token", TOKEN, "--worker-token", WORKER_TOKEN], client_auth={"token": TOKEN}
    )

    # When a worker presents the producer token, it is refused and gives up at
    # once with a clear error (retrying cannot make a wrong token right)
    impostor = start_worker(
        master, queues=queue_name, extra=["--token", TOKEN], wait_connected=False
    )
    assert impostor.wait(30) == 1
    assert "needs the master's worker token" in impostor.output()
    assert "Traceback" not in impostor.output()

    # And a producer presenting the worker token is refused too
    with (
        Client(master.address, token=WORKER_TOKEN) as producer_with_worker_token,
        pytest.raises(Unauthenticated, match="producer token"),
    ):
        producer_with_worker_token.stats()

    # But a worker with the worker token serves the producer's tasks
    start_worker(
        master, queues=queue_name, extra=["--token", WORKER_TOKEN], client_auth={"token": TOKEN}
    )
    with master.client() as client:
        task_id = client.submit("square", [7], queue=queue_name)
        assert client.result(task_id, timeout_s=30) == 49
        assert not any(w.pid == impostor.pid for w in client.stats().workers)

    # And no log shows either token
    impostor.stop()
    master.stop()
    assert_no_secrets(master.output(), impostor.output())


def test_configs_and_interceptor_never_show_tokens(tmp_path: Path) -> None:
    parser = cli.build_parser()
    master = cfg.master_config(
        parser.parse_args(
            ["master", "--store", "memory", "--token", TOKEN, "--worker-token", WORKER_TOKEN]
        )
    )
    worker = cfg.worker_config(
        parser.parse_args(["worker", "--tasks", "e2etasks", "--token", TOKEN])
    )
    interceptor = TokenInterceptor(TOKEN, WORKER_TOKEN)
    assert (master.token, master.worker_token, worker.token) == (TOKEN, WORKER_TOKEN, TOKEN)
    assert_no_secrets(repr(master), str(master), repr(worker), str(worker), repr(interceptor))


def test_worker_token_must_differ_from_the_token() -> None:
    proc = run_cli("master", "--store", "memory", "--token", TOKEN, "--worker-token", TOKEN)
    one_error_line(proc, 2, "--worker-token", "differ")
    assert_no_secrets(proc.stderr)


def test_services_other_than_taskfleet_need_no_token(start_master: StartMaster) -> None:
    # Given a master with a token
    master = start_master(extra=["--token", TOKEN], client_auth={"token": TOKEN})
    # Then a call outside taskfleet.v1 (health checks, reflection) is not refused
    # for want of a token: it reaches the service, or UNIMPLEMENTED if none is there
    with grpc.insecure_channel(master.address) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        try:
            check(b"", timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() != grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]


# -- TLS and mTLS -----------------------------------------------------------------


def test_tls_end_to_end(
    start_master: StartMaster, start_worker: StartWorker, pki: Pki, queue_name: str
) -> None:
    # Given a TLS master and a worker that trusts its CA
    master = start_master(extra=tls_flags(pki), client_auth={"tls_ca": pki.ca})
    start_worker(
        master, queues=queue_name, extra=["--tls-ca", pki.ca], client_auth={"tls_ca": pki.ca}
    )

    # When a client that trusts the CA submits a task, the worker runs it
    with Client(master.address, tls_ca=pki.ca) as client:
        task_id = client.submit("square", [9], queue=queue_name)
        assert client.result(task_id, timeout_s=30) == 81

    # And the CLI works over TLS too
    proc = run_cli(
        "submit", "square", "5", "--queue", queue_name, "--wait",
        "--master", master.address, "--tls-ca", pki.ca,
    )  # fmt: skip
    assert (proc.returncode, proc.stdout.strip()) == (0, "25"), proc.stderr


def test_tls_refuses_plaintext_and_strangers(start_master: StartMaster, pki: Pki) -> None:
    # Given a TLS master
    master = start_master(extra=tls_flags(pki), client_auth={"tls_ca": pki.ca})

    # Then a plaintext client and one that trusts another CA are refused
    assert stats_status(master.address) in REFUSED
    assert stats_status(master.address, ca=pki.other_ca) in REFUSED
    assert stats_status(master.address, ca=pki.ca) == grpc.StatusCode.OK

    # And the CLI reports the failed handshake in one line
    proc = run_cli("stats", "--master", master.address, "--tls-ca", pki.other_ca)
    one_error_line(proc, 1, "cannot reach the master")


def test_mtls_requires_a_certificate_from_the_client_ca(
    start_master: StartMaster, start_worker: StartWorker, pki: Pki, queue_name: str
) -> None:
    # Given a master that requires client certificates signed by its CA
    auth = {"tls_ca": pki.ca, "tls_cert": pki.client_cert, "tls_key": pki.client_key}
    master = start_master(extra=tls_flags(pki, mtls=True), client_auth=auth)

    # Then a client without a certificate, or with one from another CA, is refused
    assert stats_status(master.address, ca=pki.ca) in REFUSED
    stranger = {"ca": pki.ca, "cert": pki.other_client_cert, "key": pki.other_client_key}
    assert stats_status(master.address, **stranger) in REFUSED

    # And a worker and a client with certificates from the CA work end to end
    start_worker(
        master,
        queues=queue_name,
        extra=["--tls-ca", pki.ca, "--tls-cert", pki.client_cert, "--tls-key", pki.client_key],
        client_auth=auth,
    )
    with master.client() as client:
        task_id = client.submit("square", [4], queue=queue_name)
        assert client.result(task_id, timeout_s=30) == 16


def test_tls_and_token_together(start_master: StartMaster, pki: Pki) -> None:
    # Given a TLS master that also wants a token
    auth = {"tls_ca": pki.ca, "token": TOKEN}
    master = start_master(extra=[*tls_flags(pki), "--token", TOKEN], client_auth=auth)
    # Then TLS alone is not enough, TLS and the token are
    assert stats_status(master.address, ca=pki.ca) == grpc.StatusCode.UNAUTHENTICATED
    assert stats_status(master.address, TOKEN, ca=pki.ca) == grpc.StatusCode.OK


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["master", "--tls-cert", "/nonexistent/server.pem", "--tls-key", "{key}"],
         ["--tls-cert", "cannot read", "/nonexistent/server.pem"]),
        (["master", "--tls-cert", "{cert}"], ["--tls-cert", "--tls-key"]),
        (["master", "--tls-client-ca", "{ca}"], ["--tls-cert", "--tls-key"]),
        (["master", "--tls-cert", "{cert}", "--tls-key", "{garbage}"],
         ["--tls-key", "not a PEM file"]),
        (["master", "--tls-cert", "{cert}", "--tls-key", "{client_key}"],
         ["--tls-key", "cannot use", "with the certificate"]),
        (["master", "--tls-cert", "{key}", "--tls-key", "{key}"],
         ["--tls-cert", "no usable certificate"]),
        (["stats", "--tls-ca", "/nonexistent/ca.pem"], ["--tls-ca", "cannot read"]),
        (["stats", "--tls-cert", "{cert}", "--tls-key", "{key}"], ["--tls-ca", "required"]),
        (["stats", "--tls-ca", "{ca}", "--tls-cert", "{cert}"], ["--tls-cert", "--tls-key"]),
        (["worker", "--tasks", "e2etasks", "--tls-ca", "{garbage}"],
         ["--tls-ca", "not a PEM file"]),
    ],
)  # fmt: skip
def test_bad_tls_settings_are_one_line(
    pki: Pki, tmp_path: Path, args: list[str], words: list[str]
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    paths = {
        "cert": pki.server_cert,
        "key": pki.server_key,
        "client_key": pki.client_key,
        "ca": pki.ca,
        "garbage": garbage,
    }
    argv = [arg.format(**paths) for arg in args]
    if argv[0] == "master":
        argv += ["--store", "memory", "--listen", f"127.0.0.1:{free_port()}"]
    one_error_line(run_cli(*argv), 2, *words)


# -- binding ----------------------------------------------------------------------


@pytest.mark.parametrize("flags", [[], ["--worker-token", WORKER_TOKEN]], ids=["bare", "worker"])
def test_public_listen_without_token_or_tls_is_refused(flags: list[str]) -> None:
    listen = f"0.0.0.0:{free_port()}"
    proc = run_cli("master", "--store", "memory", "--listen", listen, *flags)
    one_error_line(proc, 2, "--listen", listen, "--token", "--tls-cert", "--insecure")


@pytest.mark.parametrize("how", ["insecure", "token", "tls"])
def test_public_listen_with_token_tls_or_insecure_serves(
    start_master: StartMaster, pki: Pki, how: str
) -> None:
    port = free_port()
    flags, auth = {
        "insecure": (["--insecure"], {}),
        "token": (["--token", TOKEN], {"token": TOKEN}),
        "tls": (tls_flags(pki), {"tls_ca": pki.ca}),
    }[how]
    master = start_master(
        port=port, extra=["--listen", f"0.0.0.0:{port}", *flags], client_auth=auth
    )
    with master.client() as client:
        assert client.stats().workers == []
