"""``HOST:PORT`` addresses: checking one a flag gives, taking one apart, and the
list of masters a worker or client fails over between."""

from __future__ import annotations

import ipaddress
import threading

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


def parse_address_list(flag: str, text: str) -> tuple[str, ...]:
    """The addresses of ``HOST:PORT[,HOST:PORT...]``, each checked as ``check_address``
    does. An empty element or one given twice is refused: both are typos, and a
    repeated master would only be tried twice as often."""
    addresses = tuple(part.strip() for part in text.split(","))
    for address in addresses:
        if not address:
            raise ConfigError(f"{flag}: empty address in {text!r}; expected HOST:PORT[,HOST:PORT]")
        check_address(flag, address)
    for i, address in enumerate(addresses):
        if address in addresses[:i]:
            raise ConfigError(f"{flag}: {address} is given twice in {text!r}")
    return addresses


class AddressRing:
    """The masters a worker or client may use, and the one it uses now.

    Any master of the list will do (they share one store), so a failure moves on
    to the next one, round-robin: a worker whose master died dials the next one
    at its first reconnect, and one whose master restarts on the same address
    finds it again once the ring comes round. A ring of one address never moves.
    """

    def __init__(self, addresses: tuple[str, ...]) -> None:
        if not addresses:
            raise ValueError("an address ring needs at least one address")
        self.addresses = addresses
        self._index = 0
        self._lock = threading.Lock()

    @property
    def current(self) -> str:
        return self.addresses[self._index]

    def move_on(self, past: str) -> str:
        """Move to the address after ``past``, unless another caller has moved on
        from it already (calls that fail together move once); returns the
        address to use now."""
        with self._lock:
            if self.addresses[self._index] == past:
                self._index = (self._index + 1) % len(self.addresses)
            return self.addresses[self._index]

    def __str__(self) -> str:
        return ",".join(self.addresses)
