"""The V3 extension: the list of the pack's nodes."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import cache_node, compare_grid, demo_nodes, files_node, lora_nodes, match_report, tiny_model_node, transfer_nodes


class ProLoRAExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*transfer_nodes.NODES, *lora_nodes.NODES, files_node.TransferLoRAFiles, *cache_node.NODES, *tiny_model_node.NODES,
                *compare_grid.NODES, *match_report.NODES, *demo_nodes.NODES]


async def comfy_entrypoint() -> ProLoRAExtension:
    return ProLoRAExtension()
