"""A loopback HTTP server of files with Range support (a model host such as Hugging Face), recording the
Range and Authorization headers of every request; optionally it wants a bearer token (401 without it, as the
hub answers for a gated file) and redirects some paths elsewhere (as the hub sends large files to its CDN)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FileServer:
    def __init__(
        self,
        root: str | Path,
        ranges: bool = True,
        token: str | None = None,
        redirects: dict[str, str] | None = None,
    ):
        self.root = Path(root)
        self.ranges = ranges
        self.token = token
        self.redirects = dict(redirects or {})
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.authorizations: list[str | None] = []  # the Authorization header of every request
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                server.authorizations.append(self.headers.get("Authorization"))
                if server.token is not None and self.headers.get("Authorization") != f"Bearer {server.token}":
                    self.send_error(401)
                    return
                if self.path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                file = server.root / self.path.lstrip("/").split("?")[0]
                if not file.is_file():
                    self.send_error(404)
                    return
                data = file.read_bytes()
                start = 0
                if rng and server.ranges and rng.startswith("bytes=") and rng.endswith("-"):
                    start = int(rng[6:-1])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                self.wfile.write(data[start:])

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, daemon=True, name="file-server").start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
