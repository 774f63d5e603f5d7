"""Object storage for inputs and results: S3-compatible services through boto3 (s3.py). boto3 is imported
only when storage is used (``pip install 'charforge[s3]'``)."""

from .s3 import S3Location, S3Storage, StorageError, is_s3

__all__ = ["S3Location", "S3Storage", "StorageError", "is_s3"]
