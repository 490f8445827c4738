"""ExpertSet: selection, controls, values, queries, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest

from steer_experts.expertise import Expertise
from steer_experts.experts import ExpertSet, ModelMismatchError
from steer_experts.units import UnitSite

SITES = [UnitSite(0, "model.layers.0.mlp.down_proj", 6), UnitSite(1, "model.layers.1.mlp.down_proj", 6),
         UnitSite(2, "model.layers.2.mlp.down_proj", 4)]


def synthetic_expert_set(seed: int = 0, fingerprint: str = "f" * 32) -> ExpertSet:
    """Three concepts over 16 units with random statistics and a few exact AP ties."""
    rng = np.random.default_rng(seed)
    c, u = 3, sum(s.width for s in SITES)
    ap = rng.uniform(0, 1, (c, u))
    ap[0, [3, 9]] = 0.75  # a tie, broken by unit index
    stats = {"ap": ap, "auroc": rng.uniform(0, 1, (c, u))}
    stats |= {k: rng.normal(size=(c, u)).astype(np.float32) for k in ("on_p50", "on_mean", "on_p90", "off_mean")}
    expertise = Expertise(["football-1_04_00__", "music", "ocean"], **stats,
                          n_positives=np.array([10, 20, 30]), n_negatives=np.array([40, 50, 60]))
    return ExpertSet(expertise, SITES, "tiny", fingerprint, metadata={"pooling": "max"})


@pytest.fixture
def es():
    return synthetic_expert_set()


def test_unit_map(es):
    assert es.layer.tolist() == [0] * 6 + [1] * 6 + [2] * 4
    assert es.neuron.tolist() == list(range(6)) * 2 + list(range(4))
    assert es.unit_index(2, 3) == 15
    with pytest.raises(IndexError):
        es.unit_index(2, 4)


def test_top_k_is_global_across_layers(es):
    ap = es.expertise.ap[0]
    sel = es.select("football", k=5)
    expected = sorted(range(16), key=lambda u: (-ap[u], u))[:5]
    assert sel.units.tolist() == expected
    assert np.array_equal(sel.ap, ap[expected]) and np.all(np.diff(sel.ap) <= 0)
    assert (sel.layer.tolist(), sel.neuron.tolist()) == ([u // 6 if u < 12 else 2 for u in expected],
                                                         [u % 6 if u < 12 else u - 12 for u in expected])


def test_tie_broken_by_unit_index(es):
    order = es.select("football", k=16).units.tolist()
    assert order.index(3) < order.index(9)


def test_tau_keeps_every_unit_above(es):
    ap = es.expertise.ap[1]
    sel = es.select("music", tau=0.6)
    assert set(sel.units.tolist()) == {u for u in range(16) if ap[u] > 0.6}


def test_per_layer(es):
    ap = es.expertise.ap[2]
    sel = es.select("ocean", per_layer=2)
    for layer, (lo, hi) in enumerate([(0, 6), (6, 12), (12, 16)]):
        best = sorted(range(lo, hi), key=lambda u: -ap[u])[:2]
        assert set(sel.units[sel.layer == layer].tolist()) == set(best)


def test_controls_are_seeded_and_sized(es):
    ap = es.expertise.ap[0]
    r1, r2 = es.select("football", k=4, control="random", seed=3), es.select("football", k=4, control="random", seed=3)
    assert r1.units.tolist() == r2.units.tolist() and len(set(r1.units.tolist())) == 4
    assert r1.units.tolist() != es.select("football", k=4, control="random", seed=4).units.tolist()
    low = es.select("football", k=3, control="lowest")
    assert set(low.units.tolist()) == set(np.argsort(ap)[:3].tolist())


def test_values(es):
    sel = es.select("music", k=3)
    c = es.concept_index("music")
    for stat in ("on_p50", "on_mean", "on_p90", "off_mean"):
        assert np.array_equal(sel.values(stat), getattr(es.expertise, stat)[c, sel.units])
    assert not sel.values("zero").any()
    with pytest.raises(ValueError, match="Unknown value statistic"):
        sel.values("max")


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of"),
    ({"k": 3, "tau": 0.5}, "exactly one of"),
    ({"k": 17}, r"k must be an integer in \[0, 16\]"),
    ({"k": -1}, "k must be"),
    ({"tau": float("nan")}, "tau must be"),
    ({"tau": 1.0}, "tau must be"),
    ({"per_layer": 0}, "per_layer must be"),
    ({"tau": 0.5, "control": "random"}, "pass k"),
    ({"k": 2, "control": "median"}, "Unknown control"),
])
def test_bad_selection(es, kwargs, message):
    with pytest.raises(ValueError, match=message):
        es.select("football", **kwargs)


def test_unknown_concept_lists_known(es):
    with pytest.raises(KeyError, match="music"):
        es.select("cat", k=1)


def test_label_is_the_inverse_query(es):
    ap = es.expertise.ap
    for u in range(16):
        layer, neuron = int(es.layer[u]), int(es.neuron[u])
        expected = [es.concepts[c] for c in np.argsort(-ap[:, u]) if ap[c, u] > 0.5]
        assert [name for name, _ in es.label(layer, neuron, tau=0.5)] == expected
        for name, score in es.label(layer, neuron, tau=0.5):
            assert u in es.select(name, tau=0.5).units


def test_summary_mentions_top_experts_and_counts(es):
    text = es.summary(top=3)
    best = es.experts_of("music", 1)[0]
    assert f"{best['ap']:.4f}" in text
    assert f"0.5: {int((es.expertise.ap[1] > 0.5).sum())}" in text


def test_save_load_roundtrip(es, tmp_path):
    es.save_pretrained(tmp_path)
    loaded = ExpertSet.from_pretrained(tmp_path)
    for stat in Expertise.STATS:
        assert np.array_equal(getattr(loaded.expertise, stat), getattr(es.expertise, stat))
    assert loaded.sites == es.sites and loaded.concepts == es.concepts
    assert loaded.model_fingerprint == es.model_fingerprint and loaded.metadata == es.metadata
    assert not list(tmp_path.glob(".*tmp"))


class _Model:
    name, fingerprint = "other", "0" * 32


def test_loading_against_another_model_fails(es, tmp_path):
    es.save_pretrained(tmp_path)
    with pytest.raises(ModelMismatchError, match="Run discovery on this model"):
        ExpertSet.from_pretrained(tmp_path, model=_Model())


@pytest.mark.parametrize("damage", ["truncate_weights", "bad_json", "wrong_shape", "missing_file"])
def test_corrupt_folder_is_a_clear_error(es, tmp_path, damage):
    es.save_pretrained(tmp_path)
    if damage == "truncate_weights":
        data = (tmp_path / "expert_set.safetensors").read_bytes()
        (tmp_path / "expert_set.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "bad_json":
        (tmp_path / "expert_set.json").write_text("{")
    elif damage == "wrong_shape":
        config = json.loads((tmp_path / "expert_set.json").read_text())
        config["sites"][0]["width"] = 7
        (tmp_path / "expert_set.json").write_text(json.dumps(config))
    else:
        (tmp_path / "expert_set.json").unlink()
    with pytest.raises((ValueError, FileNotFoundError), match="expert set"):
        ExpertSet.from_pretrained(tmp_path)


def test_hub_id_offline_is_a_clear_error():
    from steer_experts.hub import HubUnavailableError

    with pytest.raises(HubUnavailableError, match="HF_HUB_OFFLINE"):
        ExpertSet.from_pretrained("someone/football-experts")


def test_push_offline_is_a_clear_error(es):
    from steer_experts.hub import HubUnavailableError

    with pytest.raises(HubUnavailableError, match="nothing can be pushed"):
        es.push_to_hub("someone/football-experts")


# ----------------------------------------------------------------------------- discover's options


def test_discover_honours_pooling_length_negatives_and_seed_and_records_them(tiny_bos_model, tmp_path):
    """discover(pooling="mean", max_length=6, n_negatives=7, seed=3) scores each concept's units as sklearn
    does on responses pooled by a plain hook (mean over the first 6 tokens, BOS left out) of its positives
    and of the 7 negatives that seed samples; the metadata records those settings and the truncation."""
    from sklearn.metrics import average_precision_score

    from steer_experts.concepts import ConceptSet
    from steer_experts.discovery import discover

    from ..helpers import EXAMPLES
    from .test_responses import _reference

    concepts = ConceptSet.load(EXAMPLES).subset(["football", "music"])
    found = discover(tiny_bos_model, concepts, pooling="mean", max_length=6, n_negatives=7, seed=3,
                     cache_dir=tmp_path, progress=False)
    sampled = concepts.with_sampled_negatives(7, 3)
    assert sampled.concepts[0].negatives != concepts.with_sampled_negatives(7, 0).concepts[0].negatives
    sentences = sampled.sentences
    responses = _reference(tiny_bos_model, sentences, "mean", max_length=6)
    row = {s: i for i, s in enumerate(sentences)}
    for c, concept in enumerate(sampled.concepts):
        assert len(concept.negatives) == 7 == found.expertise.n_negatives[c]
        rows = [row[s] for s in concept.positives + concept.negatives]
        labels = np.r_[np.ones(len(concept.positives)), np.zeros(len(concept.negatives))]
        want = [average_precision_score(labels, responses[rows, u]) for u in range(responses.shape[1])]
        np.testing.assert_allclose(found.expertise.ap[c], want, atol=1e-5)
    lengths = [len(ids) for ids in tiny_bos_model.tokenizer(sentences)["input_ids"]]
    assert found.metadata["pooling"] == "mean" and found.metadata["max_length"] == 6
    assert found.metadata["negative_sampling_seed"] == 3
    assert found.metadata["n_sentences"] == len(sentences)
    assert found.metadata["truncated_sentences"] == sum(n > 6 for n in lengths) > 0


def test_from_responses_scores_with_as_many_threads_as_torch(tiny_bos_model, monkeypatch):
    """ExpertSet.from_responses gives compute_expertise torch's thread count, so that `--threads` and
    OMP_NUM_THREADS bound the scoring too, and the result does not depend on it."""
    import torch

    from steer_experts import experts
    from steer_experts.concepts import ConceptRows
    from steer_experts.expertise import compute_expertise
    from steer_experts.units import locate_units

    handed = []

    def recording(*args, threads=None, **kwargs):
        handed.append(threads)
        return compute_expertise(*args, threads=threads, **kwargs)

    monkeypatch.setattr(experts, "compute_expertise", recording)
    n_units = sum(site.width for site in locate_units(tiny_bos_model.model, "mlp"))
    x = np.random.default_rng(0).normal(size=(12, n_units)).astype(np.float32)
    concepts = ConceptRows(["c"], [np.arange(5)], [np.arange(5, 12)])
    before = torch.get_num_threads()
    try:
        found = []
        for n in (1, 3):
            torch.set_num_threads(n)
            found.append(ExpertSet.from_responses(x, concepts, tiny_bos_model, progress=False))
    finally:
        torch.set_num_threads(before)
    assert handed == [1, 3]
    np.testing.assert_array_equal(found[0].expertise.ap, found[1].expertise.ap)


def test_from_responses_scores_on_the_models_gpu_and_with_numpy_beside_a_cpu_model(tiny_bos_model, monkeypatch):
    """A model on a GPU has its expertise scored on that GPU (compute_expertise's torch path); a model on
    the CPU with numpy (device None)."""
    import torch

    from steer_experts import experts
    from steer_experts.concepts import ConceptRows
    from steer_experts.expertise import scoring_device
    from steer_experts.models import LoadedModel
    from steer_experts.units import locate_units

    handed = []
    monkeypatch.setattr(experts, "compute_expertise", lambda *a, device=None, **k: handed.append(device) or 1 / 0)
    n_units = sum(site.width for site in locate_units(tiny_bos_model.model, "mlp"))
    x = np.zeros((4, n_units), np.float32)
    concepts = ConceptRows(["c"], [np.arange(2)], [np.arange(2, 4)])
    for device in ("cpu", "cuda:1"):
        monkeypatch.setattr(LoadedModel, "device", property(lambda self: torch.device(device)))
        with pytest.raises(ZeroDivisionError):
            ExpertSet.from_responses(x, concepts, tiny_bos_model, progress=False)
    assert handed == [None, torch.device("cuda:1")]
    assert scoring_device(torch.device("mps")) is None and scoring_device(torch.device("cuda")) == torch.device("cuda")
