"""Expert-overlap similarity, ratings, greedy word choice and Spearman with CI, against direct computations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import spearmanr

from steer_experts.expertise import Expertise
from steer_experts.experts import ExpertSet
from steer_experts.evaluation.statistics import spearman_difference, spearman_with_ci
from steer_experts.lens.queries import audit_unrelated, label_neurons, search_experts
from steer_experts.lens.ratings import (
    WordPairRatings, agreement_ceiling, greedy_word_choice, human_alignment, load_men, load_ratings,
)
from steer_experts.lens.similarity import (
    SimilarityMatrix, ap_cosine_similarity, experts_per_concept, jaccard_similarity, relative_taus, shared_experts,
    top_k_jaccard_similarity,
)
from steer_experts.units import UnitSite

from ..conftest import MEN, needs_data

MEN_FILE = MEN / "MEN_dataset_natural_form_full"
needs_men = needs_data(MEN_FILE, f"MEN not found at {MEN_FILE.resolve()}")

SITES = [UnitSite(0, "model.layers.0.mlp.down_proj", 7), UnitSite(1, "model.layers.1.mlp.down_proj", 5)]
NAMES = ["cat", "dog", "car", "bus", "tree"]


def random_expert_set(seed: int = 0) -> ExpertSet:
    rng = np.random.default_rng(seed)
    c, u = len(NAMES), sum(s.width for s in SITES)
    ap = rng.uniform(0, 1, (c, u))
    ap[4] = rng.uniform(0, 0.3, u)  # "tree" has no experts above 0.3
    stats = {"ap": ap, "auroc": rng.uniform(0, 1, (c, u))}
    stats |= {k: rng.normal(size=(c, u)).astype(np.float32) for k in ("on_p50", "on_mean", "on_p90", "off_mean")}
    e = Expertise(NAMES, **stats, n_positives=np.array([10, 20, 30, 40, 50]), n_negatives=np.full(5, 100))
    return ExpertSet(e, SITES, "tiny", "0" * 32)


def test_jaccard_matches_python_sets():
    es = random_expert_set()
    for tau in (0.3, 0.5, 0.9):
        sim = jaccard_similarity(es, tau)
        sets = [{u for u in range(es.n_units) if es.expertise.ap[c, u] > tau} for c in range(len(NAMES))]
        for i, j in itertools.product(range(len(NAMES)), repeat=2):
            if not sets[i] or not sets[j]:
                assert np.isnan(sim.values[i, j])
            else:
                assert sim.values[i, j] == pytest.approx(len(sets[i] & sets[j]) / len(sets[i] | sets[j]))
        assert experts_per_concept(es, tau).tolist() == [len(s) for s in sets]


def test_top_k_jaccard_matches_the_selected_expert_sets():
    es = random_expert_set()
    es.expertise.ap[0, :4] = es.expertise.ap[1, :4] = 0.99  # ties at the top: broken as select() breaks them
    for k in (1, 3, 4, 12):
        sim = top_k_jaccard_similarity(es, k)
        sets = [set(es.select(c, k=k).units.tolist()) for c in NAMES]
        for i, j in itertools.product(range(len(NAMES)), repeat=2):
            assert sim.values[i, j] == pytest.approx(len(sets[i] & sets[j]) / len(sets[i] | sets[j]))
    with pytest.raises(ValueError, match="k must be in"):
        top_k_jaccard_similarity(es, 13)


def test_ap_cosine_matches_numpy():
    es = random_expert_set(1)
    ap = es.expertise.ap
    raw = ap_cosine_similarity(es)
    centred_ap = ap - ap.mean(axis=0)
    centred = ap_cosine_similarity(es, centred=True)
    for i, j in itertools.product(range(len(NAMES)), repeat=2):
        assert raw.values[i, j] == pytest.approx(ap[i] @ ap[j] / np.linalg.norm(ap[i]) / np.linalg.norm(ap[j]))
        a, b = centred_ap[i], centred_ap[j]
        assert centred.values[i, j] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_matrix_csv_round_trip_and_neighbours(tmp_path):
    sim = jaccard_similarity(random_expert_set(), 0.5)
    back = SimilarityMatrix.from_csv(sim.to_csv(tmp_path / "m.csv"))
    assert back.concepts == sim.concepts and back.method == sim.method
    assert np.allclose(back.values, sim.values, equal_nan=True, rtol=1e-5)
    row = sim.values[0]
    others = sorted((j for j in range(1, len(NAMES)) if not np.isnan(row[j])), key=lambda j: -row[j])
    assert [n for n, _ in sim.nearest("cat", 10)] == [NAMES[j] for j in others]


def test_relative_taus_are_chance_plus_multiple():
    es = random_expert_set()
    r = np.mean(np.array([10, 20, 30, 40, 50]) / (np.array([10, 20, 30, 40, 50]) + 100))
    assert relative_taus(es, [0, 0.3, 1]) == pytest.approx({0.0: r, 0.3: r + 0.3 * (1 - r), 1.0: 1.0})


def test_shared_experts_and_audit_match_sets():
    es = random_expert_set(2)
    ap = es.expertise.ap
    both = {u for u in range(es.n_units) if ap[0, u] > 0.5 and ap[2, u] > 0.5}
    rows = shared_experts(es, "cat", "car", 0.5)
    assert {es.unit_index(r["layer"], r["neuron"]) for r in rows} == both
    assert all(r["ap_a"] == ap[0, es.unit_index(r["layer"], r["neuron"])] for r in rows)
    audit = audit_unrelated(es, [("cat", "car"), ("dog", "tree")], tau=0.5)
    by_pair = {(r["concept_a"], r["concept_b"]): r for r in audit}
    assert len(by_pair["cat", "car"]["shared"]) == len(both)
    assert by_pair["dog", "tree"]["shared"] == [] and by_pair["dog", "tree"]["jaccard"] is None


def test_labels_and_search():
    es = random_expert_set(3)
    ap = es.expertise.ap
    labels = label_neurons(es, tau=0.8)
    labelled = {es.unit_index(r["layer"], r["neuron"]): r["concepts"] for r in labels}
    assert set(labelled) == {u for u in range(es.n_units) if (ap[:, u] > 0.8).any()}
    for u, concepts in labelled.items():
        assert [c for c, _ in concepts] == [NAMES[c] for c in sorted(np.flatnonzero(ap[:, u] > 0.8),
                                                                     key=lambda c: -ap[c, u])]
    assert len(search_experts(es, "dog", tau=0.8)) == int((ap[1] > 0.8).sum())
    assert [r["ap"] for r in search_experts(es, "dog", k=3)] == sorted(ap[1], reverse=True)[:3]
    with pytest.raises(KeyError, match="cat"):
        search_experts(es, "zebra")


# --------------------------------------------------------------------------- correlation


def test_spearman_matches_scipy_and_bootstrap_loop():
    rng = np.random.default_rng(0)
    x = rng.normal(size=60)
    y = x + rng.normal(size=60)
    x[[3, 7]] = np.nan
    c = spearman_with_ci(x, y, n_boot=300, seed=5)
    keep = ~np.isnan(x)
    assert c.n_pairs == 58
    ref = spearmanr(x[keep], y[keep])
    assert c.rho == pytest.approx(ref.statistic) and c.p_value == pytest.approx(ref.pvalue)
    # Same draws, scipy per resample.
    draws = np.random.default_rng(5).integers(0, 58, size=(300, 58))
    boots = [spearmanr(x[keep][d], y[keep][d]).statistic for d in draws]
    assert (c.low, c.high) == pytest.approx(tuple(np.percentile(boots, [2.5, 97.5])))
    assert c.low <= c.rho <= c.high


def test_spearman_undefined_for_constant_input():
    c = spearman_with_ci(np.ones(10), np.arange(10.0))
    assert np.isnan(c.rho) and np.isnan(c.low) and c.n_pairs == 10
    assert c.to_dict()["rho"] is None


def test_spearman_difference_is_paired():
    rng = np.random.default_rng(1)
    y = rng.normal(size=80)
    a, b = y + 0.3 * rng.normal(size=80), y + 2 * rng.normal(size=80)
    d = spearman_difference(a, b, y, n_boot=200, seed=3)
    assert d.difference == pytest.approx(spearmanr(a, y).statistic - spearmanr(b, y).statistic)
    draws = np.random.default_rng(3).integers(0, 80, size=(200, 80))
    boots = [spearmanr(a[i], y[i]).statistic - spearmanr(b[i], y[i]).statistic for i in draws]
    assert (d.low, d.high) == pytest.approx(tuple(np.percentile(boots, [2.5, 97.5])))


def test_human_alignment_uses_pairs_among_concepts():
    es = random_expert_set()
    ratings = WordPairRatings(["cat", "cat", "car", "dog", "cat", "sun"], ["dog", "car", "bus", "bus", "tree", "cat"],
                              np.array([40.0, 10, 35, 8, 5, 3]))
    sim = ap_cosine_similarity(es)
    c = human_alignment(sim, ratings, n_boot=50)
    values = [sim.pair(a, b) for a, b in zip(ratings.word1[:5], ratings.word2[:5])]
    assert c.n_pairs == 5 and c.rho == pytest.approx(spearmanr(values, ratings.scores[:5]).statistic)
    # Jaccard at 0.5 is undefined for pairs with "tree" (no experts): that pair is dropped.
    assert human_alignment(jaccard_similarity(es, 0.5), ratings, n_boot=50).n_pairs == 4


# --------------------------------------------------------------------------- ratings and word choice


def test_greedy_matches_brute_force_best_step():
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(9)]
    pairs = [p for p in itertools.combinations(words, 2) if rng.random() < 0.4]
    ratings = WordPairRatings([a for a, _ in pairs], [b for _, b in pairs], rng.uniform(0, 50, len(pairs)))
    chosen = greedy_word_choice(ratings, 6)
    covered = lambda ws: sum(a in ws and b in ws for a, b in pairs)  # noqa: E731
    for n in range(1, 7):
        # Each step adds as many pairs as the best single word could.
        before = covered(set(chosen[:n - 1]))
        best_gain = max(covered(set(chosen[:n - 1]) | {w}) for w in words if w not in chosen[:n - 1]) - before
        assert covered(set(chosen[:n])) - before == best_gain
    assert len(ratings.pairs_within(chosen)) == covered(set(chosen))


@needs_men
def test_men_loader_and_greedy_coverage():
    men = load_men(MEN_FILE)
    lines = MEN_FILE.read_text().split("\n")[1:]
    rows = [line.split() for line in lines if line.strip()]
    assert len(men) == len(rows) == 3000 and len(men.words) == 751
    assert (men.word1[0], men.word2[0], men.scores[0]) == (rows[0][0], rows[0][1], float(rows[0][2]))
    assert men.scores.min() == 0 and men.scores.max() == 50
    # Published by ExpertLens (METHOD.md): 50 words cover 296 pairs, 100 cover 642, 150 cover 966.
    for n, pairs in ((50, 296), (100, 642), (150, 966)):
        chosen = set(greedy_word_choice(men, n))
        assert sum(a in chosen and b in chosen for a, b, _ in rows) == pairs
    assert agreement_ceiling(MEN / "agreement-score.txt") == 0.84


def test_generic_ratings_loader(tmp_path):
    tsv = tmp_path / "r.tsv"
    tsv.write_text("score\tfirst\tsecond\n7.5\tCat\tDog\n1\tcar\ttree\n")
    r = load_ratings(tsv, word1_column="first", word2_column="second", score_column="score")
    assert (r.word1, r.word2, r.scores.tolist()) == (["cat", "car"], ["dog", "tree"], [7.5, 1.0])
    csv_file = tmp_path / "r.csv"
    csv_file.write_text("a,b,s\nsun-n,moon-n,9\n")
    r = load_ratings(csv_file, strip_pos=True)
    assert (r.word1, r.word2, r.scores.tolist()) == (["sun"], ["moon"], [9.0])
    csv_file.write_text("sun,moon,9\ncar,tree,high\n")
    with pytest.raises(ValueError, match="r.csv:2: score 'high'"):
        load_ratings(csv_file)


def test_profile_similarities_match_scipy_and_the_formula():
    from scipy.stats import pearsonr

    from steer_experts.lens.similarity import ap_profile_similarity

    es = random_expert_set(2)
    ap = es.expertise.ap.copy()
    ap[1, :4] = ap[1, 4]  # ties, which Spearman ranks share
    es.expertise.ap = ap
    pearson, spearman = ap_profile_similarity(es, "pearson"), ap_profile_similarity(es, "spearman")
    lift = ap_profile_similarity(es, "lift")
    rate = es.expertise.n_positives / (es.expertise.n_positives + es.expertise.n_negatives)
    for i, j in itertools.product(range(len(NAMES)), repeat=2):
        assert pearson.values[i, j] == pytest.approx(pearsonr(ap[i], ap[j])[0])
        assert spearman.values[i, j] == pytest.approx(spearmanr(ap[i], ap[j])[0])
        a, b = (ap[i] - rate[i]) / (1 - rate[i]), (ap[j] - rate[j]) / (1 - rate[j])
        assert lift.values[i, j] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert ap_profile_similarity((ap, NAMES), "pearson").values == pytest.approx(pearson.values)
    with pytest.raises(ValueError, match="positive rate"):
        ap_profile_similarity((ap, NAMES), "lift")
    with pytest.raises(ValueError, match="Unknown method"):
        ap_profile_similarity(es, "kendall")


def test_dev_test_split_is_disjoint_seeded_and_stratified():
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(60)]
    ratings = WordPairRatings(words[:30] * 2, words[30:] + words[:30], rng.uniform(0, 50, 60), "made up")
    dev, test = ratings.split(0.5, seed=3, strata=5)
    pair = lambda r: set(zip(r.word1, r.word2, r.scores))  # noqa: E731
    assert pair(dev) | pair(test) == pair(ratings) and not pair(dev) & pair(test)
    assert len(dev) == len(test) == 30
    assert pair(ratings.split(0.5, seed=3, strata=5)[0]) == pair(dev) != pair(ratings.split(0.5, seed=4)[0])
    bands = np.quantile(ratings.scores, [0.2, 0.4, 0.6, 0.8])
    for part in (dev, test):  # every rating band holds its share: 6 of its 12 pairs
        assert np.bincount(np.searchsorted(bands, part.scores), minlength=5).tolist() == [6] * 5
    with pytest.raises(ValueError, match="0 < fraction < 1"):
        ratings.split(1.0)
