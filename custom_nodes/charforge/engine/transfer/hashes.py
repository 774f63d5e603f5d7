"""sha256 of files, computed once: a JSON cache keyed by path, size and modification time."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from ...common.transfer import sha256_file


class HashCache:
    """``sha256(path)`` from a cache file when the file's size and mtime are unchanged, else computed and kept."""

    def __init__(self, cache_file: str | os.PathLike):
        self.cache_file = Path(cache_file)
        self._lock = threading.Lock()
        self._entries: dict[str, list] | None = None

    def _load(self) -> dict[str, list]:
        if self._entries is None:
            try:
                data = json.loads(self.cache_file.read_text(encoding="utf-8"))
                self._entries = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                self._entries = {}
        return self._entries

    def _save(self) -> None:
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_file.with_name(self.cache_file.name + ".tmp")
        tmp.write_text(json.dumps(self._entries), encoding="utf-8")
        os.replace(tmp, self.cache_file)

    def cached(self, path: str | os.PathLike) -> str | None:
        """The cached sha256 of `path` when it is still valid, without hashing."""
        stat = os.stat(path)
        with self._lock:
            entry = self._load().get(str(Path(path).resolve()))
        if entry and entry[0] == stat.st_size and entry[1] == stat.st_mtime_ns:
            return str(entry[2])
        return None

    def sha256(self, path: str | os.PathLike) -> str:
        found = self.cached(path)
        if found is not None:
            return found
        stat = os.stat(path)
        digest = sha256_file(path)
        self.remember(path, digest, stat)
        return digest

    def remember(self, path: str | os.PathLike, digest: str, stat: os.stat_result | None = None) -> None:
        """Record a checksum that is already known (a file just verified after an upload or download)."""
        stat = stat or os.stat(path)
        with self._lock:
            self._load()[str(Path(path).resolve())] = [stat.st_size, stat.st_mtime_ns, digest]
            self._save()
