"""Dataset preparation: from a folder of photos to a clean, bucketed, captioned kohya dataset.

The stages, in the order a workflow usually chains them, each taking and returning a
`DatasetManifest` (manifest.py) and reading pixels lazily from the files it names:

load -> analyse -> filter -> dedup -> crop -> augment -> export -> report

Building blocks: scan.py (find images), images.py (decode safely and fast), quality.py (sharpness and
exposure), hashing.py (perceptual hashes), faces.py + mtcnn.py (face detection), buckets.py,
parallel.py (per-image thread pool with bounded memory).
"""

from .analyse import analyse, identity_distances
from .augment import AugmentSettings, augment
from .buckets import bucket_list, closest_bucket
from .crop import CropSettings, crop_dataset
from .dedup import deduplicate
from .export import CAPTION_MODES, ExportResult, export_kohya
from .faces import DETECTOR_CHOICES, DetectorChoice, Face, choose_detector
from .filters import FilterSettings, apply_filters
from .hashing import dhash, hamming, phash
from .images import read_rgb
from .load import add_arrays, dataset_folder, load_folder
from .manifest import DatasetManifest, FaceInfo, ImageEntry, Scores
from .quality import ANALYSIS_SIZE, ImageQuality, measure_quality
from .report import build_report, write_report
from .scan import IMAGE_EXTENSIONS, Rejected, ScanResult, letterbox, load_image, scan_folder, verify_image

__all__ = [
    "ANALYSIS_SIZE",
    "CAPTION_MODES",
    "DETECTOR_CHOICES",
    "IMAGE_EXTENSIONS",
    "AugmentSettings",
    "CropSettings",
    "DatasetManifest",
    "DetectorChoice",
    "ExportResult",
    "Face",
    "FaceInfo",
    "FilterSettings",
    "ImageEntry",
    "ImageQuality",
    "Rejected",
    "ScanResult",
    "Scores",
    "add_arrays",
    "analyse",
    "apply_filters",
    "augment",
    "bucket_list",
    "build_report",
    "choose_detector",
    "closest_bucket",
    "crop_dataset",
    "dataset_folder",
    "deduplicate",
    "dhash",
    "export_kohya",
    "hamming",
    "identity_distances",
    "letterbox",
    "load_folder",
    "load_image",
    "measure_quality",
    "phash",
    "read_rgb",
    "scan_folder",
    "verify_image",
    "write_report",
]
