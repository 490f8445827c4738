"""Self-BLEU as an ``evaluate`` metric; the computation lives in steer_experts.evaluation."""

import evaluate

import steer_experts.evaluation
from steer_experts.evaluation.metrics import text_metric_info

_DESCRIPTION = """\
Self-BLEU (Zhu et al. 2018): the mean, over the predictions, of the sentence BLEU
of each prediction against all the other predictions as references. Uniform
weights over n-gram orders 1..n, NLTK smoothing method1 (epsilon 0.1), lower-case
word/punctuation tokens. Higher means less diverse.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated texts, at least 2 (one group, e.g. one prompt).
    n (int): highest n-gram order, default 4.
    max_refs (int or None): score each text against at most this many random others.
    seed (int): seed of that random choice, default 0.
Returns:
    self_bleu (float): in [0, 1].
Examples:
    >>> metric = evaluate.load(steer_experts.evaluation.metric_path("self_bleu"))
    >>> metric.compute(predictions=["the cat sat", "the cat ran", "a dog ran"], n=2)["self_bleu"]
"""

_CITATION = """\
@inproceedings{zhu2018texygen,
  title={Texygen: A Benchmarking Platform for Text Generation Models},
  author={Zhu, Yaoming and Lu, Sidi and Zheng, Lei and Guo, Jiaxian and Zhang, Weinan and Wang, Jun and Yu, Yong},
  booktitle={SIGIR}, year={2018}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SelfBleu(evaluate.Metric):
    """Self-BLEU of a set of generations."""

    def _info(self):
        return text_metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, _CITATION)

    def _compute(self, predictions, n=4, max_refs=None, seed=0):
        return {"self_bleu": steer_experts.evaluation.self_bleu(predictions, n=n, seed=seed, max_refs=max_refs)}
