"""An event loop in a background thread: how the blocking :class:`~.sync_client.ComfyClient` runs the asyncio
client's coroutines while staying responsive to Ctrl-C."""

from __future__ import annotations

import asyncio
import threading
from typing import Any


class LoopThread:
    """An event loop in a daemon thread; blocking calls hand coroutines to it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="charforge-driver-loop", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Any) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            while True:
                try:
                    return future.result(0.1)  # short slices keep Ctrl-C responsive
                except TimeoutError:
                    continue
        except BaseException:
            future.cancel()
            raise

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self.loop.is_running():
            self.loop.close()
