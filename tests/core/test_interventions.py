"""ExpertIntervention: the true neuron takes the intended value at every position.

The check reads the down projection's input by overriding module ``forward``
methods (pyvene wipes every hook, so hooks cannot observe it) and compares it
with an independent recomputation of the unsteered neuron from the MLP input:
act(gate(x)) * up(x) for gated MLPs, act(fc(x)) for gpt2 / gpt_neox.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch

from steer_experts.expertise import Expertise
from steer_experts.experts import ExpertSet
from steer_experts.interventions import ExpertIntervention, build_intervenable, pyvene_call
from steer_experts.models import LoadedModel
from steer_experts.units import locate_units
from steer_experts.steering import steer


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    """One tiny random llama, for the tests where the architecture does not matter."""
    from transformers import AutoModelForCausalLM

    from ..conftest import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer)), dtype=torch.float32).eval()
    return LoadedModel.from_hf(model, tokenizer, name="tiny-llama")


def synthetic_experts(loaded, concepts=("football", "woman"), seed=0) -> ExpertSet:
    """An ExpertSet for ``loaded`` with random AP/AUROC in [0, 1] and activation statistics ~ N(2, 1)."""
    sites = locate_units(loaded.model, "mlp")
    n_units = sum(s.width for s in sites)
    rng = np.random.default_rng(seed)
    stats = {s: rng.random((len(concepts), n_units)) for s in ("ap", "auroc")}
    stats.update({s: rng.normal(2.0, 1.0, (len(concepts), n_units)).astype(np.float32)
                  for s in ("on_p50", "on_mean", "on_p90", "off_mean")})
    n = len(concepts)
    expertise = Expertise(list(concepts), **stats, n_positives=np.full(n, 50), n_negatives=np.full(n, 100))
    return ExpertSet(expertise, sites, loaded.name, loaded.fingerprint)


def _mlp_parts(mlp: torch.nn.Module):
    """(down projection, function recomputing the unsteered neuron from the MLP input)."""
    if hasattr(mlp, "down_proj"):  # llama, qwen2, gemma3
        return mlp.down_proj, lambda x: mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    if hasattr(mlp, "c_proj"):  # gpt2
        return mlp.c_proj, lambda x: mlp.act(mlp.c_fc(x))
    return mlp.dense_4h_to_h, lambda x: mlp.act(mlp.dense_h_to_4h(x))  # gpt_neox


class NeuronRecorder:
    """Per layer and call: the unsteered neuron (recomputed) and the down projection's actual input.

    It overrides instance ``forward`` methods rather than registering hooks, and
    restores them on ``close``.
    """

    def __init__(self, model: torch.nn.Module):
        self.unsteered = defaultdict(list)
        self.actual = defaultdict(list)
        self._restore = []
        for site in locate_units(model, "mlp"):
            down = model.get_submodule(site.module_path)
            mlp = model.get_submodule(site.module_path.rsplit(".", 1)[0])
            assert _mlp_parts(mlp)[0] is down
            self._wrap(mlp, self._record_mlp(site.layer, _mlp_parts(mlp)[1]))
            self._wrap(down, self._record_down(site.layer))

    def _wrap(self, module, make):
        original = module.forward
        module.forward = make(original)
        self._restore.append(module)

    def _record_mlp(self, layer, neuron_of):
        def make(original):
            def forward(x, *args, **kwargs):
                with torch.no_grad():
                    self.unsteered[layer].append(neuron_of(x).detach().clone())
                return original(x, *args, **kwargs)
            return forward
        return make

    def _record_down(self, layer):
        def make(original):
            def forward(x, *args, **kwargs):
                self.actual[layer].append(x.detach().clone())
                return original(x, *args, **kwargs)
            return forward
        return make

    def close(self):
        for module in self._restore:
            del module.forward  # drop the instance attribute: the class method is back


@pytest.fixture
def recorder_for():
    made = []

    def make(model):
        made.append(NeuronRecorder(model))
        return made[-1]

    yield make
    for r in made:
        r.close()


def expected_neurons(unsteered: torch.Tensor, layer: int, experts: ExpertSet, selection, weight, target):
    """The neuron tensor after steering, computed in float64: z + w (v - z) at the selected units of ``layer``."""
    out = unsteered.double().clone()
    rows = selection.layer == layer
    idx = torch.as_tensor(selection.neuron[rows])
    w = torch.as_tensor(np.asarray(weight)[rows], dtype=torch.float64)
    v = torch.as_tensor(np.asarray(target)[rows], dtype=torch.float64)
    out[..., idx] = out[..., idx] + w * (v - out[..., idx])
    return out


def prompt_ids(loaded, batch=2, length=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, loaded.model.config.vocab_size, (batch, length), generator=g)


# ----------------------------------------------------------------------------- every position, every arch


def _check_all_positions_set(loaded, recorder_for, k, new_tokens=4):
    experts = synthetic_experts(loaded)
    selection = experts.select("football", k=k)
    target = selection.values("on_p50")
    steered = steer(loaded, experts, "football", k=k)
    ids = prompt_ids(loaded)
    recorder = recorder_for(loaded.model)
    out = steered.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    assert out.shape == (ids.shape[0], ids.shape[1] + new_tokens)
    layers = sorted(set(selection.layer.tolist()))
    assert layers, "the selection should touch at least one layer"
    for site in experts.sites:
        actual, unsteered = recorder.actual[site.layer], recorder.unsteered[site.layer]
        # one call on the prompt, then one per new token under the KV cache (the last token is not fed back)
        assert [a.shape[1] for a in actual] == [ids.shape[1]] + [1] * (new_tokens - 1)
        rows = selection.layer == site.layer
        idx = torch.as_tensor(selection.neuron[rows])
        others = torch.ones(site.width, dtype=torch.bool)
        others[idx] = False
        for a, u in zip(actual, unsteered):
            # experts hold exactly their target at every position; other units are untouched
            assert torch.equal(a[..., idx], torch.as_tensor(target[rows]).expand_as(a[..., idx]))
            assert torch.equal(a[..., others], u[..., others])
    return steered


def test_set_every_position_every_arch(tiny_model, recorder_for):
    _check_all_positions_set(tiny_model, recorder_for, k=12)


@pytest.mark.integration
def test_set_every_position_real_smollm2(smollm2, recorder_for):
    steered = _check_all_positions_set(smollm2, recorder_for, k=200, new_tokens=3)
    assert len(set(steered.plan.layer.tolist())) > 10  # spread over many of the 30 layers


# ----------------------------------------------------------------------------- modes


@pytest.mark.parametrize("mode, alpha, value", [
    ("set", 0.5, "on_mean"), ("set", 2.0, "on_p90"), ("dampen", 1.0, None), ("dampen", 0.5, None),
    ("ablate", 1.0, "zero"), ("ablate", 1.0, "off_mean"), ("ablate", 0.25, "zero"),
])
def test_modes_match_their_formulas(tiny_llama, recorder_for, mode, alpha, value):
    experts = synthetic_experts(tiny_llama)
    selection = experts.select("football", k=15)
    if mode == "set":  # z + alpha (v - z)
        weight, target = np.full(len(selection), alpha), getattr(selection, value)
    elif mode == "dampen":  # AurA: z * (1 - alpha * 2 (AUROC - 0.5)) where AUROC > 0.5
        factor = np.where(selection.auroc > 0.5, 1 - alpha * (2 * selection.auroc - 1), 1.0)
        weight, target = 1 - factor, np.zeros(len(selection))
    else:  # z * (1 - alpha) + alpha * (0 or off_mean)
        weight = np.full(len(selection), alpha)
        target = np.zeros(len(selection)) if value == "zero" else selection.off_mean
    steered = steer(tiny_llama, experts, "football", k=15, alpha=alpha, mode=mode, value=value)
    recorder = recorder_for(tiny_llama.model)
    steered.generate(prompt_ids(tiny_llama), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    for site in experts.sites:
        for a, u in zip(recorder.actual[site.layer], recorder.unsteered[site.layer]):
            want = expected_neurons(u, site.layer, experts, selection, weight, target)
            torch.testing.assert_close(a.double(), want, rtol=1e-5, atol=1e-6)
    if mode == "dampen":
        assert (selection.auroc <= 0.5).any() and (selection.auroc > 0.5).any()  # both branches exercised


# ----------------------------------------------------------------------------- positions


@pytest.mark.parametrize("positions, steered_calls", [("all", [0, 1, 2, 3, 4]), ("prompt", [0]), ("generated", [1, 2, 3, 4])])
def test_positions(tiny_model, recorder_for, positions, steered_calls):
    experts = synthetic_experts(tiny_model)
    selection = experts.select("football", k=20)
    steered = steer(tiny_model, experts, "football", k=20, positions=positions)
    recorder = recorder_for(tiny_model.model)
    steered.generate(prompt_ids(tiny_model), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    for site in experts.sites:
        rows = selection.layer == site.layer
        if not rows.any():
            continue
        idx = torch.as_tensor(selection.neuron[rows])
        target = torch.as_tensor(selection.on_p50[rows])
        calls = list(zip(recorder.actual[site.layer], recorder.unsteered[site.layer]))
        assert len(calls) == 5
        for i, (a, u) in enumerate(calls):
            if i in steered_calls:
                assert torch.equal(a[..., idx], target.expand_as(a[..., idx])), (positions, i)
            else:
                assert torch.equal(a, u), (positions, i)


def test_use_cache_off_needs_all_positions(tiny_llama):
    steered = steer(tiny_llama, synthetic_experts(tiny_llama), "football", k=5)
    with pytest.raises(ValueError, match="KV cache"):
        steered.generate(prompt_ids(tiny_llama), positions="prompt", max_new_tokens=2, use_cache=False)


# ----------------------------------------------------------------------------- several concepts


def _two_concept_set(loaded):
    """Concepts A and B whose top-3 experts share units: B's AP is higher on one, equal on another."""
    experts = synthetic_experts(loaded, concepts=("alpha", "beta"))
    ap = experts.expertise.ap
    ap[:] = 0.1
    ap[0, [1, 2, 3]] = [0.99, 0.98, 0.97]  # alpha's experts
    ap[1, [3, 4, 2]] = [0.995, 0.96, 0.98]  # beta's: unit 3 with higher AP than alpha, unit 2 tied
    return experts


def test_contested_unit_goes_to_higher_ap(tiny_llama, recorder_for):
    experts = _two_concept_set(tiny_llama)
    stats = experts.expertise
    steered = steer(tiny_llama, experts, {"alpha": 1.0, "beta": -1.0}, k=3, suppress="ablate")
    plan = steered.plan
    assert plan.contested == 2
    assert plan.neuron.tolist() == [1, 2, 3, 4] and set(plan.layer.tolist()) == {0}
    owner = dict(zip(plan.neuron.tolist(), plan.concept.tolist()))
    assert owner == {1: 0, 2: 0, 3: 1, 4: 1}  # 3: beta's higher AP; 2: a tie, alpha is named first
    recorder = recorder_for(tiny_llama.model)
    steered.generate(prompt_ids(tiny_llama), max_new_tokens=2, min_new_tokens=2, do_sample=False)
    for a in recorder.actual[0]:
        assert torch.equal(a[..., 1], torch.full_like(a[..., 1], float(stats.on_p50[0, 1])))
        assert torch.equal(a[..., 2], torch.full_like(a[..., 2], float(stats.on_p50[0, 2])))
        assert torch.equal(a[..., 3], torch.zeros_like(a[..., 3]))  # beta suppressed by ablation
        assert torch.equal(a[..., 4], torch.zeros_like(a[..., 4]))


def test_order_breaks_ties_only(tiny_llama):
    experts = _two_concept_set(tiny_llama)
    plan = steer(tiny_llama, experts, {"beta": -1.0, "alpha": 1.0}, k=3).plan
    owner = dict(zip(plan.neuron.tolist(), [plan.concepts[c] for c in plan.concept]))
    assert owner == {1: "alpha", 2: "beta", 3: "beta", 4: "beta"}


# ----------------------------------------------------------------------------- pyvene round trip and side effects


def _interventions(loaded, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for site in locate_units(loaded.model, "mlp"):
        neurons = rng.choice(site.width, 5, replace=False)
        out[site] = ExpertIntervention.from_units(site.width, neurons, rng.random(5) * 2, rng.normal(size=5))
    return out


def test_pyvene_save_load_round_trips_state(tiny_model, tmp_path):
    import pyvene

    interventions = _interventions(tiny_model)
    intervenable = build_intervenable(tiny_model.model, interventions)
    intervenable.save(str(tmp_path))
    flags = [p.requires_grad for p in tiny_model.model.parameters()]
    with pyvene_call(tiny_model.model):
        loaded = pyvene.IntervenableModel.load(str(tmp_path), tiny_model.model)
    for p, flag in zip(tiny_model.model.parameters(), flags):  # pyvene's load turns gradients off
        p.requires_grad_(flag)
    assert len(loaded.interventions) == len(interventions)
    for (site, original), (key, reloaded) in zip(interventions.items(), loaded.interventions.items()):
        assert type(reloaded) is ExpertIntervention
        assert key.startswith(f"comp_{site.pyvene_component.replace('.', '_')}")
        assert torch.equal(reloaded.source_representation, original.source_representation)


def test_building_restores_gradients_train_mode_and_hooks(tiny_model):
    model = tiny_model.model
    flags = [p.requires_grad for p in model.parameters()]
    seen = []
    handle = model.get_submodule(locate_units(model)[0].module_path).register_forward_hook(
        lambda *_: seen.append(1))
    try:
        model(prompt_ids(tiny_model), output_hidden_states=True)  # transformers installs its capture hooks
        model.train()
        list(model.parameters())[0].requires_grad_(False)
        expected = [p.requires_grad for p in model.parameters()]
        steered = steer(tiny_model, synthetic_experts(tiny_model), "football", k=5)
        assert [p.requires_grad for p in model.parameters()] == expected
        assert model.training
        model.eval()
        steered.generate(prompt_ids(tiny_model), max_new_tokens=2, do_sample=False)
        seen.clear()
        ids = prompt_ids(tiny_model)
        out = model(ids, output_hidden_states=True)  # pyvene wiped hooks during the call; they are back
        assert seen == [1]
        assert out.hidden_states is not None and len(out.hidden_states) == model.config.num_hidden_layers + 1
        inside = steered(input_ids=ids, output_hidden_states=True)  # also inside a steered call
        assert inside.hidden_states is not None and len(inside.hidden_states) == len(out.hidden_states)
    finally:
        handle.remove()
        model.eval()
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def test_gemma3_loads_without_a_pyvene_mapping():
    import pyvene
    from pyvene.models import modeling_utils

    class Unmapped(torch.nn.Module):
        pass

    assert modeling_utils.type_to_dimension_mapping[Unmapped] == {}
    pyvene.type_to_dimension_mapping[Unmapped] = {"x": ("1",)}  # later registrations are still seen
    try:
        assert modeling_utils.type_to_dimension_mapping[Unmapped] == {"x": ("1",)}
    finally:
        del pyvene.type_to_dimension_mapping[Unmapped]


# ----------------------------------------------------------------------------- clamping


@pytest.mark.parametrize("strength", [1.0, -1.0])
def test_clamp_never_moves_a_unit_the_wrong_way(tiny_model, recorder_for, strength):
    """Clamp-up (toward) never lowers a unit and clamp-down (suppress) never raises one; each unit
    ends exactly at max(z, on_p50) / min(z, off_mean), checked on recorded activations."""
    experts = synthetic_experts(tiny_model)
    # values inside the tiny models' activation range, so that both sides of the clamp occur
    experts.expertise.on_p50[:] = experts.expertise.off_mean[:] = 0.01
    selection = experts.select("football", k=20)
    value = selection.values("on_p50" if strength > 0 else "off_mean")
    steered = steer(tiny_model, experts, {"football": strength}, k=20, mode="clamp", suppress="clamp")
    assert set(steered.plan.bound.tolist()) == {np.sign(strength)}
    recorder = recorder_for(tiny_model.model)
    steered.generate(prompt_ids(tiny_model), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    moved = kept = 0
    for site in experts.sites:
        rows = selection.layer == site.layer
        idx = torch.as_tensor(selection.neuron[rows])
        v = torch.as_tensor(value[rows])
        for actual, unsteered in zip(recorder.actual[site.layer], recorder.unsteered[site.layer]):
            z, got = unsteered[..., idx], actual[..., idx]
            want = torch.maximum(z, v) if strength > 0 else torch.minimum(z, v)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert bool(((got >= z - 1e-6) if strength > 0 else (got <= z + 1e-6)).all())
            moved += int((got - z).abs().gt(1e-4).sum())
            kept += int((got - z).abs().le(1e-6).sum())
    assert moved > 0 and kept > 0, "the clamp should move some units and leave others, or the test proves nothing"


def test_layers_and_scores_choose_the_candidates(tiny_llama):
    experts = synthetic_experts(tiny_llama)
    late = experts.select("football", k=5, layers=[1])
    assert set(late.layer.tolist()) == {1}
    c = experts.concept_index("football")
    in_layer_1 = np.flatnonzero(experts.layer == 1)
    want = in_layer_1[np.argsort(-experts.expertise.ap[c, in_layer_1], kind="stable")[:5]]
    assert np.array_equal(late.units, want)
    scores = np.random.default_rng(1).random(experts.n_units)
    by_score = experts.select("football", k=7, scores=scores)
    assert np.array_equal(by_score.units, np.argsort(-scores, kind="stable")[:7])
    assert np.array_equal(by_score.ap, experts.expertise.ap[c, by_score.units])
    random_late = experts.select("football", k=5, layers=[0], control="random", seed=3)
    assert set(random_late.layer.tolist()) == {0}
    with pytest.raises(ValueError, match="do not exist"):
        experts.select("football", k=5, layers=[9])
    with pytest.raises(ValueError, match="one per unit"):
        experts.select("football", k=5, scores=scores[:-1])
    steered = steer(tiny_llama, experts, "football", k=7, scores=scores)
    assert steered.spec.rank == "scores"
    assert set(zip(steered.plan.layer.tolist(), steered.plan.neuron.tolist())) == \
        set(zip(by_score.layer.tolist(), by_score.neuron.tolist()))


def test_every_bound_matches_its_formula_alone_and_mixed():
    """Each bound alone (one elementwise op) and all mixed in one layer (the where chain) give
    z + w (t - z) with t = v, max(z, v), min(z, v), z + v; units of weight 0 stay exactly."""
    rng = np.random.default_rng(0)
    base = torch.from_numpy(rng.normal(size=(2, 3, 12)).astype(np.float32))
    formula = {0: lambda z, v: v, 1: np.maximum, -1: np.minimum, 2: lambda z, v: z + v}
    neurons, weights, targets = np.arange(1, 12), rng.random(11) + 0.1, rng.normal(size=11)
    for bounds in ([0] * 11, [1] * 11, [-1] * 11, [2] * 11, list(rng.integers(-1, 3, 11))):
        got = ExpertIntervention.from_units(12, neurons, weights, targets, bounds)(base).numpy()
        z = base.numpy()
        want = z.copy()
        for n, w, v, b in zip(neurons, weights, targets, bounds):
            want[..., n] = z[..., n] + w * (formula[int(b)](z[..., n], v) - z[..., n])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert np.array_equal(got[..., 0], z[..., 0])


def test_an_edited_state_is_used_at_the_next_forward():
    """The split and cast state is cached between forwards; editing the state in place (a new
    value, a new bound) or calling with another dtype must not reuse the stale copy."""
    intervention = ExpertIntervention.from_units(4, [1], [1.0], [2.0])
    base = torch.zeros(1, 2, 4)
    assert intervention(base)[..., 1].eq(2.0).all()
    with torch.no_grad():
        intervention.source_representation[1, 1] = 5.0
    assert intervention(base)[..., 1].eq(5.0).all()
    with torch.no_grad():
        intervention.source_representation[2, 1] = -1.0  # clamp down: min(0, 5) = 0
    assert intervention(base)[..., 1].eq(0.0).all()
    assert intervention(base.double() + 7)[..., 1].eq(5.0).all()
    assert intervention(base.double() + 7).dtype == torch.float64
    intervention.source_representation = ExpertIntervention.from_units(4, [2], [1.0], [3.0]).source_representation
    assert intervention(base)[..., 2].eq(3.0).all() and intervention(base)[..., 1].eq(0.0).all()
    # Two fresh states (version 0 both), same device and dtype: only the tensor's identity tells them apart.
    fresh = lambda unit, value: ExpertIntervention.from_units(4, [unit], [1.0], [value]).source_representation.clone()  # noqa: E731
    intervention.source_representation = fresh(1, 2.0)
    assert intervention(base)[..., 1].eq(2.0).all()
    intervention.source_representation = fresh(3, 4.0)
    assert intervention(base)[..., 3].eq(4.0).all() and intervention(base)[..., 1].eq(0.0).all()


def test_the_split_state_is_reused_until_the_state_device_or_dtype_changes():
    """The cache _prepared promises: the same split rows at every forward while nothing changed (a
    generation step would otherwise split and cast the state again), new rows after any change."""
    intervention = ExpertIntervention.from_units(4, [1], [1.0], [2.0])
    cpu = torch.device("cpu")
    first = intervention._prepared(cpu, torch.float32)
    intervention(torch.zeros(1, 2, 4))
    assert intervention._prepared(cpu, torch.float32) is first
    assert intervention._prepared(cpu, torch.float64) is not first
    again = intervention._prepared(cpu, torch.float32)
    assert again is not first and intervention._prepared(cpu, torch.float32) is again
    with torch.no_grad():
        intervention.source_representation[1, 1] = 5.0
    assert intervention._prepared(cpu, torch.float32) is not again


def test_the_state_is_float32_whatever_the_default_dtype():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        state = ExpertIntervention.from_units(4, np.array([1, 3], dtype=np.int32), [1.0, 0.5], [2.0, -1.0]).source_representation
    finally:
        torch.set_default_dtype(before)
    assert state.dtype == torch.float32
    assert state[:, [1, 3]].tolist() == [[1.0, 0.5], [2.0, -1.0], [0.0, 0.0]]


# ----------------------------------------------------------------------------- the interventions on their own


def test_addition_adds_its_vector_at_every_position_in_the_input_dtype():
    """AdditionIntervention returns h + s at every position, in h's dtype (float64 here, state float32)."""
    from steer_experts.interventions import AdditionIntervention

    vector = torch.tensor([0.5, -1.0, 2.0])
    base = torch.randn(2, 4, 3, dtype=torch.float64)
    out = AdditionIntervention(source_representation=vector).forward(base)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, base + vector.double())
    assert str(AdditionIntervention(source_representation=torch.tensor([3.0, 4.0]))) == "AdditionIntervention(|s| = 5)"


def test_addition_follows_the_input_down_to_a_narrower_dtype_and_another_device():
    """A bfloat16 input stays bfloat16 (adding a float32 state uncast would promote it), and an input on
    another device (meta here, the only other one a CPU machine has) gets its output there."""
    from steer_experts.interventions import AdditionIntervention

    intervention = AdditionIntervention(source_representation=torch.tensor([0.5, -1.0, 2.0]))
    base = torch.randn(2, 4, 3).to(torch.bfloat16)
    out = intervention.forward(base)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, base + torch.tensor([0.5, -1.0, 2.0], dtype=torch.bfloat16))
    assert intervention.forward(torch.empty(2, 4, 3, device="meta")).device.type == "meta"


def test_expert_intervention_moves_a_float64_input_by_its_formula():
    """The state is float32; a float64 input is moved in float64 by z + w (v - z) (bound 0)."""
    intervention = ExpertIntervention.from_units(5, [1, 3], [0.5, 1.0], [2.0, -1.0])
    base = torch.randn(2, 3, 5, dtype=torch.float64)
    want = base.clone()
    want[..., 1] = base[..., 1] + 0.5 * (2.0 - base[..., 1])
    want[..., 3] = -1.0
    out = intervention.forward(base)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, want)
    assert str(intervention) == "ExpertIntervention(2 of 5 units)"


@pytest.mark.parametrize("cls, bad_state, message", [
    (ExpertIntervention, torch.zeros(2, 5), "ExpertIntervention state must have shape (3, width); got (2, 5)."),
    ("AdditionIntervention", torch.zeros(2, 5), "AdditionIntervention state must have shape (width,); got (2, 5)."),
])
def test_a_state_of_the_wrong_shape_is_refused(cls, bad_state, message):
    from steer_experts import interventions

    cls = getattr(interventions, cls) if isinstance(cls, str) else cls
    with pytest.raises(ValueError) as err:
        cls(source_representation=bad_state)
    assert str(err.value) == message


@pytest.mark.parametrize("name", ["ExpertIntervention", "AdditionIntervention"])
def test_an_intervention_without_state_says_so(name):
    from steer_experts import interventions

    with pytest.raises(RuntimeError) as err:
        getattr(interventions, name)().forward(torch.zeros(1, 2, 3))
    assert str(err.value) == f"{name} has no state: it was built without source_representation."
