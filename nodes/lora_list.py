"""Gathers trained LoRAs into one list, e.g. the final LoRAs of several train nodes for the comparison grid.

A link from each train node is also what makes ComfyUI run those trainings before the node that reads
the list: a LoRA given to the grid by file name has no such link, and ComfyUI runs independent branches
in no fixed order.
"""

from __future__ import annotations

from pathlib import Path

from comfy_api.latest import io
from typing_extensions import override

from .types import LoraFile, LoraList, TrainedLora

_SLOTS = 4  # lora_1 .. lora_4; longer lists chain through the loras input


def merge_loras(first: tuple[TrainedLora, ...] | None, *more: TrainedLora | None) -> tuple[TrainedLora, ...]:
    """`first` followed by each of `more` that is given, in order; a file listed twice is kept at its first place."""
    seen: set[Path] = set()
    out: list[TrainedLora] = []
    for item in (*(first or ()), *more):
        if item is None:
            continue
        # Resolved, so one file reached by two spellings (a link, a relative part) still counts once.
        key = Path(item.path).resolve()
        if key not in seen:
            seen.add(key)
            out.append(item)
    return tuple(out)


class DreamBoothLoraList(io.ComfyNode):
    @classmethod
    @override
    def define_schema(cls) -> io.Schema:
        slots = [
            LoraFile.Input(f"lora_{i}", optional=i > 1,
                           tooltip=f"A trained LoRA (the train node's lora output); entry {i} of the list"
                                   + (", after lora_1" if i > 1 else "") + ".")
            for i in range(1, _SLOTS + 1)
        ]
        return io.Schema(
            node_id="DreamBoothLoraList",
            display_name="DreamBooth LoRA List",
            category="DreamBooth/evaluate",
            description=(
                "Collects the LoRAs of several train nodes into one list, in input order, e.g. for the comparison "
                "grid's loras input. The grid then waits for every one of those trainings. Chain a second list "
                f"node through loras for more than {_SLOTS}."
            ),
            inputs=[
                *slots,
                LoraList.Input("loras", optional=True,
                               tooltip="A list to extend (another LoRA List node or the train node's "
                                       "intermediate_loras); its LoRAs come first. A file already in it is not "
                                       "added again."),
            ],
            outputs=[
                LoraList.Output("loras_out", display_name="loras",
                                tooltip="The loras input's LoRAs, then lora_1 .. lora_4, each file once."),
            ],
        )

    @classmethod
    @override
    def execute(cls, lora_1: TrainedLora, lora_2: TrainedLora | None = None, lora_3: TrainedLora | None = None,
                lora_4: TrainedLora | None = None, loras: tuple[TrainedLora, ...] | None = None) -> io.NodeOutput:
        return io.NodeOutput(merge_loras(loras, lora_1, lora_2, lora_3, lora_4))


NODES: list[type[io.ComfyNode]] = [DreamBoothLoraList]
