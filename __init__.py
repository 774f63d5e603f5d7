"""ComfyUI entry point of the CharForge node pack.

ComfyUI imports this file when the repository sits in ``ComfyUI/custom_nodes/`` (cloned by hand, by
ComfyUI-Manager or comfy-cli, unpacked from the Comfy Registry, or linked by ``install.py``). It imports
it as a package named after the folder path, so everything below is reached by relative import.
"""

if __package__:
    from .custom_nodes.charforge.pack import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, WEB_DIRECTORY

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
# Otherwise this file was imported as a plain module (pytest does that with the repository root when the
# checkout's folder name is not a valid package name): there is no pack to expose then.
