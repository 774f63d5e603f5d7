"""Stand-in for ``server.PromptServer``: records what nodes send instead of writing to sockets."""


class _Routes:
    """Records route registrations made at import time (``PromptServer.instance.routes.get(path)``)."""

    def __init__(self):
        self.registered = []

    def _add(self, method, path):
        def decorator(handler):
            self.registered.append((method, path, handler))
            return handler

        return decorator

    def get(self, path, **_):
        return self._add("GET", path)

    def post(self, path, **_):
        return self._add("POST", path)

    def put(self, path, **_):
        return self._add("PUT", path)


class PromptServer:
    instance = None

    def __init__(self):
        PromptServer.instance = self
        self.client_id = None
        self.last_prompt_id = None
        self.last_node_id = None
        self.routes = _Routes()
        self.messages = []  # (event, data, sid)
        self.progress_texts = []  # (text, node_id, sid)

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data, sid))

    def send_progress_text(self, text, node_id, sid=None):
        self.progress_texts.append((text, node_id, sid))
