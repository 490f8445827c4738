"""Similarity baselines that ExpertLens's expert overlap is compared against.

Each gives one vector per concept and compares concepts by cosine
(:func:`vector_similarity`, optionally mean-centred over the concepts like
the centred AP cosine):

* **static**: the language model's input embedding of the word (mean over its
  tokens, tokenised with a leading space as it appears mid-sentence);
* **contextual**: the model's hidden states, mean-pooled over each positive
  sentence's tokens (padding and special tokens masked), then averaged over the
  concept's positives -- one vector per layer (index 0 is the embedding output);
* **MiniLM**: all-MiniLM-L6-v2 sentence embeddings (mean-pooled with the
  attention mask, then L2-normalised, as sentence-transformers does for this
  model), averaged over the concept's positives, or of the bare word.

The MiniLM encoder is :class:`~steer_experts.evaluation.sentence_encoder.SentenceEncoder`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..concepts import ConceptSet
from ..evaluation.sentence_encoder import SentenceEncoder
from ..models import LoadedModel
from .similarity import SimilarityMatrix, cosine_matrix


def vector_similarity(vectors: np.ndarray, concepts: Sequence[str], method: str,
                      centred: bool = False) -> SimilarityMatrix:
    """Cosine similarity of per-concept vectors (C, D); ``centred`` subtracts the mean vector first."""
    vectors = np.asarray(vectors, dtype=np.float64)
    if centred:
        vectors = vectors - vectors.mean(axis=0, keepdims=True)
    return SimilarityMatrix(list(concepts), cosine_matrix(vectors), method + (" centred" if centred else ""))


# --------------------------------------------------------------------------- language-model baselines


def static_word_vectors(model: LoadedModel, words: Sequence[str]) -> np.ndarray:
    """The input embedding of each word, float64 (W, hidden): mean over the tokens of ``" " + word``."""
    table = model.model.get_input_embeddings().weight.detach().to(torch.float64).cpu()
    vectors = []
    for word in words:
        ids = model.tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"The tokenizer of {model.name} turns {word!r} into no tokens.")
        vectors.append(table[ids].mean(dim=0).numpy())
    return np.stack(vectors)


@torch.no_grad()
def contextual_sentence_vectors(model: LoadedModel, sentences: Sequence[str], *, max_length: int = 128,
                                batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """Every layer's hidden states of each sentence, mean-pooled over its tokens (padding and special
    tokens not pooled): float32 (n_layers + 1, S, hidden); row 0 is the embedding output, row l the
    output of layer l."""
    tok = model.tokenizer
    lengths = [len(ids) for ids in tok(list(sentences), add_special_tokens=True)["input_ids"]]
    order = sorted(range(len(sentences)), key=lambda i: lengths[i])  # similar lengths pad less
    special = torch.tensor(sorted(tok.all_special_ids))
    pooled: np.ndarray | None = None
    side = tok.padding_side
    tok.padding_side = "right"
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="hidden states", unit="batch", disable=not progress):
            rows = order[start:start + batch_size]
            enc = tok([sentences[r] for r in rows], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            mask = (enc["attention_mask"].bool() & ~torch.isin(enc["input_ids"], special)).to(torch.float64)
            out = model.model.base_model(**enc.to(model.device), output_hidden_states=True, use_cache=False)
            states = torch.stack(out.hidden_states).to(torch.float64).cpu()  # (L+1, B, T, H)
            means = (states * mask[None, :, :, None]).sum(dim=2) / mask.sum(dim=1).clamp(min=1)[None, :, None]
            if pooled is None:
                pooled = np.empty((states.shape[0], len(sentences), states.shape[-1]), dtype=np.float32)
            pooled[:, rows] = means.numpy()
    finally:
        tok.padding_side = side
    return pooled


def contextual_concept_vectors(model: LoadedModel, concepts: ConceptSet, *, max_length: int = 128,
                               batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """Per layer, the mean over a concept's positives of its sentences' mean-pooled hidden states
    (:func:`contextual_sentence_vectors`): float64 (n_layers + 1, C, hidden)."""
    sentences = _positive_sentences(concepts)
    vectors = contextual_sentence_vectors(model, sentences, max_length=max_length, batch_size=batch_size,
                                          progress=progress)
    return _concept_means(vectors, sentences, concepts)


def _positive_sentences(concepts: ConceptSet) -> list[str]:
    return list(dict.fromkeys(s for c in concepts.concepts for s in c.positives))


def _concept_means(vectors: np.ndarray, sentences: Sequence[str], concepts: ConceptSet) -> np.ndarray:
    """The mean, in float64, of each concept's positives' rows of ``vectors`` (..., S, D): (..., C, D)."""
    row_of = {s: i for i, s in enumerate(sentences)}
    return np.stack([vectors[..., [row_of[s] for s in c.positives], :].astype(np.float64).mean(axis=-2)
                     for c in concepts.concepts], axis=-2)


# --------------------------------------------------------------------------- all baselines at once


class BaselineVectors:
    """Every baseline's vectors for one concept set, kept per sentence where a baseline averages
    sentences, so that :meth:`similarities` can average any subset of the positives (fewer per concept,
    another split) without running a model again. Build it with :func:`baseline_vectors`.

    Attributes:
        concepts: the concept set (names are the words).
        words: ``"static"`` and ``"minilm word"``, float64 (C, D) each.
        per_sentence: ``"contextual"`` float32 (layers + 1, S, hidden) and ``"minilm sentences"`` float32
            (S, 384), row s for the s-th distinct positive sentence of ``concepts``.
    """

    def __init__(self, concepts: ConceptSet, words: dict[str, np.ndarray], per_sentence: dict[str, np.ndarray]):
        self.concepts, self.words, self.per_sentence = concepts, words, per_sentence

    def similarities(self, concepts: ConceptSet | None = None, centred: bool = True) -> dict[str, SimilarityMatrix]:
        """Every baseline's similarity matrix, the sentence baselines averaged over the positives of
        ``concepts`` (default: :attr:`concepts`; else the same names, positives among theirs).

        Keys: ``"static"``, ``"contextual L<l>"`` for every layer, ``"minilm sentences"``,
        ``"minilm word"``; with ``centred`` also each one's mean-centred variant (key + ``" centred"``).
        """
        concepts = concepts or self.concepts
        if concepts.names != self.concepts.names:
            raise ValueError("Average over the same concepts, in the same order, as the vectors were made for.")
        sentences = _positive_sentences(self.concepts)
        vectors = {"static": self.words["static"]}
        layers = _concept_means(self.per_sentence["contextual"], sentences, concepts)
        vectors.update({f"contextual L{layer}": v for layer, v in enumerate(layers)})
        vectors["minilm sentences"] = _concept_means(self.per_sentence["minilm sentences"], sentences, concepts)
        vectors["minilm word"] = self.words["minilm word"]
        out = {}
        for key, v in vectors.items():
            out[key] = vector_similarity(v, concepts.names, key)
            if centred:
                out[key + " centred"] = vector_similarity(v, concepts.names, key, centred=True)
        return out


def baseline_vectors(model: LoadedModel, concepts: ConceptSet, *, encoder: SentenceEncoder | None = None,
                     max_length: int = 128, batch_size: int = 32, progress: bool = True) -> BaselineVectors:
    """Every baseline's vectors over ``concepts`` (names are the words). ``encoder`` defaults to
    all-MiniLM-L6-v2. Memory: 4 bytes x (layers + 1) x positive sentences x hidden size."""
    encoder = encoder or SentenceEncoder()
    sentences = _positive_sentences(concepts)
    words = {"static": static_word_vectors(model, concepts.names),
             "minilm word": encoder.encode(concepts.names).astype(np.float64)}
    per_sentence = {
        "contextual": contextual_sentence_vectors(model, sentences, max_length=max_length, batch_size=batch_size,
                                                  progress=progress),
        "minilm sentences": encoder.encode(sentences, progress=progress),
    }
    return BaselineVectors(concepts, words, per_sentence)


def baseline_similarities(model: LoadedModel, concepts: ConceptSet, *, encoder: SentenceEncoder | None = None,
                          centred: bool = True, max_length: int = 128, batch_size: int = 32,
                          progress: bool = True) -> dict[str, SimilarityMatrix]:
    """Every baseline's similarity matrix over ``concepts``: :meth:`BaselineVectors.similarities` of
    :func:`baseline_vectors`."""
    return baseline_vectors(model, concepts, encoder=encoder, max_length=max_length, batch_size=batch_size,
                            progress=progress).similarities(centred=centred)
