"""The lens recipes end to end at CI size: 10 MEN words, 6 template sentences each, a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from steer_experts.errors import InvalidArgumentError
from steer_experts.experts import ExpertSet

from ..conftest import MEN, needs_data, tiny_config
from ..helpers import read_csv, recipe

MEN_FILE = MEN / "MEN_dataset_natural_form_full"
pytestmark = needs_data(MEN_FILE, f"MEN not found at {MEN_FILE.resolve()}")

TEMPLATES = ("The {w} was there in the morning.", "Everyone talked about the {w} at dinner.",
             "I saw a {w} near the old bridge.", "A {w} can change the whole day.",
             "She wrote a poem about the {w}.", "Nobody expected the {w} to be so close.")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Tiny models run faster on one thread."""


def men_rows() -> list[tuple[str, str, float]]:
    lines = MEN_FILE.read_text().splitlines()[1:]
    return [(a, b, float(s)) for a, b, s in (line.split() for line in lines if line.strip())]


@pytest.fixture(scope="module")
def words() -> list[str]:
    """10 MEN words that share many pairs: a dense corner found without the library's greedy."""
    rows = men_rows()
    degree: dict[str, int] = {}
    for a, b, _ in rows:
        degree[a] = degree.get(a, 0) + 1
        degree[b] = degree.get(b, 0) + 1
    chosen = [max(degree, key=lambda w: (degree[w], w))]
    while len(chosen) < 10:
        linked = {w: sum((a == w and b in chosen) or (b == w and a in chosen) for a, b, _ in rows) for w in degree}
        chosen.append(max((w for w in degree if w not in chosen), key=lambda w: (linked[w], degree[w], w)))
    return chosen


@pytest.fixture(scope="module")
def concept_folder(tmp_path_factory, words) -> Path:
    folder = tmp_path_factory.mktemp("concepts")
    for w in words:
        rows = [{"concept": w, "text": t.format(w=w), "label": 1, "style": "facts" if i < 3 else "stories"}
                for i, t in enumerate(TEMPLATES)]
        (folder / f"{w}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def save_tiny(folder: Path, arch: str, tokenizer) -> Path:
    """A tiny random model with SmolLM2's tokenizer, saved so a recipe loads it by path."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer)), dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tokenizer) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama", tokenizer)


@pytest.fixture(scope="module")
def alignment(tmp_path_factory, concept_folder, tiny_folder):
    out = tmp_path_factory.mktemp("alignment")
    args = ["--out", str(out), "--concepts", str(concept_folder), "--model", str(tiny_folder),
            "--ratings", str(MEN_FILE), "--agreement", str(MEN / "agreement-score.txt"),
            "--n-negatives", "30", "--n-boot", "200", "--curve", "2,4", "--cache-dir", str(out / "cache"), "--quiet"]
    return out, recipe("human_alignment").main(args), args


def test_alignment_outputs_exist(alignment):
    out, result, _ = alignment
    for name in ("alignment.json", "alignment.csv", "alignment.png", "report.md", "experts/expert_set.json",
                 "baselines/index.json", "similarity/index.json"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "alignment.json").read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    assert len(read_csv(out / "alignment.csv")) == len(result["rows"])
    assert result["ceiling"] == 0.84
    # The report says how long each stage took, on how many threads.
    wall = result["wall"]
    assert list(wall["stages"]) == ["experts", "baselines", "curve"]
    assert wall["threads"] == torch.get_num_threads()
    assert 0 < sum(wall["stages"].values()) <= wall["total"] + 0.2
    assert f"wall time of this run on {wall['threads']} torch threads: {wall['total']:.0f} s" in (
        out / "report.md").read_text()


def test_alignment_numbers_are_consistent(alignment, words):
    out, result, _ = alignment
    rated = [(a, b) for a, b, _ in men_rows() if a in words and b in words]
    assert result["pairs_available"] == len(rated) > 3
    expert_set = ExpertSet.from_pretrained(out / "experts")
    ap = expert_set.expertise.ap
    index = {c: i for i, c in enumerate(expert_set.concepts)}
    families = {r["family"] for r in result["rows"]}
    assert {"jaccard", "jaccard relative", "jaccard top-k", "ap cosine", "ap profile", "baseline"} <= families
    assert [r["method"] for r in result["rows"] if r["family"] == "ap profile"] == ["ap pearson", "ap spearman",
                                                                                    "ap lift cosine"]
    for r in result["rows"]:
        if r["family"] in ("jaccard", "jaccard relative"):
            # Pairs count when both words have at least one expert at this tau.
            has = {c for c in words if (ap[index[c]] > r["tau"]).any()}
            expected = sum(a in has and b in has for a, b in rated)
        else:
            expected = len(rated)
        assert r["n_pairs"] == expected, r["method"]
        if r["rho"] is None:
            assert r["low"] is None and r["high"] is None
        else:
            assert -1 <= r["low"] <= r["rho"] <= r["high"] <= 1, r["method"]


def test_alignment_matrices_match_expert_set(alignment):
    out, _, _ = alignment
    expert_set = ExpertSet.from_pretrained(out / "experts")
    index = json.loads((out / "similarity" / "index.json").read_text())
    files = {method: name for name, method in index.items()}
    from steer_experts.lens.similarity import SimilarityMatrix

    cosine = SimilarityMatrix.from_csv(out / "similarity" / files["ap cosine centred"])
    ap = expert_set.expertise.ap - expert_set.expertise.ap.mean(axis=0)
    unit = ap / np.linalg.norm(ap, axis=1, keepdims=True)
    assert np.allclose(cosine.values, unit @ unit.T, atol=1e-5)
    pearson = SimilarityMatrix.from_csv(out / "similarity" / files["ap pearson"])
    assert np.allclose(pearson.values, np.corrcoef(expert_set.expertise.ap), atol=1e-5)


def test_alignment_resumes_from_saved_work(alignment):
    out, result, args = alignment
    before = (out / "experts" / "expert_set.safetensors").stat().st_mtime_ns
    again = recipe("human_alignment").main(args)
    assert (out / "experts" / "expert_set.safetensors").stat().st_mtime_ns == before
    assert [r["rho"] for r in again["rows"]] == [r["rho"] for r in result["rows"]]


# --------------------------------------------------------------------------- organisation and stability


def test_organisation(alignment, words, tmp_path):
    from sklearn.metrics import adjusted_rand_score

    out, _, _ = alignment
    categories = {w: "ab"[i % 2] for i, w in enumerate(words)}
    (tmp_path / "cat.csv").write_text("concept,category\n" + "".join(f"{w},{c}\n" for w, c in categories.items()))
    result = recipe("organisation").main(["--out", str(tmp_path / "org"), "--experts", str(out / "experts"),
                                          "--categories", str(tmp_path / "cat.csv"), "--label-tau", "0.3"])
    for name in ("dendrogram.png", "heatmap.png", "layers.png", "report.md", "similarity.csv", "neuron_labels.jsonl"):
        assert (tmp_path / "org" / name).stat().st_size > 0, name
    assert sorted(result["order"]) == sorted(words)
    ari = result["adjusted_rand"]
    found = ari["clusters_by_concept"]
    assert ari["ari"] == adjusted_rand_score([categories[w] for w in found], list(found.values()))
    assert len(set(found.values())) <= 2
    for share in result["layer_share"].values():
        assert share == [] or abs(sum(share) - 1) < 1e-9
    ap = ExpertSet.from_pretrained(out / "experts").expertise.ap
    assert result["labelled_neurons"] == int((ap > 0.3).any(axis=0).sum())


def test_stability(concept_folder, tiny_folder, tokenizer, tmp_path):
    from scipy.stats import spearmanr

    gemma = save_tiny(tmp_path / "tiny-gemma", "gemma3", tokenizer)
    out = tmp_path / "stab"
    result = recipe("stability").main([
        "--out", str(out), "--concepts", str(concept_folder), "--models", f"{tiny_folder},{gemma}",
        "--ratings", str(MEN_FILE), "--n-negatives", "30", "--n-perm", "50", "--cache-dir", str(tmp_path / "cache"),
        "--top-k", "5", "--quiet"])
    comparisons = {r["comparison"] for r in result["rows"]}
    assert comparisons == {f"models: {tiny_folder} vs {gemma}", "data: halves", "data: facts vs stories"}
    for r in result["rows"]:
        assert r["rho"] is None or (-1 <= r["rho"] <= 1 and 0 < r["p_value"] <= 1), r
    # The cross-model number, recomputed from the two saved expert sets.
    sets = [ExpertSet.from_pretrained(out / "models" / Path(m).name) for m in (tiny_folder, gemma)]
    upper = []
    for es in sets:
        ap = es.expertise.ap - es.expertise.ap.mean(axis=0)
        unit = ap / np.linalg.norm(ap, axis=1, keepdims=True)
        upper.append((unit @ unit.T)[np.triu_indices(len(es.concepts), k=1)])
    row = next(r for r in result["rows"] if r["comparison"].startswith("models") and r["method"] == "ap cosine centred")
    assert row["rho"] == pytest.approx(spearmanr(*upper).statistic)
    overlaps = []
    for es in sets:  # top-5 Jaccard from Python sets of unit indices
        tops = [set(np.argsort(-ap, kind="stable")[:5].tolist()) for ap in es.expertise.ap]
        overlaps.append([len(tops[i] & tops[j]) / len(tops[i] | tops[j])
                         for i in range(len(tops)) for j in range(i + 1, len(tops))])
    row = next(r for r in result["rows"] if r["comparison"].startswith("models") and r["method"] == "jaccard top k=5")
    assert row["rho"] == pytest.approx(spearmanr(*overlaps).statistic)
    assert result["split_sizes"]["halves 0"]["positives_median"] == 3
    assert result["split_sizes"]["facts vs stories 1"]["positives_median"] == 3
    # Every concept of the fixture has the same positives, so there is no count for a similarity to track.
    assert all(len(set(es.expertise.n_positives.tolist())) == 1 for es in sets)
    assert result["positive_count_confound"] == {str(tiny_folder): None, str(gemma): None}
    assert "every concept has the same number of positives" in (out / "report.md").read_text()
    assert list(result["wall"]["stages"]) == [f"discover {tiny_folder}", f"discover {gemma}", "data splits"]
    assert "wall time of this run" in (out / "report.md").read_text()


def test_alignment_min_positives_leaves_concepts_out(alignment):
    _, _, args = alignment
    with pytest.raises(InvalidArgumentError, match="Only 0 rated pairs"):
        recipe("human_alignment").main([*args, "--min-positives", str(len(TEMPLATES) + 1)])


def test_alignment_chooses_on_dev_and_reports_on_test(alignment, words):
    """The dev and test pairs split the rated pairs; the chosen expert method has the best dev rho among the
    methods defined on enough dev pairs; every test rho is scipy's Spearman on the test pairs alone; the
    verdict compares the chosen method with each baseline family's best dev variant."""
    from scipy.stats import spearmanr

    from steer_experts.lens.ratings import load_men
    from steer_experts.lens.similarity import SimilarityMatrix

    out, result, _ = alignment
    protocol = result["dev_test"]
    ratings = load_men(MEN_FILE)
    rated = ratings.subset(ratings.pairs_within(words))
    dev, test = rated.split(0.5, seed=0)
    assert (protocol["dev_pairs"], protocol["test_pairs"]) == (len(dev), len(test))
    assert len(dev) + len(test) == len(rated) and len(test) >= 5
    index = json.loads((out / "similarity" / "index.json").read_text())
    saved = {m: SimilarityMatrix.from_csv(out / "similarity" / f) for f, m in index.items()}

    def rho(method, part):
        sim = saved[method]
        x = np.array([sim.pair(a, b) for a, b in zip(part.word1, part.word2)])
        keep = ~np.isnan(x)
        return spearmanr(x[keep], part.scores[keep]).statistic if keep.sum() >= 3 else None, int(keep.sum())

    on_test = {r["method"]: r for r in protocol["test"]}
    eligible = []
    for method, row in on_test.items():
        if method not in saved or row["family"] == "baseline":
            continue
        dev_rho, dev_n = rho(method, dev)
        assert row["dev_rho"] == pytest.approx(dev_rho, abs=1e-6) if dev_rho is not None else row["dev_rho"] is None
        test_rho, test_n = rho(method, test)
        assert row["n_pairs"] == test_n
        if test_rho is not None and not np.isnan(test_rho):
            assert row["rho"] == pytest.approx(test_rho, abs=1e-6), method
        if dev_rho is not None and not np.isnan(dev_rho) and dev_n >= 0.95 * len(dev):
            eligible.append((dev_rho, method))
    assert protocol["chosen"] == max(eligible)[1]
    assert protocol["chosen_dev_rho"] == pytest.approx(max(eligible)[0], abs=1e-6)
    assert set(protocol["chosen_baselines"]) == {"static", "contextual", "minilm word", "minilm sentences"}
    contextual = [r for m, r in on_test.items() if m.startswith("contextual L")]
    assert protocol["chosen_baselines"]["contextual"]["method"] == max(contextual, key=lambda r: r["dev_rho"])["method"]
    assert [d["baseline"] for d in protocol["verdict"]["differences"]] == \
        [b["method"] for b in protocol["chosen_baselines"].values()]
    assert "## Chosen on dev, reported on test" in (out / "report.md").read_text()


def test_alignment_curve_recomputes_the_chosen_methods_from_fewer_positives(alignment):
    """At every positive the curve's rho equals the test rho of the full run; with fewer it is recomputed
    from that many positives per concept."""
    out, result, _ = alignment
    protocol, curve = result["dev_test"], result["curve"]
    assert [p["cap"] for p in curve] == [2, 4, len(TEMPLATES)]
    assert [p["positives_median"] for p in curve] == [2, 4, len(TEMPLATES)]
    best_two = sorted(protocol["chosen_baselines"].values(), key=lambda b: -b["dev_rho"])[:2]
    assert curve[0]["methods"] == [protocol["chosen"], *(b["method"] for b in best_two)]
    on_test = {r["method"]: r for r in protocol["test"]}
    for method in curve[0]["methods"]:
        assert curve[-1]["rho"][method]["rho"] == pytest.approx(on_test[method]["rho"], abs=1e-9), method
    assert any(curve[0]["rho"][m]["rho"] != curve[-1]["rho"][m]["rho"] for m in curve[0]["methods"])
    assert (out / "curve.png").stat().st_size > 0 and len(list((out / "curve").glob("*.json"))) == 3


def test_a_method_undefined_on_most_dev_pairs_is_not_chosen():
    """A Jaccard defined on a fifth of the pairs, perfect there, loses to a method defined on all of them."""
    from argparse import Namespace

    from steer_experts.lens.ratings import WordPairRatings
    from steer_experts.lens.similarity import SimilarityMatrix

    rng = np.random.default_rng(0)
    names = [f"w{i}" for i in range(12)]
    i, j = np.triu_indices(len(names), k=1)
    scores = rng.uniform(0, 50, size=len(i))
    rated = WordPairRatings([names[a] for a in i], [names[b] for b in j], scores)

    def matrix(values, method):
        full = np.full((len(names), len(names)), np.nan)
        full[i, j] = full[j, i] = values
        return SimilarityMatrix(names, full, method)

    sparse = np.where(rng.random(len(i)) < 0.2, scores, np.nan)
    matrices = {"jaccard tau=0.9": matrix(sparse, "jaccard tau=0.9"),
                "ap cosine centred": matrix(scores + rng.normal(0, 15, len(i)), "ap cosine centred")}
    for key in ("static", "contextual L0", "contextual L1", "minilm word", "minilm sentences"):
        matrices[key] = matrix(rng.normal(size=len(i)), key)
    rows = [{"method": m, "family": "jaccard" if m.startswith("jaccard") else
             "ap cosine" if m.startswith("ap") else "baseline", "rho": 0.0} for m in matrices]
    protocol = recipe("human_alignment").dev_test(rows, matrices, rated, Namespace(dev_fraction=0.5, seed=0, n_boot=50))
    on_test = {r["method"]: r for r in protocol["test"]}
    assert on_test["jaccard tau=0.9"]["dev_rho"] == pytest.approx(1.0)  # the best dev rho, on few pairs
    assert protocol["chosen"] == "ap cosine centred"


def test_alignment_takes_any_rating_file(alignment, words, tmp_path):
    """A TSV of the same pairs with named columns, in another order and with the scores negated, gives
    every method the opposite rho."""
    out, result, _ = alignment
    rows = [(a, b, s) for a, b, s in men_rows() if a in words and b in words]
    tsv = tmp_path / "ratings.tsv"
    tsv.write_text("score\tfirst\tsecond\n" + "".join(f"{-s}\t{a.upper()}\t{b}\n" for a, b, s in rows))
    negated = recipe("human_alignment").main([
        "--out", str(tmp_path / "out"), "--experts", str(out / "experts"), "--no-baselines", "--curve", "",
        "--ratings", str(tsv), "--ratings-columns", "first,second,score", "--ceiling", "0.84",
        "--n-boot", "50", "--quiet"])
    assert negated["pairs_available"] == result["pairs_available"] == len(rows)
    before = {r["method"]: r["rho"] for r in result["rows"]}
    compared = 0
    for r in negated["rows"]:
        if r["rho"] is not None:
            assert r["rho"] == pytest.approx(-before[r["method"]], abs=1e-12), r["method"]
            compared += 1
    assert compared >= 10
