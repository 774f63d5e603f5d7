"""Dataset preparation: scanning folders, reading images safely, previews."""

from .scan import IMAGE_EXTENSIONS, Rejected, ScanResult, letterbox, load_image, scan_folder, verify_image

__all__ = ["IMAGE_EXTENSIONS", "Rejected", "ScanResult", "letterbox", "load_image", "scan_folder", "verify_image"]
