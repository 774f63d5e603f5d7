"""Dataset preparation: scanning folders, reading images safely, previews."""

from .quality import ANALYSIS_SIZE, ImageQuality, measure_quality
from .scan import IMAGE_EXTENSIONS, Rejected, ScanResult, letterbox, load_image, scan_folder, verify_image

__all__ = [
    "ANALYSIS_SIZE", "ImageQuality", "measure_quality",
    "IMAGE_EXTENSIONS", "Rejected", "ScanResult", "letterbox", "load_image", "scan_folder", "verify_image"]
