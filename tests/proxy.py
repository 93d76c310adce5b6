"""A TCP proxy for fault tests: forwards a loopback port to another, and can cut,
stall and restore the connections going through it."""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading

from procs import free_port


class FaultyProxy:
    """Forwards 127.0.0.1:``port`` to ``target_port``.

    ``cut()`` closes every connection and refuses new ones; ``stall()`` keeps
    connections open but forwards nothing (a hung middlebox); ``restore()``
    goes back to forwarding.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._mode = "forward"
        self._pairs: dict[socket.socket, socket.socket] = {}
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._listener: socket.socket | None = None
        self._stopped = False
        self._listen()
        self._thread = threading.Thread(target=self._run, name="proxy", daemon=True)
        self._thread.start()

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._pairs) // 2

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.setblocking(False)
        self._listener = listener
        self._selector.register(listener, selectors.EVENT_READ)

    def cut(self) -> None:
        with self._lock:
            self._mode = "cut"
        self._poke()

    def stall(self) -> None:
        with self._lock:
            self._mode = "stall"
        self._poke()

    def restore(self) -> None:
        with self._lock:
            self._mode = "forward"
        self._poke()

    def close(self) -> None:
        self._stopped = True
        self._poke()
        self._thread.join(5)

    def _poke(self) -> None:
        self._wake_w.send(b"x")

    def _run(self) -> None:
        while not self._stopped:
            with self._lock:
                mode = self._mode
            if mode == "cut":
                self._close_all()
                if self._listener is not None:
                    self._selector.unregister(self._listener)
                    self._listener.close()
                    self._listener = None
            elif self._listener is None:
                self._listen()
            for key, _ in self._selector.select(timeout=0.5):
                sock = key.fileobj
                if sock is self._wake_r:
                    self._wake_r.recv(4096)
                elif sock is self._listener:
                    self._accept()
                elif mode == "forward":
                    self._forward(sock)  # type: ignore[arg-type]
                # stalled: leave the bytes in the kernel buffers
            if mode == "stall":
                # Sockets stay readable while stalled; don't spin on them.
                self._pause_reads()
            else:
                self._resume_reads()
        self._close_all()
        if self._listener is not None:
            self._listener.close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        for sock in (client, upstream):
            sock.setblocking(False)
            self._selector.register(sock, selectors.EVENT_READ)
        with self._lock:
            self._pairs[client] = upstream
            self._pairs[upstream] = client

    def _forward(self, sock: socket.socket) -> None:
        with self._lock:
            peer = self._pairs.get(sock)
        if peer is None:
            return
        try:
            data = sock.recv(65536)
            if data:
                peer.setblocking(True)
                peer.sendall(data)
                peer.setblocking(False)
                return
        except OSError:
            pass
        self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            peer = self._pairs.pop(sock, None)
            if peer is not None:
                self._pairs.pop(peer, None)
        for s in (sock, peer):
            if s is None:
                continue
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(s)
            s.close()

    def _close_all(self) -> None:
        with self._lock:
            socks = list(self._pairs)
        for sock in socks:
            self._drop(sock)

    def _pause_reads(self) -> None:
        with self._lock:
            socks = list(self._pairs)
        for sock in socks:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)

    def _resume_reads(self) -> None:
        with self._lock:
            socks = list(self._pairs)
        for sock in socks:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.register(sock, selectors.EVENT_READ)
