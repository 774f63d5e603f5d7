"""The pipeline's files on a server it reaches only over HTTP (a RunPod pod, any remote ComfyUI, or a local one
run as if it were remote): the photo folder goes up through CharForge's transfer routes, and what the stages
read or keep (dataset folders, reports, the LoRA, the training run folder) comes home, checked by sha256.

A server path under ``<output>/charforge`` has a local twin under ``OUT/server/`` with the same relative
path; folders are downloaded there whole and only what changed is fetched again on a rerun.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from charforge.common.transfer import ModelEntry

from ..driver.client import ComfyClient
from ..driver.errors import DriverError
from ..driver.sync import (
    call,
    download_lora,
    download_tree,
    output_relative,
    provision_models,
    require_models,
    server_info,
    upload_folder,
)
from ..driver.sync.models import check_models

MIRROR = "server"


class RemoteFiles:
    """File access of the pipeline's stages to one remote server."""

    def __init__(self, client: ComfyClient, out: Path, say: Callable[[str], None]):
        self.client = client
        self.out = out
        self.say = say
        try:
            self.info = call(client, server_info)
        except DriverError as exc:
            raise DriverError(f"{client.url} cannot take files from this machine: {exc}") from None
        self.outputs_dir = PurePosixPath(self.info["outputs_dir"])
        self.mirror = out / MIRROR

    def upload_photos(self, photos: Path, dataset: str) -> str:
        """The photo folder up as `dataset`; returns the server's folder (what Load Dataset reads)."""
        report = call(self.client, upload_folder, photos, dataset)
        self.say(
            f"photos on the server: {len(report.sent)} sent ({report.bytes_sent} bytes), "
            f"{len(report.unchanged)} already there"
            + (f", {len(report.removed)} removed" if report.removed else "")
            + f" -> {report.folder}"
        )
        return report.folder

    def relative(self, server_path: str) -> PurePosixPath:
        """`server_path` relative to the server's ``<output>/charforge``."""
        return output_relative(server_path, str(self.outputs_dir))

    def twin(self, server_path: str) -> Path:
        """The local twin of a server path (nothing is downloaded)."""
        return self.mirror.joinpath(*self.relative(server_path).parts)

    def local(self, server_path: str, depth: int = 2) -> Path:
        """Download the folder `depth` levels below ``charforge/`` that holds `server_path` (a dataset folder:
        ``datasets/<name>``) into the mirror; returns the local twin of `server_path`."""
        parts = self.relative(server_path).parts
        folder = "/".join(parts[:depth])
        call(self.client, download_tree, folder, self.mirror.joinpath(*parts[:depth]))
        return self.mirror.joinpath(*parts)

    def fetch(self, server_folder: str, target: Path) -> list[dict[str, Any]]:
        """Download a server folder of CharForge's output into `target`; returns the manifest entries."""
        tree = call(self.client, download_tree, self.relative(server_folder).as_posix(), target)
        return tree.files

    def fetch_lora(self, name: str, target_dir: Path) -> dict[str, Any]:
        return call(self.client, download_lora, name, target_dir)


def ensure_models(client: ComfyClient, entries: list[ModelEntry], provision: bool) -> None:
    """Refuse to go on when the manifest's models are missing on the server, naming them; with `provision`,
    the server first downloads those with a URL (resumed, checked by sha256 there)."""
    if provision:
        call(client, provision_models, entries)
    else:
        require_models(call(client, check_models, entries), client.url)
