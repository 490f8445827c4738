"""The classifier concept score: against sklearn fitted by hand, its evaluate module, and real data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from steer_experts.concepts import Concept
from steer_experts.evaluation.concept_score import ConceptClassifier
from steer_experts.evaluation.sentence_encoder import SentenceEncoder

REPO_ROOT = Path(__file__).resolve().parents[2]
SPORT = ("The striker scored twice in the cup final.", "Fans sang as the goalkeeper saved a penalty.",
         "The league title was decided on the last match day.", "He signed for the club as a midfielder.",
         "The referee showed a red card to the defender.", "Our team trains on the pitch every Tuesday.",
         "The match ended in a draw after extra time.", "She coached the national side for ten years.")
OTHER = ("The soup needs more salt and a little pepper.", "Rain fell on the quiet harbour all night.",
         "The library opens at nine on weekdays.", "She planted tomatoes along the garden wall.",
         "The train to the coast was late again.", "He painted the kitchen a pale shade of blue.",
         "The museum shows old maps of the city.", "A cat slept on the warm windowsill.")
CONCEPT = Concept("sport", SPORT, OTHER)


@pytest.fixture(scope="module")
def encoder():
    return SentenceEncoder()


def test_classifier_is_sklearn_on_minilm_embeddings(encoder):
    classifier = ConceptClassifier.fit(CONCEPT, encoder, held_out=0.25, seed=3)
    x = encoder.encode(list(SPORT + OTHER))
    y = np.array([1] * len(SPORT) + [0] * len(OTHER))
    train_x, test_x, train_y, test_y = train_test_split(x, y, test_size=0.25, random_state=3, stratify=y)
    reference = LogisticRegression(class_weight="balanced", max_iter=2000).fit(train_x, train_y)
    assert classifier.held_out_accuracy == pytest.approx((reference.predict(test_x) == test_y).mean())
    assert classifier.n_held_out == len(test_y) == 4
    texts = ["The goalkeeper dived and the crowd roared.", "I baked bread this morning.", ""]
    probabilities = classifier.probabilities(texts)
    np.testing.assert_allclose(probabilities[:2], reference.predict_proba(encoder.encode(texts[:2]))[:, 1])
    assert probabilities[2] == 0.0  # an empty continuation is about nothing
    assert probabilities[0] > 0.5 > probabilities[1]
    assert classifier.score(texts) == pytest.approx(probabilities.mean())


def test_bad_input_is_refused(encoder):
    with pytest.raises(ValueError, match="positives and negatives"):
        ConceptClassifier.fit(Concept("x", SPORT, ()), encoder)
    with pytest.raises(ValueError, match="fraction"):
        ConceptClassifier.fit(CONCEPT, encoder, held_out=1.5)
    classifier = ConceptClassifier.fit(CONCEPT, encoder)
    with pytest.raises(TypeError, match="list of texts"):
        classifier.probabilities("one text")
    with pytest.raises(ValueError, match="no texts"):
        classifier.score([])


_LOAD_AND_COMPUTE = """
import json, evaluate
from steer_experts.evaluation import metric_path
data = json.loads(input())
metric = evaluate.load(metric_path("concept_score"), keep_in_memory=True)
print(json.dumps(metric.compute(predictions=data["texts"], positives=data["positives"],
                                negatives=data["negatives"])))
"""


def test_evaluate_module_matches_the_classifier(tmp_path, encoder):
    texts = ["The goalkeeper dived and the crowd roared.", "I baked bread this morning."]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _LOAD_AND_COMPUTE], capture_output=True, text=True, env=env,
                          input=json.dumps({"texts": texts, "positives": SPORT, "negatives": OTHER}), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    want = ConceptClassifier.fit(Concept("concept", SPORT, OTHER), encoder)
    np.testing.assert_allclose(got["probabilities"], want.probabilities(texts), rtol=1e-6)
    assert got["concept_score"] == pytest.approx(want.score(texts), rel=1e-6)
    assert got["held_out_accuracy"] == want.held_out_accuracy


@pytest.mark.integration
def test_onesec_football_classifier_is_accurate(onesec, encoder):
    football = onesec[next(n for n in onesec.names if n.startswith("football"))]
    classifier = ConceptClassifier.fit(football, encoder)
    assert classifier.n_held_out == 340
    assert classifier.held_out_accuracy >= 0.95
    texts = ["The Premier League season ended with a late winner at Old Trafford.",
             "The recipe calls for two eggs and a cup of flour."]
    p = classifier.probabilities(texts)
    assert p[0] > 0.5 > p[1]
