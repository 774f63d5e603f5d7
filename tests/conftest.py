"""Suite-wide configuration: shared fixtures live in tests/cf_testing (on sys.path via pytest's pythonpath)."""

import os

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

pytest_plugins = [
    "cf_testing.fixtures",
    "cf_testing.model_fixtures",
    "cf_testing.lora_files",
    "cf_testing.threads",
]
