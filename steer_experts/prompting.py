"""Prompting: steering by asking, the baseline that AxBench ranks first.

:class:`PromptSteeredModel` touches no activation. It puts an instruction to
write about the concept in a user turn of the model's chat template and starts
the assistant's turn with the prompt, so the model continues the prompt's text
while told what to write about. Perplexity and concept scores of its
continuations are then comparable with every other method's: the continuation
is of the same prompt.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import InvalidArgumentError
from .models import LoadedModel
from .steering import SteeredModel

DEFAULT_INSTRUCTION = "Write a few sentences about {concept}."


class PromptSteeredModel(SteeredModel):
    """A model steered by an instruction in its chat template (no intervention).

    Attributes (besides :class:`SteeredModel`'s): ``concept`` and ``instruction``
    (the user turn, with ``{concept}`` filled in).
    """

    method = "prompt"

    def __init__(self, base: LoadedModel, concept: str, instruction: str = DEFAULT_INSTRUCTION):
        if not isinstance(concept, str) or not concept.strip():
            raise InvalidArgumentError(f"concept must be a non-empty word or phrase; got {concept!r}.")
        if getattr(base.tokenizer, "chat_template", None) is None:
            raise InvalidArgumentError(f"{base.name!r} has no chat template, so it cannot be steered by an instruction; "
                             "use an instruct model.")
        self.concept = concept
        self.instruction = instruction.format(concept=concept)
        super().__init__(base, {}, "all")

    def __repr__(self) -> str:
        return f"SteeredModel({self.base.name!r}, prompted: {self.instruction!r})"

    def model_inputs(self, prompts: Sequence[str]) -> list[str]:
        """Each prompt as the start of the assistant's answer to the instruction."""
        return [self.base.tokenizer.apply_chat_template(
                    [{"role": "user", "content": self.instruction}, {"role": "assistant", "content": prompt}],
                    tokenize=False, continue_final_message=True)
                for prompt in prompts]

    def method_config(self) -> dict:
        """Concept and instruction."""
        return {"concept": self.concept, "instruction": self.instruction}

    def method_arrays(self) -> dict[str, np.ndarray]:
        """None: the instruction is the whole state."""
        return {}

    @classmethod
    def from_saved(cls, model: LoadedModel, config: dict, arrays: dict[str, np.ndarray]) -> "PromptSteeredModel":
        """Rebuild from the saved instruction."""
        steered = cls(model, config["concept"])
        steered.instruction = str(config["instruction"])
        return steered


def steer_prompt(model: LoadedModel, concept: str, instruction: str = DEFAULT_INSTRUCTION) -> PromptSteeredModel:
    """Steer ``model`` toward ``concept`` (a word or phrase) by instruction: ``instruction`` with
    ``{concept}`` filled in, as a user turn of the chat template. Raises ValueError for a model
    without a chat template or an empty concept."""
    return PromptSteeredModel(model, concept, instruction)
