"""A loopback OpenAI-compatible chat endpoint for the storyboard tests, answering from a script, and replies
that carry a scene list."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeChat:
    """A loopback OpenAI-compatible chat endpoint answering from a script of (status, body, headers)."""

    def __init__(self):
        self.script: list[tuple[int, object, dict]] = []
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length", 0))
                outer.requests.append(
                    {
                        "path": self.path,
                        "auth": self.headers.get("Authorization"),
                        "body": json.loads(self.rfile.read(length)),
                    }
                )
                status, body, headers = (
                    outer.script.pop(0) if outer.script else (500, {"error": "no script"}, {})
                )
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def chat(content: str) -> tuple[int, dict, dict]:
    return (
        200,
        {"choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]},
        {},
    )


def scenes_json(count: int, first: str = "close-up portrait of the character, face clearly visible") -> str:
    items = [{"prompt": first, "caption": "Hello"}] + [
        {"prompt": f"the character in scene {i}", "caption": f"S{i}"} for i in range(2, count + 1)
    ]
    return json.dumps({"scenes": items})
