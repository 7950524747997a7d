"""What differs between the model families the engine trains: SD1.x, SD2.x and SDXL.

One record per family keeps ``if family == ...`` out of the training loop, the sampler and the
exporter: they ask the family. How a family is recognised in a file lives in ``models.py`` (it reads
tensor shapes); how a prompt becomes conditioning lives in ``prompts.py``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str  # "sd1" | "sd2" | "sdxl": the value configs, metadata and identities carry
    label: str  # for people: "SD1.x"
    default_resolution: int
    # kohya prefixes of the LoRA file, one per text encoder, in the model's order.
    text_encoder_prefixes: tuple[str, ...]
    # The latent scale the VAE was trained with (diffusers' vae.config.scaling_factor).
    vae_scaling: float
    # SDXL's VAE produces NaNs in fp16 (activations above 65504): it always encodes in fp32 unless the
    # user gives the fp16-fixed VAE.
    vae_fp16_safe: bool
    # SDXL conditions the UNet on the pooled prompt embedding and on (original size, crop top-left,
    # target size) of each training image.
    size_conditioning: bool
    # kohya / SAI metadata
    kohya_version: str  # ss_base_model_version
    modelspec_architecture: str

    @property
    def text_encoder_count(self) -> int:
        return len(self.text_encoder_prefixes)


SD1 = Family(name="sd1", label="SD1.x", default_resolution=512, text_encoder_prefixes=("lora_te",),
             vae_scaling=0.18215, vae_fp16_safe=True, size_conditioning=False, kohya_version="sd_v1",
             modelspec_architecture="stable-diffusion-v1")
SD2 = Family(name="sd2", label="SD2.x", default_resolution=768, text_encoder_prefixes=("lora_te",),
             vae_scaling=0.18215, vae_fp16_safe=True, size_conditioning=False, kohya_version="sd_v2",
             modelspec_architecture="stable-diffusion-v2-512")
SDXL = Family(name="sdxl", label="SDXL", default_resolution=1024, text_encoder_prefixes=("lora_te1", "lora_te2"),
              vae_scaling=0.13025, vae_fp16_safe=False, size_conditioning=True, kohya_version="sdxl_base_v1-0",
              modelspec_architecture="stable-diffusion-xl-v1-base")

FAMILIES: dict[str, Family] = {f.name: f for f in (SD1, SD2, SDXL)}


def family(name: str) -> Family:
    return FAMILIES[name]
