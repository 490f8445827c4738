"""Measure steered generations and their statistics.

The metrics of self-conditioning (Suau et al. 2022) and the frontier, one module each:

* :mod:`.concept_score` -- p(concept): :func:`concept_rate`, the share of texts that mention
  the concept word or an inflection (:func:`~steer_experts.words.concept_words`), and
  :class:`ConceptClassifier`, a classifier's probability that a text is about the concept.
* :mod:`.likelihood` -- :func:`perplexity` of continuations under a causal LM (another model,
  or the steered model itself through :class:`SteeredScorer`), and
  :func:`next_word_probability`, the exact probability that a continuation begins with a word.
* :mod:`.diversity` -- :func:`self_bleu` (n = 3, 4; lower is more diverse) and :func:`distinct_n`.
* :mod:`.statistics` -- :func:`bootstrap_interval` and result rows with 95% intervals,
  Spearman correlations with bootstrap intervals.
* :mod:`.sentence_encoder` -- all-MiniLM-L6-v2 embeddings, read offline.

All functions are pure: they take texts (and a model for likelihoods) and return numbers.
The metrics also ship as ``evaluate`` modules: ``evaluate.load(metric_path("self_bleu"))``.
"""

from __future__ import annotations

from pathlib import Path

from ..words import concept_words
from .concept_score import ConceptClassifier, concept_presence, concept_rate, contains_concept
from .diversity import bleu, distinct_n, self_bleu, tokenize_words
from .likelihood import SteeredScorer, distinct_forms, next_word_probability, perplexity
from .statistics import bootstrap_interval, difference_row, mean_row, rate_row

__all__ = [
    "ConceptClassifier", "SteeredScorer", "bleu", "bootstrap_interval", "concept_presence", "concept_rate",
    "concept_words", "contains_concept", "difference_row", "distinct_forms", "distinct_n", "mean_row",
    "metric_path", "next_word_probability", "perplexity", "rate_row", "self_bleu", "tokenize_words",
]

_METRICS_DIR = Path(__file__).resolve().parent / "metrics"


def metric_path(name: str) -> str:
    """Path of a shipped ``evaluate`` metric script, for ``evaluate.load(metric_path(name))``.

    Names: ``"concept_presence"``, ``"concept_score"`` and ``"self_bleu"``. Loading works offline
    (``HF_HUB_OFFLINE=1``, ``HF_EVALUATE_OFFLINE=1``); the script imports
    ``steer_experts.evaluation``, so the package must be importable.
    """
    script = _METRICS_DIR / name / f"{name}.py"
    if not script.is_file():
        available = sorted(p.name for p in _METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
        raise ValueError(f"no shipped metric named {name!r}; available: {available}.")
    return str(script)
