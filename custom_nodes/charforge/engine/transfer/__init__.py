"""Files moving between a driver and this ComfyUI: photo folders coming up in chunks (uploads.py), the
checksums of what is here, computed once (hashes.py), and model files fetched from a URL by the server itself
(downloads.py). Plain Python: the routes in ``nodes/transfer.py`` are the only callers that know HTTP."""
