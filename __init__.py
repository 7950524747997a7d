"""DreamBooth-LoRA for ComfyUI: train a subject LoRA from a few photos, load it with split
UNet/text-encoder strengths, and generate the subject anywhere under ControlNet guidance.

This module stays import-light on purpose: ComfyUI (and pytest) import it, so the node
modules - and with them torch, diffusers and ComfyUI itself - are imported only inside
``comfy_entrypoint``.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():  # noqa: ANN201 - the return type lives in ComfyUI's API
    from .nodes import DreamBoothExtension

    return DreamBoothExtension()
