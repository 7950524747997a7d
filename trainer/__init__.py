"""DreamBooth-LoRA training engine.

ComfyUI-free on purpose: the node layer hands it a JSON config and reads JSON-lines events, so the
same engine runs as ``python -m trainer --config run.json``, under ``accelerate launch``, or from
any other front end.
"""

__version__ = "0.1.0"

# Identifies this package in the protocol's hello event: an unrelated PyPI distribution is also
# called ``trainer``, so the launcher checks that the process it started runs this one.
ENGINE_NAME = "dreambooth-lora-trainer"
