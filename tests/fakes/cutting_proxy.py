"""A loopback TCP proxy that can drop a connection in the middle of a request, for resume tests.

``arm(after)`` makes the proxy cut the next connection that carries `after` more bytes from the client to
the server: the first `after` bytes reach the server, then both sides are closed (what a flaky line or a
restarted proxy does to an upload).
"""

from __future__ import annotations

import contextlib
import socket
import threading


class CuttingProxy:
    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._cut_after: int | None = None
        self.cuts = 0
        self.bytes_up = 0
        self._stop = False
        threading.Thread(target=self._accept, daemon=True, name="cutting-proxy").start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def arm(self, after: int) -> None:
        with self._lock:
            self._cut_after = after

    def close(self) -> None:
        self._stop = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._up, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._down, args=(client, upstream), daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while data := client.recv(65536):
                with self._lock:
                    cut = self._cut_after
                    if cut is not None and len(data) >= cut:
                        data, self._cut_after = data[:cut], None
                        self.cuts += 1
                    elif cut is not None:
                        self._cut_after = cut - len(data)
                        cut = None
                    self.bytes_up += len(data)
                upstream.sendall(data)
                if cut is not None:
                    break
        except OSError:
            pass
        for sock in (client, upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _down(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while data := upstream.recv(65536):
                client.sendall(data)
        except OSError:
            pass
        for sock in (client, upstream):
            with contextlib.suppress(OSError):
                sock.close()
