"""ComfyUI node layer. The only package of the pack that imports ComfyUI (comfy*, folder_paths,
server); everything heavy lives in ``trainer/`` and is reached through data only."""

from __future__ import annotations

import importlib

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

# One module per concern; each exposes NODES: list[type[io.ComfyNode]].
_NODE_MODULES = (
    "dataset",
    "identifier",
    "train",
    "options",
    "lora_loader",
    "controlnet",
    "scores",
    "compare_grid",
    "lora_list",
)


class DreamBoothExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        node_list: list[type[io.ComfyNode]] = []
        for name in _NODE_MODULES:
            module = importlib.import_module(f".{name}", __name__)
            node_list.extend(module.NODES)
        # ComfyUI 0.3.x does not call on_load; the node list is asked for once, at start-up.
        importlib.import_module(".train", __name__).register_server_hooks()
        importlib.import_module(".live_view", __name__).register_routes()
        return node_list
