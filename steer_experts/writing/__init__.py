"""Concept data from a word alone: sentences written by a local instruct model.

* :mod:`.samplers` -- the engines that write (CTranslate2, or transformers ``generate``).
* :mod:`.writer` -- positive sentences for words, filtered, seeded and resumable.
* :mod:`.neutral_bank` -- about 2,000 everyday sentences shipped with the package: any word's negatives.
"""

from .samplers import BACKENDS, ChatSampler, ConversionError, CTranslate2Sampler, Sampling, TransformersSampler, \
    chat_sampler, ctranslate2_folder
from .writer import (
    DROP_REASONS, MENTION_FREE_STYLES, PROMPTS, ConceptWriter, WordProgress, WritingReport, WritingSettings,
    round_prompts, round_seed, sentence_problem, split_sentences, write_concepts,
)
from .neutral_bank import load_neutral_bank, neutral_negatives

__all__ = [
    "BACKENDS", "ChatSampler", "ConversionError", "CTranslate2Sampler", "Sampling", "TransformersSampler",
    "chat_sampler", "ctranslate2_folder",
    "DROP_REASONS", "MENTION_FREE_STYLES", "PROMPTS", "ConceptWriter", "WordProgress", "WritingReport",
    "WritingSettings", "round_prompts", "round_seed", "sentence_problem", "split_sentences", "write_concepts",
    "load_neutral_bank", "neutral_negatives",
]
