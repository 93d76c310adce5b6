"""TLS settings for the master, workers and clients, built from flag values.

Settings hold file paths; the PEM files are read each time credentials are
made (so a renewed certificate is picked up on the next connection) and once
when the settings are built, so a bad path fails at start-up as one line that
names its flag.
"""

from __future__ import annotations

import ssl

import grpc

from taskfleet.common.errors import ConfigError
from taskfleet.common.frozen import frozen


@frozen
class ServerTls:
    """The master's certificate and key; ``client_ca`` set means mTLS: clients must
    present a certificate signed by it."""

    cert: str
    key: str
    client_ca: str = ""

    def credentials(self) -> grpc.ServerCredentials:
        client_ca = read_pem("--tls-client-ca", self.client_ca) if self.client_ca else None
        return grpc.ssl_server_credentials(
            [(read_pem("--tls-key", self.key), read_pem("--tls-cert", self.cert))],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )


@frozen
class ClientTls:
    """The CA that signed the master's certificate, and this side's own certificate
    and key for a master that requires client certificates (both or neither)."""

    ca: str
    cert: str = ""
    key: str = ""

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=read_pem("--tls-ca", self.ca),
            private_key=read_pem("--tls-key", self.key) if self.key else None,
            certificate_chain=read_pem("--tls-cert", self.cert) if self.cert else None,
        )


def server_tls(cert: str = "", key: str = "", client_ca: str = "") -> ServerTls | None:
    """The master's TLS settings from ``--tls-cert/--tls-key/--tls-client-ca``; None
    for plaintext."""
    if not (cert or key or client_ca):
        return None
    if not cert or not key:
        raise ConfigError("--tls-cert: --tls-cert and --tls-key go together (PEM files)")
    tls = ServerTls(cert, key, client_ca)
    tls.credentials()
    _check_certificates("--tls-cert", cert)
    _check_pair(cert, key)
    if client_ca:
        _check_certificates("--tls-client-ca", client_ca)
    return tls


def client_tls(ca: str = "", cert: str = "", key: str = "") -> ClientTls | None:
    """A worker's or client's TLS settings from ``--tls-ca/--tls-cert/--tls-key``; None
    for plaintext."""
    if not (ca or cert or key):
        return None
    if not ca:
        raise ConfigError("--tls-ca: required for TLS: the CA that signed the master's certificate")
    if bool(cert) != bool(key):
        raise ConfigError("--tls-cert: --tls-cert and --tls-key go together (PEM files)")
    tls = ClientTls(ca, cert, key)
    tls.credentials()
    _check_certificates("--tls-ca", ca)
    if cert:
        _check_certificates("--tls-cert", cert)
        _check_pair(cert, key)
    return tls


def read_pem(flag: str, path: str) -> bytes:
    """The contents of a PEM file; a ConfigError naming ``flag`` if it cannot be used."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{flag}: {path} is not a PEM file")
    return data


# gRPC reports unusable PEM only when it serves or connects, as a misleading bind
# error or a failed handshake; the ssl module finds the same mistakes up front.


def _check_pair(cert: str, key: str) -> None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key, password=_no_password)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(
            f"--tls-key: cannot use {key} with the certificate {cert} "
            f"(not its key, encrypted, or not PEM): {_reason(exc)}"
        ) from None


def _check_certificates(flag: str, path: str) -> None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"{flag}: {path} holds no usable certificate: {_reason(exc)}") from None


def _no_password() -> bytes:
    raise ValueError("the key is encrypted; taskfleet needs an unencrypted key file")


def _reason(exc: Exception) -> str:
    return str(getattr(exc, "reason", None) or exc)
