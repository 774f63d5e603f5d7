"""Custom ComfyUI value types the pack passes between its nodes.

Each is a plain string ComfyUI matches exactly when wiring sockets. Every custom type a node declares
must be listed here with what it carries (the node-contract test enforces it).
"""

CUSTOM_TYPES: dict[str, str] = {}
