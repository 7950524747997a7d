"""Node that picks (or checks) the rare-token identifier and writes the two DreamBooth prompts."""

from __future__ import annotations

import logging

from comfy_api.latest import io
from typing_extensions import override

from ..trainer import identifiers as ids

logger = logging.getLogger(__name__)


class DreamBoothIdentifier(io.ComfyNode):
    @classmethod
    @override
    def define_schema(cls) -> io.Schema:
        lo, hi = ids.RARE_ID_RANGE
        return io.Schema(
            node_id="DreamBoothIdentifier",
            display_name="DreamBooth Identifier",
            category="DreamBooth/dataset",
            description=(
                "Proposes a rare single-token identifier for your subject (as in the DreamBooth paper) "
                "and builds the instance prompt 'a photo of <identifier> <class>' and the class prompt "
                "'a photo of <class>'. Checks your own identifier against the real CLIP tokenizer."
            ),
            inputs=[
                io.String.Input(
                    "class_noun",
                    default="dog",
                    tooltip=(
                        "What the subject is, in plain words ('dog', 'woman', 'backpack'). The model's "
                        "knowledge of this class is what the identifier gets attached to."
                    ),
                ),
                io.Int.Input(
                    "index",
                    default=0,
                    min=0,
                    max=999_999,
                    tooltip=(
                        f"Which proposal to take. Proposals are whole-word CLIP tokens of 3-4 letters with "
                        f"ids {lo}-{hi} (rare but learned), in a fixed order: the same index gives the "
                        "same identifier on every machine."
                    ),
                ),
                io.String.Input(
                    "identifier",
                    default="",
                    optional=True,
                    tooltip="Your own identifier; leave empty to use the proposal. It is checked and warned about.",
                ),
            ],
            outputs=[
                io.String.Output("chosen_identifier", display_name="identifier", tooltip="The identifier token."),
                io.String.Output(
                    "instance_prompt", display_name="instance_prompt", tooltip="'a photo of <identifier> <class>'."
                ),
                io.String.Output("class_prompt", display_name="class_prompt", tooltip="'a photo of <class>'."),
                io.String.Output(
                    "report", display_name="report", tooltip="Why this identifier, and any warnings about it."
                ),
            ],
        )

    @classmethod
    @override
    def execute(cls, class_noun: str, index: int, identifier: str | None = None) -> io.NodeOutput:
        noun = " ".join(class_noun.split())
        if not noun:
            raise ValueError(
                "class_noun is empty: give the kind of thing your subject is, e.g. 'dog' or 'man'. "
                "DreamBooth attaches the identifier to what the model knows about that class."
            )
        own = (identifier or "").strip()
        if own:
            chosen = own
            check = ids.check_identifier(chosen, noun)
            lines = [f"Your identifier, checked with the CLIP tokenizer: {check.describe()}"]
            if not check.ok:
                proposal = ids.propose_identifier(index, noun)
                lines.append(f"A proposal without these problems: {proposal!r} (clear 'identifier' to use it).")
                logger.warning("identifier %r: %s", chosen, "; ".join(check.problems))
        else:
            chosen = ids.propose_identifier(index, noun)
            check = ids.check_identifier(chosen, noun)
            total = len(ids.candidate_identifiers())
            lo, hi = ids.RARE_ID_RANGE
            lines = [
                f"Proposal {index} (of {total}; the list wraps around): {chosen!r}.",
                f"Why: one whole-word CLIP token (id {check.token_ids[0]}, in the rare-but-learned range "
                f"{lo}-{hi}), 3-4 lower-case letters, not on the list of everyday words, brands and names, "
                "so the model has little prior meaning to unlearn.",
            ]
            if not check.ok:  # cannot happen for a proposal; shown rather than hidden if it ever does
                lines.append(check.describe())
        noun_tokens = len(ids.load_tokenizer().tokenize(noun))
        if noun_tokens > 4:
            lines.append(
                f"Note: the class noun is {noun_tokens} tokens; a short, common noun gives the prior "
                "preservation images a clearer class."
            )
        report = "\n".join(lines)
        return io.NodeOutput(chosen, ids.instance_prompt(chosen, noun), ids.class_prompt(noun), report)


NODES: list[type[io.ComfyNode]] = [DreamBoothIdentifier]
