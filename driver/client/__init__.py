"""ComfyUI clients: :class:`AsyncComfyClient` (asyncio) and :class:`ComfyClient` (blocking, the same methods with
the same parameters), like httpx's ``AsyncClient``/``Client``.

- :mod:`.models`: what the client hands back (``Job``, ``JobResult``, ``Timings``, ``UploadedFile``, ``Timeout``)
- :mod:`.history`: history and queue answers read (a history entry -> a result or the job's failure)
- :mod:`.http`: bounded body reads, the User-Agent, timeout exceptions (shared with the RunPod clients)
- :mod:`.websocket`: the WebSocket listener, reconnecting, per-job event queues
- :mod:`.follow`: following a job to its end (the history is the source of truth)
- :mod:`.async_client`, :mod:`.sync_client` (on the background loop of :mod:`.loop`): the clients
"""

from .async_client import AsyncComfyClient
from .follow import AsyncWatch
from .history import check_history_entry, result_from_history
from .models import Job, JobResult, Timeout, Timings, UploadedFile
from .sync_client import ComfyClient, Watch

__all__ = [
    "AsyncComfyClient",
    "AsyncWatch",
    "ComfyClient",
    "Job",
    "JobResult",
    "Timeout",
    "Timings",
    "UploadedFile",
    "Watch",
    "check_history_entry",
    "result_from_history",
]
