"""p(concept) as an ``evaluate`` metric; the computation lives in steer_experts.evaluation."""

import evaluate

import steer_experts.evaluation
from steer_experts.evaluation.metrics import text_metric_info

_DESCRIPTION = """\
Concept presence: for each prediction, whether it contains the concept word or one
of its inflections as a whole word (case-insensitive), and the share of predictions
that do, p(concept) of Suau et al. (2022). "footballer" does not count for
"football" unless passed in `extra` or `words`.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated continuations.
    concept (str): the concept word; its inflections are added (football -> footballs, football's).
    extra (list of str): further forms to count with `concept`, e.g. ["footballer"].
    words (list of str): the exact words to look for, instead of `concept`.
Returns:
    concept_rate (float): share of predictions containing the concept, in [0, 1].
    matches (list of bool): per prediction, whether it contains the concept.
Examples:
    >>> metric = evaluate.load(steer_experts.evaluation.metric_path("concept_presence"))
    >>> metric.compute(predictions=["Football is fun.", "I like tea."], concept="football")
"""

_CITATION = """\
@inproceedings{suau2022self,
  title={Self-conditioning Pre-Trained Language Models},
  author={Suau, Xavier and Zappella, Luca and Apostoloff, Nicholas},
  booktitle={ICML}, year={2022}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ConceptPresence(evaluate.Metric):
    """Share of generations that mention a concept."""

    def _info(self):
        return text_metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, _CITATION)

    def _compute(self, predictions, concept=None, words=None, extra=()):
        if (concept is None) == (words is None):
            raise ValueError("pass exactly one of concept='football' or words=[...] to concept_presence.")
        if words is None:
            words = steer_experts.evaluation.concept_words(concept, extra)
        matches = steer_experts.evaluation.concept_presence(predictions, words)
        return {"concept_rate": float(matches.mean()), "matches": matches.tolist()}
