"""ProLoRA Cache: show the basis cache's size, keep it under a limit, or clear it, from ComfyUI."""
from __future__ import annotations

import time

from comfy_api.latest import io

from ..prolora_core.basis import BasisSettings
from ..prolora_core.cache import DEFAULT_MAX_GB, BasisCache
from .bridge import cache_dir
from .transfer_nodes import CATEGORY, PREFIX

ACTIONS = ("show", "apply limit", "clear")


class ProLoRACache(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}Cache", display_name="ProLoRA Cache", category=CATEGORY, is_output_node=True,
            description="The basis cache in ComfyUI's user folder (bases of model weights kept across runs so that later "
                        "transfers compute no SVD): its size, a size limit, or clear it.",
            inputs=[
                io.Combo.Input("action", options=list(ACTIONS), default="show", tooltip="show: size and place; apply limit: remove the least "
                               "recently used bases until the cache fits max_gb; clear: remove every basis and remembered file key."),
                io.Float.Input("max_gb", default=DEFAULT_MAX_GB, min=0.0, max=4096.0, step=0.5, tooltip="The size limit for 'apply limit' (GB)."),
            ],
            outputs=[io.String.Output(display_name="info", tooltip="The cache's size and place after the action.")],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs) -> float:
        return time.time()  # the cache changes outside the graph: run every time

    @classmethod
    def execute(cls, action: str, max_gb: float) -> io.NodeOutput:
        cache = BasisCache(cache_dir(), BasisSettings())
        before = cache.size_bytes()
        if action == "clear":
            cache.clear()
            done = f"cleared {before / 2**30:.2f} GB"
        elif action == "apply limit":
            done = f"removed the {cache.limit(max_gb)} least recently used bases"
        else:
            done = ""
        text = cache.describe(max_gb if action == "apply limit" else None) + (f"; {done}" if done else "")
        return io.NodeOutput(text, ui={"text": [text]})


NODES: list[type[io.ComfyNode]] = [ProLoRACache]
