"""A concept score that does not count words: a classifier on sentence embeddings.

A word list misses most of what steering does: text about teams, the World Cup
and England is about football before the word appears. :class:`ConceptClassifier`
is a logistic regression (scikit-learn) on all-MiniLM-L6-v2 embeddings, fitted on
a concept's positive vs negative sentences. It keeps a seeded, stratified part of
them aside and reports its accuracy there (:attr:`ConceptClassifier.held_out_accuracy`);
the model that reports it is the model that scores.

The concept score of a set of continuations is the mean probability that a
continuation is about the concept (:meth:`ConceptClassifier.score`), in [0, 1].
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from ..concepts import Concept
from ..errors import InvalidArgumentError
from ..words import word_tuple, words_pattern
from .diversity import nonempty_texts
from .sentence_encoder import SentenceEncoder


def contains_concept(text: str, words: Iterable[str]) -> bool:
    """Whether ``text`` contains any of ``words`` as a whole word, case-insensitive.

    Whole word means not preceded or followed by a letter, digit or underscore:
    "Football's" and "football-mad" match "football"; "footballer" does not.
    """
    return words_pattern(word_tuple(words)).search(text) is not None


def concept_presence(texts: Sequence[str], words: Iterable[str]) -> np.ndarray:
    """Return a boolean array: for each text, whether it contains the concept (see :func:`contains_concept`)."""
    texts = nonempty_texts(texts, "concept_presence")
    pattern = words_pattern(word_tuple(words))
    return np.array([pattern.search(t) is not None for t in texts], dtype=bool)


def concept_rate(texts: Sequence[str], words: Iterable[str]) -> float:
    """Return p(concept): the share of ``texts`` that contain the concept, in [0, 1].

    For its 95% interval use ``bootstrap_interval(concept_presence(texts, words))``.
    """
    return float(concept_presence(texts, words).mean())



class ConceptClassifier:
    """p(text is about ``concept``) from a logistic regression on MiniLM embeddings.

    Build it with :meth:`fit`. Attributes: ``concept`` (name), ``held_out_accuracy``
    (fraction of held-out sentences classified right at p = 0.5), ``n_train``/``n_held_out``
    (sentences), ``encoder`` (the :class:`SentenceEncoder`).
    """

    def __init__(self, concept: str, encoder: SentenceEncoder, regression: LogisticRegression,
                 held_out_accuracy: float, n_train: int, n_held_out: int):
        self.concept = concept
        self.encoder = encoder
        self.regression = regression
        self.held_out_accuracy = held_out_accuracy
        self.n_train = n_train
        self.n_held_out = n_held_out

    def __repr__(self) -> str:
        return (f"ConceptClassifier({self.concept!r}, held-out accuracy {self.held_out_accuracy:.3f} "
                f"on {self.n_held_out} sentences)")

    @classmethod
    def fit(cls, concept: Concept, encoder: SentenceEncoder | None = None, *, held_out: float = 0.2,
            seed: int = 0, regularisation: float = 1.0) -> "ConceptClassifier":
        """Fit on ``concept``'s positives (label 1) vs negatives (label 0).

        ``held_out`` (fraction in (0, 1)) of each class is kept aside, drawn with ``seed``, to
        measure accuracy. Classes are weighted to balance, so p = 0.5 means undecided whatever
        the positive rate. ``regularisation`` is scikit-learn's C (inverse strength).
        Raises ValueError without positives or negatives, or for a bad fraction.
        """
        if not concept.positives or not concept.negatives:
            raise InvalidArgumentError(f"Concept {concept.name!r} needs positives and negatives to fit a classifier; "
                             "sample negatives first (ConceptSet.with_sampled_negatives).")
        if not 0.0 < held_out < 1.0:
            raise InvalidArgumentError(f"held_out must be a fraction in (0, 1); got {held_out!r}.")
        encoder = encoder or SentenceEncoder()
        sentences = list(concept.positives) + list(concept.negatives)
        labels = np.array([1] * len(concept.positives) + [0] * len(concept.negatives))
        embeddings = encoder.encode(sentences)
        train_x, test_x, train_y, test_y = train_test_split(embeddings, labels, test_size=held_out,
                                                            random_state=seed, stratify=labels)
        regression = LogisticRegression(C=regularisation, class_weight="balanced", max_iter=2000)
        regression.fit(train_x, train_y)
        accuracy = float((regression.predict(test_x) == test_y).mean())
        return cls(concept.name, encoder, regression, accuracy, len(train_y), len(test_y))

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        """p(about the concept) of each text, float64 in [0, 1]; an empty text gets 0."""
        if isinstance(texts, str):
            raise TypeError("probabilities takes a list of texts, not a single string; wrap it in a list.")
        texts = list(texts)
        out = np.zeros(len(texts))
        nonempty = [i for i, t in enumerate(texts) if t.strip()]
        if nonempty:
            embeddings = self.encoder.encode([texts[i] for i in nonempty])
            out[nonempty] = self.regression.predict_proba(embeddings)[:, 1]
        return out

    def score(self, texts: Sequence[str]) -> float:
        """The concept score of ``texts``: their mean p(about the concept), in [0, 1]."""
        if not len(texts):
            raise InvalidArgumentError("score got no texts; generate at least one continuation first.")
        return float(self.probabilities(texts).mean())
