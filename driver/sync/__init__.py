"""Files between this machine and a ComfyUI with CharForge's transfer routes (``nodes/transfer.py``):
photo folders up (uploads.py), results home (results.py), models in place (models.py). Every transfer is
checked by sha256 and resumes where it stopped; nothing here knows whether the server is local, behind a
RunPod pod's proxy or elsewhere."""

from .blocking import call, server_info
from .models import MissingModels, ModelCheck, check_models, provision_models, provision_tiny, require_models
from .results import DownloadedTree, download_lora, download_tree
from .uploads import UploadReport, upload_folder

__all__ = ["DownloadedTree", "MissingModels", "ModelCheck", "UploadReport", "call", "check_models", "download_lora",
           "download_tree", "provision_models", "provision_tiny", "require_models", "server_info", "upload_folder"]
