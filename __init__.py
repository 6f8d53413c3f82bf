"""ProLoRA Transfer: ComfyUI node pack entry point (V3 schema).

ComfyUI imports this file as a package; everything inside uses relative imports only, because
ComfyUI's own top-level modules (``nodes``, ``utils``, ``comfy``…) would clash with ours.
"""
WEB_DIRECTORY = "./web"

try:  # ComfyUI present: register the V3 extension
    from comfy_api.latest import ComfyExtension, io  # noqa: F401
except ImportError:  # imported outside ComfyUI (e.g. by tools): the engine still works
    pass
else:
    from .nodes.extension import comfy_entrypoint  # noqa: F401

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
