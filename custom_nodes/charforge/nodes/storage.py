"""Files between the server and S3-compatible storage (menu: CharForge/Transfer): how a trained LoRA leaves a RunPod
serverless worker, whose disk goes away and whose handler returns images only, and how a dataset reaches it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .. import bridge
from ..common.transfer import FETCH_NODE_CLASS, OUTPUTS_NODE_CLASS, RECEIPT_PREFIX, STORE_NODE_CLASS
from ..deps import require

CATEGORY = "CharForge/Transfer"
TRAINING_RUN = "CHARFORGE_TRAINING_RUN"


class SendTrainingToStorage:
    """Send a trained LoRA and its run folder to S3-compatible storage with the server's own credentials."""

    DESCRIPTION = (
        "Sends the LoRA and the whole run folder (loss curve, samples, checkpoints, state) of a Train LoRA run to "
        "s3://bucket/prefix (lora/<name> and run/<run name>/), each file with its sha256 in the object's "
        "metadata; a file already there with the same bytes is not sent again. Credentials and endpoint come "
        "from this server's environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or worker-comfyui's "
        "BUCKET_ACCESS_KEY_ID / BUCKET_SECRET_ACCESS_KEY; AWS_ENDPOINT_URL or CHARFORGE_S3_ENDPOINT for R2, MinIO "
        "or RunPod volumes). Shows a small receipt image whose text names every file: on a RunPod serverless "
        "endpoint that image is what the worker returns, and the driver downloads the rest from storage."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("destination",)
    OUTPUT_TOOLTIPS = ("Where the run went: s3://bucket/prefix.",)
    FUNCTION = "send"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "run": (TRAINING_RUN, {"tooltip": "The run of a Train LoRA node."}),
                "destination": (
                    "STRING",
                    {
                        "default": "s3://bucket/charforge/runs",
                        "tooltip": "s3://bucket/prefix to send the LoRA and the run folder to (the bucket must "
                        "exist; this server's credentials must be allowed to write there).",
                    },
                ),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def send(self, run, destination, unique_id=None):
        from ..engine.transfer.storage import store_training

        lora = run.lora_path if os.path.isfile(run.lora_path) else os.path.join(run.run_dir, run.lora_name)
        summary = f"{run.lora_name}: {run.step} steps, final loss {run.loss:.4f}; run folder {run.run_dir}"
        receipt, shown, sent = _send(
            "Send Training to Storage",
            lambda control: store_training(Path(lora), Path(run.run_dir), summary, destination, control),
            f"send {run.name}",
            run.name,
            unique_id,
        )
        text = (
            f"{receipt['summary']}; sent {sent} of {len(receipt['files'])} files to {receipt['destination']}"
        )
        return {"ui": {"text": [text], "images": [shown]}, "result": (receipt["destination"],)}


def _send(node: str, store, label: str, name: str, unique_id) -> tuple[dict, dict, int]:
    """Run `store(control)` (a storage upload answering its receipt), refusing a failure in `node`'s name;
    returns (the receipt with this node's id, its receipt image entry, how many files were sent)."""
    from ..engine.transfer.storage import StorageFailed

    try:
        receipt = store(bridge.control(0, label=label))
    except StorageFailed as exc:
        raise RuntimeError(f"{node}: {exc}") from None
    receipt["node"] = str(unique_id or "")
    shown = _show_receipt(receipt, name)
    return receipt, shown, sum(1 for f in receipt["files"] if f["sent"])


def _show_receipt(receipt: dict, name: str) -> dict:
    """The receipt as a small PNG in output/charforge/results (its text in a PNG text chunk): the image a
    RunPod serverless worker returns, which the driver reads. Returns the node's ``ui`` image entry."""
    from ..engine.transfer.storage import RECEIPT_KEY, receipt_text

    image = require("PIL.Image")
    png = require("PIL.PngImagePlugin")
    folder = os.path.join(bridge.output_directory(), "charforge", "results")
    os.makedirs(folder, exist_ok=True)
    key = hashlib.sha256(receipt["destination"].encode()).hexdigest()[:12]
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:60]
    path = os.path.join(folder, f"{RECEIPT_PREFIX}{safe}_{key}.png")
    info = png.PngInfo()
    info.add_text(RECEIPT_KEY, receipt_text(receipt))
    image.new("RGB", (64, 16), (32, 96, 64)).save(path, pnginfo=info)
    return {"filename": os.path.basename(path), "subfolder": "charforge/results", "type": "output"}


class SendOutputsToStorage:
    """Send what a job's CharForge nodes wrote to S3-compatible storage with the server's own credentials."""

    DESCRIPTION = (
        "Sends the files CharForge nodes of this job wrote (Save Video's video, Storyboard Sheet's folder, an "
        "exported dataset's folder, Dataset Report's report folder, score sheets as JSON, Compare Sets' CSV) to "
        "s3://bucket/prefix/files/<path below ComfyUI's output folder>, each with its sha256 in the object's "
        "metadata (a file already there with the same bytes is not sent again), and a receipt.json listing "
        "them. The driver wires the nodes' outputs in as extra inputs (from_<node id>__<output index>); only "
        "files inside ComfyUI's output folder are sent, hidden ones never. Credentials as for Send Training "
        "to Storage. Shows a receipt image: what a RunPod serverless worker returns, so the driver can bring "
        "every file home from storage."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("destination",)
    OUTPUT_TOOLTIPS = ("Where the files went: s3://bucket/prefix.",)
    FUNCTION = "send"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "destination": (
                    "STRING",
                    {
                        "default": "s3://bucket/charforge/outputs",
                        "tooltip": "s3://bucket/prefix to send the files to (the bucket must exist; this "
                        "server's credentials must be allowed to write there).",
                    },
                ),
            },
            "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"},
        }

    def send(self, destination, prompt=None, unique_id=None, **outputs):
        from ..common.transfer import OUTPUT_VALUES, parse_output_input
        from ..engine.transfer.storage import OutputValue, output_files, store_outputs

        values = []
        for name, value in sorted(outputs.items()):
            wired = parse_output_input(name)
            if wired is None:
                continue
            node_id, index = wired
            class_type = str(((prompt or {}).get(node_id) or {}).get("class_type") or "")
            kind = OUTPUT_VALUES.get(class_type, {}).get(index, "file")
            values.append(OutputValue(node_id, class_type, kind, value))
        tag = hashlib.sha256(destination.strip().encode()).hexdigest()[:12]
        root = bridge.output_directory()
        files, notes = output_files(values, Path(root), Path(root) / "charforge" / "scores" / tag)
        receipt, shown, sent = _send(
            "Send Outputs to Storage",
            lambda control: store_outputs(files, destination, control),
            "send outputs",
            "outputs",
            unique_id,
        )
        text = f"{receipt['summary']} ({sent} sent, {len(receipt['files']) - sent} already there)"
        return {"ui": {"text": [text, *notes], "images": [shown]}, "result": (receipt["destination"],)}


class FetchFromStorage:
    """Fetch a folder (a dataset) from S3-compatible storage into ComfyUI's input folder."""

    DESCRIPTION = (
        "Downloads every file below s3://bucket/prefix into input/charforge/<folder name>/ (subfolders kept, e.g. "
        "a kohya dataset's <repeats>_<trigger class>/), each checked against the sha256 stored with it; files "
        "already there with the same bytes are kept. Outputs the folder's path for Train LoRA's dataset_folder. "
        "Credentials and endpoint come from this server's environment, as for Send Training to Storage."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("folder",)
    OUTPUT_TOOLTIPS = ("The local folder with the fetched files (wire it into Train LoRA's dataset_folder).",)
    FUNCTION = "fetch"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "source": (
                    "STRING",
                    {"default": "s3://bucket/datasets/alice", "tooltip": "s3://bucket/prefix to download."},
                ),
                "folder_name": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "The folder under input/charforge/ (letters, digits, . _ -); empty: named "
                        "after the source.",
                    },
                ),
            }
        }

    def fetch(self, source, folder_name=""):
        from ..common.transfer import dataset_name_ok
        from ..engine.transfer.storage import Destination, StorageFailed, fetch_tree, s3_client

        name = folder_name.strip() or "s3_" + hashlib.sha256(source.strip().encode()).hexdigest()[:16]
        if not dataset_name_ok(name):
            raise ValueError(
                f"Fetch from Storage: folder_name {name!r} must be letters, digits, '.', '_', '-'"
            )
        folder = Path(bridge.input_directory()) / "charforge" / name
        try:
            where = Destination.parse(source)
            got = fetch_tree(s3_client(), where, folder, bridge.control(0, label=f"fetch {name}"))
        except StorageFailed as exc:
            raise RuntimeError(f"Fetch from Storage: {exc}") from None
        fetched = sum(1 for f in got if f["fetched"])
        text = f"{len(got)} files from {source} in {folder} ({fetched} fetched, {len(got) - fetched} already here)"
        return {"ui": {"text": [text]}, "result": (str(folder),)}


NODE_CLASS_MAPPINGS = {
    STORE_NODE_CLASS: SendTrainingToStorage,
    OUTPUTS_NODE_CLASS: SendOutputsToStorage,
    FETCH_NODE_CLASS: FetchFromStorage,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    STORE_NODE_CLASS: "Send Training to Storage (CharForge)",
    OUTPUTS_NODE_CLASS: "Send Outputs to Storage (CharForge)",
    FETCH_NODE_CLASS: "Fetch from Storage (CharForge)",
}
