"""The classifier concept score as an ``evaluate`` metric; the computation lives in
steer_experts.evaluation.concept_score."""

import evaluate

from steer_experts.concepts import Concept
from steer_experts.evaluation.concept_score import ConceptClassifier
from steer_experts.evaluation.metrics import text_metric_info

_DESCRIPTION = """\
Concept score: the mean probability that a prediction is about a concept, from a
logistic regression on all-MiniLM-L6-v2 sentence embeddings fitted on the concept's
positive vs negative sentences. Unlike a word count, it sees text that is about the
concept without naming it. The classifier's accuracy on held-out sentences is returned.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated continuations.
    positives (list of str): sentences where the concept is present.
    negatives (list of str): sentences where it is absent.
    seed (int): draw of the held-out sentences (20% of each class).
Returns:
    concept_score (float): mean p(about the concept) over the predictions, in [0, 1].
    probabilities (list of float): p(about the concept) of each prediction.
    held_out_accuracy (float): the classifier's accuracy on its held-out sentences.
Examples:
    >>> metric = evaluate.load(steer_experts.evaluation.metric_path("concept_score"))
    >>> metric.compute(predictions=["The striker scored."], positives=[...], negatives=[...])
"""

_CITATION = """\
@article{wu2025axbench,
  title={AxBench: Steering LLMs? Even Simple Baselines Outperform Sparse Autoencoders},
  author={Wu, Zhengxuan and others}, journal={arXiv:2501.17148}, year={2025}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ConceptScore(evaluate.Metric):
    """Mean classifier probability that generations are about a concept."""

    def _info(self):
        return text_metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, _CITATION)

    def _compute(self, predictions, positives=None, negatives=None, seed=0):
        if not positives or not negatives:
            raise ValueError("concept_score needs positives=[...] and negatives=[...] to fit its classifier.")
        classifier = ConceptClassifier.fit(Concept("concept", tuple(positives), tuple(negatives)), seed=seed)
        probabilities = classifier.probabilities(predictions)
        return {"concept_score": float(probabilities.mean()), "probabilities": probabilities.tolist(),
                "held_out_accuracy": classifier.held_out_accuracy}
