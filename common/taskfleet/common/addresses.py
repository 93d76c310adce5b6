"""``HOST:PORT`` addresses: checking one a flag gives, and taking one apart."""

from __future__ import annotations

import ipaddress

from taskfleet.common.errors import ConfigError


def check_address(flag: str, address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{flag}: expected HOST:PORT, got {address!r}")
    return address


def is_loopback(address: str) -> bool:
    """Whether HOST:PORT can only be reached from this machine."""
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_port(address: str) -> tuple[str, int]:
    """The host (IPv6 brackets removed) and port of a checked ``HOST:PORT``, as
    sockets and multiprocessing.managers take them."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)
