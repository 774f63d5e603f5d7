"""Files between this machine and a ComfyUI with CharForge's transfer routes (``nodes/transfer.py``):
photo folders up (uploads.py), results home (results.py), models in place (models.py). Every transfer is
checked by sha256 and resumes where it stopped; nothing here knows whether the server is local, behind a
RunPod pod's proxy or elsewhere."""

from ._http import NoTransferRoutes
from .blocking import call, server_info
from .models import MissingModels, ModelCheck, check_models, provision_models, provision_tiny, require_models
from .results import DownloadedTree, download_lora, download_tree
from .training import TrainedLoRA, bring_training_home, output_relative, parse_train_summary, trained_loras
from .uploads import UploadReport, upload_folder, upload_lora

__all__ = [
    "DownloadedTree",
    "MissingModels",
    "ModelCheck",
    "NoTransferRoutes",
    "TrainedLoRA",
    "UploadReport",
    "bring_training_home",
    "call",
    "check_models",
    "download_lora",
    "download_tree",
    "output_relative",
    "parse_train_summary",
    "provision_models",
    "provision_tiny",
    "require_models",
    "server_info",
    "trained_loras",
    "upload_folder",
    "upload_lora",
]
