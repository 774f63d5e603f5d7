"""Suite-wide configuration: shared fixtures live in tests/cf_testing (on sys.path via pytest's pythonpath)."""

import os

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Under pytest-xdist (`make test`: one worker per core) a worker's second torch thread only waits for a core
# another worker holds (cf_testing/threads.py): each worker gets its share of the cores. Set here, before
# anything imports torch, which reads it once; an OMP_NUM_THREADS set by hand wins.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores // _workers)))

pytest_plugins = [
    "cf_testing.fixtures",
    "cf_testing.model_fixtures",
    "cf_testing.lora_files",
    "cf_testing.threads",
]
