"""CharForge workflow driver: submit ComfyUI workflows to any server, follow them, bring outputs home.

It talks to ComfyUI over HTTP and WebSocket only and never imports the node pack or ComfyUI.
"""
