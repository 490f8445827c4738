"""Stage 7: steering generation with experts.

:class:`SteeredModel` is what every steering method returns: a pyvene
``IntervenableModel`` over the base model plus ``generate``/``complete``, a
steered forward, and ``save_pretrained``/``from_pretrained``/``push_to_hub``.
Each method is a subclass named by :attr:`SteeredModel.method` in the saved
``steering.json``: experts here (:func:`steer`), DiffMean in
:mod:`steer_experts.diffmean`, an instruction in :mod:`steer_experts.prompting`.

:func:`steer` turns (model, expert set, concepts, k or tau, alpha, mode) into an
:class:`ExpertSteeredModel` with one
:class:`~steer_experts.interventions.ExpertIntervention` per layer that holds experts.

Every mode moves unit z toward a target v with a per-unit weight w,
``z <- z + w (v - z)``:

* ``"set"``: do(c, k). w = alpha, v = the expert's expected value under the
  concept (``value``, default ``"on_p50"``). alpha = 1 sets z = v exactly;
  alpha in (0, 1) interpolates; alpha > 1 overshoots.
* ``"dampen"``: AurA. z <- f z with f = 1 - alpha * 2 (AUROC - 0.5) for units
  with AUROC > 0.5 (f = 1, untouched, otherwise); i.e. w = alpha * 2 (AUROC - 0.5), v = 0.
* ``"ablate"``: w = alpha, v = 0 (``value="zero"``, default) or the mean
  response on negatives (``value="off_mean"``). alpha < 1 scales a unit by
  1 - alpha, so a constant dampening factor f is ``mode="ablate", alpha=1 - f``.
* ``"clamp"``: z <- max(z, v) (with weight alpha), v as for ``"set"``: a unit
  already above its concept value is left alone, so the experts are never lowered.
  As a suppression mode it clamps down, z <- min(z, off_mean): each token's
  response is capped at the unit's typical (max-pooled) response on negatives.
* ``"add"``: z <- z + alpha v, v given per unit as ``shifts`` -- typically the concept's
  token-level difference of mean responses, positives minus negatives
  (:func:`steer_experts.diffmean.unit_shifts`): each expert moves by what the concept
  adds to it on an average token, rather than to a value pooled over a sentence.
  As a suppression mode it subtracts the same shift, z <- z - alpha v.

Several concepts: pass ``{"football": +1, "woman": -1}``. A positive strength s
steers toward the concept with ``mode`` and weight scale alpha * s; a negative
one suppresses it with ``suppress`` (``"dampen"`` or ``"ablate"`` to zero) and
scale alpha * |s|. ``value`` applies to the toward mode only. ``layers`` limits
the candidate units to some layers (e.g. leaving out the lexical detectors of
the first layers).

**A unit claimed by two concepts** is governed by the concept whose AP for that
unit is higher (the unit is a better detector of it); on a tie, by the concept
named first. The number of such contested units is kept in the plan and the
model card.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import math
import numbers
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from .atomic import atomic_write, claim_output_folder
from .errors import CorruptFileError
from .integrity import STAMP_KEY, check_steered_save, header_metadata, load_verified, stamp
from .experts import VALUE_STATS, ExpertSet, ModelMismatchError
from .interventions import SHIFT, ExpertIntervention, build_intervenable, pyvene_call
from .hub import resolve_folder, upload_folder
from .model_card import render_model_card
from .models import LoadedModel
from .units import UnitSite, locate_units

MODES = ("set", "dampen", "ablate", "clamp", "add")
SUPPRESS_MODES = ("dampen", "ablate", "clamp", "add")
POSITIONS = ("all", "prompt", "generated")
ABLATE_VALUES = ("zero", "off_mean")
FORMAT_VERSION = 2
CONFIG_NAME = "steering.json"
WEIGHTS_NAME = "steering.safetensors"
CARD_NAME = "README.md"
PYVENE_DIR = "pyvene"
SAVED_NAMES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, PYVENE_DIR, ".pyvene-*")
_PLAN_ARRAYS = ("layer", "neuron", "concept", "weight", "target", "bound", "ap", "auroc")


@dataclass(frozen=True)
class SteeringSpec:
    """What was asked for (JSON-able): concepts with signed strengths, selection, mode.

    ``concepts`` maps resolved concept names to strengths (> 0 toward, < 0 suppress).
    Exactly one of ``k``/``tau``/``per_layer`` is set (see :meth:`ExpertSet.select`);
    ``layers`` (None = all) limits the candidates; ``rank`` is ``"ap"``, or ``"scores"``
    when the experts were ranked by per-unit scores given to :func:`steer`.
    """

    concepts: dict[str, float]
    k: int | None = None
    tau: float | None = None
    per_layer: int | None = None
    control: str | None = None
    seed: int = 0
    alpha: float = 1.0
    mode: str = "set"
    value: str | None = None
    suppress: str = "dampen"
    positions: str = "all"
    layers: list[int] | None = None
    rank: str = "ap"


@dataclass
class SteeringPlan:
    """The units to steer, one row each, sorted by (layer, neuron).

    ``concept`` indexes ``concepts``; ``weight`` (dimensionless), ``target``
    (activation units) and ``bound`` (0 set, +1 clamp up, -1 clamp down, +2 shift) define
    the unit's move (see :mod:`steer_experts.interventions`); ``ap``/``auroc``
    are the unit's scores for its concept. ``contested`` counts units that more
    than one concept selected (resolved by higher AP).
    """

    concepts: list[str]
    layer: np.ndarray
    neuron: np.ndarray
    concept: np.ndarray
    weight: np.ndarray
    target: np.ndarray
    bound: np.ndarray
    ap: np.ndarray
    auroc: np.ndarray
    contested: int = 0

    def __len__(self) -> int:
        return len(self.layer)

    def interventions(self, sites: Sequence[UnitSite]) -> dict[UnitSite, ExpertIntervention]:
        """One :class:`ExpertIntervention` per site that holds at least one unit of the plan."""
        out = {}
        for site in sites:
            rows = self.layer == site.layer
            if rows.any():
                out[site] = ExpertIntervention.from_units(
                    site.width, self.neuron[rows], self.weight[rows], self.target[rows], self.bound[rows])
        return out

    def concept_summary(self) -> list[dict]:
        """Per concept: unit count, AP min/median/mean/max, weight and target ranges, units per layer."""
        rows = []
        for c, name in enumerate(self.concepts):
            mine = self.concept == c
            ap = self.ap[mine]
            row = {"concept": name, "units": int(mine.sum())}
            if mine.any():
                row.update(
                    ap_min=float(ap.min()), ap_median=float(np.median(ap)), ap_mean=float(ap.mean()),
                    ap_max=float(ap.max()), weight_min=float(self.weight[mine].min()),
                    weight_max=float(self.weight[mine].max()), target_min=float(self.target[mine].min()),
                    target_max=float(self.target[mine].max()),
                    layers={str(int(k)): int(v) for k, v in zip(*np.unique(self.layer[mine], return_counts=True))},
                )
            rows.append(row)
        return rows


# ---------------------------------------------------------------------------- planning


def _unit_rule(selection, mode: str, value: str | None, scale: float, toward: bool,
               shifts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(weight, target, bound) per selected unit for one concept under ``mode``."""
    n = len(selection)
    if mode == "add":
        sign = 1.0 if toward else -1.0
        return (np.full(n, scale, np.float32), (sign * shifts[selection.units]).astype(np.float32),
                np.full(n, SHIFT, np.float32))
    if mode == "dampen":
        # Units that do not detect the concept (AUROC <= 0.5) are left alone.
        weight = scale * np.maximum(2.0 * (selection.auroc.astype(np.float64) - 0.5), 0.0)
        return weight.astype(np.float32), np.zeros(n, np.float32), np.zeros(n, np.float32)
    bound = {"clamp": 1.0 if toward else -1.0}.get(mode, 0.0)
    return np.full(n, scale, np.float32), selection.values(value), np.full(n, bound, np.float32)


def _finite_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _plain_int(x):
    # numpy integers are accepted by ExpertSet.select but not by json.dumps
    return int(x) if isinstance(x, numbers.Integral) and not isinstance(x, bool) else x


def checked_spec(spec: SteeringSpec) -> SteeringSpec:
    """Validate ``spec``; return it with plain Python numbers (JSON-able). Raises ValueError."""
    if spec.mode not in MODES:
        raise ValueError(f"Unknown mode {spec.mode!r}; choose one of {MODES}.")
    if spec.suppress not in SUPPRESS_MODES:
        raise ValueError(f"Unknown suppress mode {spec.suppress!r}; choose one of {SUPPRESS_MODES}.")
    if spec.positions not in POSITIONS:
        raise ValueError(f"Unknown positions {spec.positions!r}; choose one of {POSITIONS}.")
    if not _finite_real(spec.alpha) or spec.alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0; got {spec.alpha!r}. "
                         "To push a concept away, give it a negative strength instead.")
    allowed = {"set": VALUE_STATS, "clamp": VALUE_STATS, "ablate": ABLATE_VALUES, "dampen": (), "add": ()}[spec.mode]
    if spec.value is not None and spec.value not in allowed:
        raise ValueError(f"value={spec.value!r} does not fit mode {spec.mode!r}; allowed: "
                         f"{allowed or 'none (dampen derives each factor from the AUROC; add takes shifts)'}.")
    if not spec.concepts:
        raise ValueError("No concepts given: pass a concept name or a {concept: strength} mapping.")
    for name, strength in spec.concepts.items():
        if not _finite_real(strength) or strength == 0:
            raise ValueError(f"Strength of concept {name!r} must be a finite non-zero number "
                             f"(> 0 toward, < 0 suppress); got {strength!r}.")
    if spec.rank not in ("ap", "scores"):
        raise ValueError(f"Unknown rank {spec.rank!r}; 'ap', or 'scores' with per-unit scores.")
    if spec.layers is not None and (isinstance(spec.layers, (str, bytes)) or not all(
            isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in spec.layers) or not spec.layers):
        raise ValueError(f"layers must be a non-empty list of layer indices; got {spec.layers!r}.")
    return replace(spec, concepts={n: float(s) for n, s in spec.concepts.items()}, alpha=float(spec.alpha),
                   layers=None if spec.layers is None else sorted({int(x) for x in spec.layers}),
                   k=_plain_int(spec.k), per_layer=_plain_int(spec.per_layer), seed=_plain_int(spec.seed),
                   tau=float(spec.tau) if _finite_real(spec.tau) else spec.tau)


def plan_steering(experts: ExpertSet, spec: SteeringSpec, scores: np.ndarray | None = None,
                  shifts: np.ndarray | None = None) -> SteeringPlan:
    """Select each concept's experts and turn them into per-unit (weight, target, bound) rows.

    ``scores`` (one per unit, one concept only) ranks the experts instead of AP;
    ``shifts`` (one per unit, activation units) are what ``mode="add"`` adds (and
    ``suppress="add"`` subtracts).

    Raises KeyError for an unknown concept and ValueError for any other bad
    argument (k larger than the units available, alpha NaN, unknown mode...).
    """
    spec = checked_spec(spec)
    if (scores is not None) != (spec.rank == "scores"):
        raise ValueError("Pass scores exactly when spec.rank == 'scores'.")
    if scores is not None and len(spec.concepts) != 1:
        raise ValueError("scores rank the units of one concept; steer one concept at a time with them.")
    strengths = spec.concepts.values()
    shifting = (spec.mode == "add" and any(s > 0 for s in strengths)) or (
        spec.suppress == "add" and any(s < 0 for s in strengths))
    if (shifts is not None) != shifting:
        raise ValueError("mode='add' (and suppress='add') takes shifts (one per unit, e.g. diffmean.unit_shifts), "
                         "and only it does.")
    if shifts is not None:
        shifts = np.asarray(shifts, dtype=np.float64)
        if len(spec.concepts) != 1 or shifts.shape != (experts.n_units,) or not np.isfinite(shifts).all():
            raise ValueError(f"shifts must be {experts.n_units} finite numbers, one per unit, for one concept; "
                             f"got shape {shifts.shape} for {len(spec.concepts)} concept(s).")
    parts = []
    for c, (name, strength) in enumerate(spec.concepts.items()):
        selection = experts.select(name, k=spec.k, tau=spec.tau, per_layer=spec.per_layer,
                                   control=spec.control, seed=spec.seed, layers=spec.layers, scores=scores)
        toward = strength > 0
        mode = spec.mode if toward else spec.suppress
        default_value = {"set": "on_p50", "ablate": "zero", "clamp": "on_p50" if toward else "off_mean"}
        value = (spec.value if toward else None) or default_value.get(mode)
        weight, target, bound = _unit_rule(selection, mode, value, spec.alpha * abs(strength), toward, shifts)
        parts.append(dict(units=selection.units, layer=selection.layer, neuron=selection.neuron,
                          concept=np.full(len(selection), c, np.int64), weight=weight, target=target, bound=bound,
                          ap=selection.ap.astype(np.float64), auroc=selection.auroc.astype(np.float64)))
    cat = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    # Contested units: the highest AP wins, then the concept named first.
    order = np.lexsort((cat["concept"], -cat["ap"]))
    _, first = np.unique(cat["units"][order], return_index=True)
    keep = order[first]
    keep = keep[np.lexsort((cat["neuron"][keep], cat["layer"][keep]))]
    return SteeringPlan(list(spec.concepts), *(cat[key][keep] for key in _PLAN_ARRAYS),
                        contested=int(len(cat["units"]) - len(keep)))


def _resolve_concepts(experts: ExpertSet, concepts: str | Mapping[str, float]) -> dict[str, float]:
    if isinstance(concepts, str):
        concepts = {concepts: 1.0}
    if not isinstance(concepts, Mapping):
        raise TypeError(f"concepts must be a name or a {{name: strength}} mapping; got {type(concepts).__name__}.")
    resolved: dict[str, float] = {}
    for query, strength in concepts.items():
        name = experts.concepts[experts.concept_index(query)]
        if name in resolved:
            raise ValueError(f"Concept {name!r} is given twice (as {query!r}); give each concept once.")
        resolved[name] = strength
    return resolved


def steer(
    model: LoadedModel,
    experts: ExpertSet,
    concepts: str | Mapping[str, float],
    *,
    k: int | str | None = None,
    tau: float | None = None,
    per_layer: int | None = None,
    alpha: float = 1.0,
    max_perplexity_ratio: float = 2.0,
    mode: str = "set",
    value: str | None = None,
    suppress: str = "dampen",
    positions: str = "all",
    layers: Sequence[int] | None = None,
    scores: np.ndarray | None = None,
    shifts: np.ndarray | None = None,
    control: str | None = None,
    seed: int = 0,
) -> "ExpertSteeredModel":
    """Build a model steered by the experts of ``concepts``.

    Args:
        model: the model the experts were found on (checked by fingerprint).
        experts: an :class:`ExpertSet` for that model.
        concepts: a concept name, or ``{name: strength}``; strength > 0 steers toward
            the concept with ``mode``, < 0 suppresses it with ``suppress``; |strength|
            scales alpha.
        k, tau, per_layer: which experts (exactly one; see :meth:`ExpertSet.select`).
            ``k="auto"`` takes k and alpha from the operating point that
            :func:`steer_experts.calibration.calibrate` stored for the concept and
            ``max_perplexity_ratio`` (one concept only).
        alpha: intervention strength >= 0 (1 = set exactly / AurA's factor).
        mode: ``"set"``, ``"dampen"``, ``"ablate"``, ``"clamp"`` or ``"add"`` (module docstring).
        value: target statistic: for ``"set"``/``"clamp"`` one of ``VALUE_STATS`` (default
            ``"on_p50"``); for ``"ablate"`` ``"zero"`` (default) or ``"off_mean"``.
        suppress: mode for negative strengths: ``"dampen"``, ``"ablate"`` (to zero),
            ``"clamp"`` (down to ``off_mean``) or ``"add"`` (z <- z - alpha x shift).
        positions: default for :meth:`SteeredModel.generate`: ``"all"``, ``"prompt"``, ``"generated"``.
        layers: only units of these layers are candidates (None: all layers).
        scores: one number per unit that ranks the experts instead of AP, for one concept
            (e.g. :func:`steer_experts.diffmean.aligned_scores`).
        shifts: for ``mode="add"`` (``suppress="add"``), one number per unit (activation units)
            added (subtracted) with weight alpha, for one concept (e.g.
            :func:`steer_experts.diffmean.unit_shifts`).
        control, seed: ``"random"``/``"lowest"`` units instead of experts (with ``k``).

    Returns:
        An :class:`ExpertSteeredModel`. On any bad argument it raises before touching the model.

    Raises:
        ModelMismatchError: the experts come from another model.
        KeyError: unknown concept.
        ValueError: any other bad argument.
    """
    experts.check_model(model)
    resolved = _resolve_concepts(experts, concepts)
    if k == "auto":
        if len(resolved) != 1:
            raise ValueError("k='auto' is calibrated per concept: steer one concept at a time with it.")
        point = experts.operating_point(next(iter(resolved)), max_perplexity_ratio)
        k, alpha = point["k"], point["alpha"]
    spec = checked_spec(SteeringSpec(resolved, k=k, tau=tau, per_layer=per_layer,
                                     control=control, seed=seed, alpha=alpha, mode=mode, value=value,
                                     suppress=suppress, positions=positions,
                                     layers=None if layers is None else list(layers),
                                     rank="ap" if scores is None else "scores"))
    plan = plan_steering(experts, spec, scores, shifts)
    return ExpertSteeredModel(model, plan, spec, experts.sites, experts.unit_kind)


# ---------------------------------------------------------------------------- the steered model

STEERING_METHODS: dict[str, type["SteeredModel"]] = {}
# The methods defined in later modules (they import this one), by the name they save under: loading a save
# imports its module, so that it registers, in a process that never imported it.
_METHOD_MODULES = {"diffmean": "steer_experts.diffmean", "prompt": "steer_experts.prompting"}


def _steering_method(name: str) -> type["SteeredModel"] | None:
    """The class that saves as ``name``, or None when no method does."""
    if name not in STEERING_METHODS and name in _METHOD_MODULES:
        importlib.import_module(_METHOD_MODULES[name])
    return STEERING_METHODS.get(name)


class SteeredModel:
    """A base model steered through pyvene interventions; what every steering method returns.

    Subclasses set :attr:`method` (the name saved in ``steering.json``) and
    implement :meth:`method_config`, :meth:`method_arrays` and :meth:`from_saved`;
    :meth:`from_pretrained` on this class loads any of them.

    Attributes:
        base: the :class:`LoadedModel` (its weights are never changed).
        interventions: the pyvene intervention at each :class:`UnitSite`.
        positions: default positions for :meth:`generate`.
        intervenable: the pyvene ``IntervenableModel``.
    """

    method: str = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.method:
            STEERING_METHODS[cls.method] = cls

    def __init__(self, base: LoadedModel, interventions: Mapping[UnitSite, torch.nn.Module], positions: str):
        if positions not in POSITIONS:
            raise ValueError(f"Unknown positions {positions!r}; choose one of {POSITIONS}.")
        self.base = base
        self.positions = positions
        self.interventions = dict(interventions)
        for intervention in self.interventions.values():
            intervention.to(base.device)
        self.intervenable = build_intervenable(base.model, self.interventions)

    # ------------------------------------------------------------------ running
    def model_inputs(self, prompts: Sequence[str]) -> list[str]:
        """The texts actually fed to the model for ``prompts`` (the prompts themselves, unless a
        method rewrites them, as prompting does)."""
        return list(prompts)

    def __call__(self, **model_inputs):
        """Steered forward pass at every position; returns the model's output (e.g. with ``.logits``)."""
        if not self.intervenable.interventions:  # pyvene then returns (output, None), not (None, output)
            return self.base.model(**model_inputs)
        with pyvene_call(self.base.model):
            _, output = self.intervenable(model_inputs)
        return output

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 positions: str | None = None, seed: int = 0, **generate_kwargs) -> torch.Tensor:
        """Steered ``model.generate``; returns prompt + new token ids, shape (batch, length).

        ``positions``: ``"all"`` (default from the method) steers every prompt position and each
        new token under the KV cache; ``"prompt"`` only the prompt; ``"generated"`` only the
        positions of generated tokens fed back in (the first new token comes from the
        unsteered prompt). The global RNG is seeded with ``seed`` for this call and restored
        after, so seeded sampling repeats exactly and the caller's RNG is untouched.
        """
        positions = positions or self.positions
        if positions not in POSITIONS:
            raise ValueError(f"Unknown positions {positions!r}; choose one of {POSITIONS}.")
        if positions != "all" and generate_kwargs.get("use_cache") is False:
            raise ValueError(f"positions={positions!r} needs the KV cache (each step then sees one new "
                             "token); drop use_cache=False or use positions='all'.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        generate_kwargs.setdefault("pad_token_id", self.base.tokenizer.pad_token_id)
        base = {"input_ids": input_ids.to(self.base.device), "attention_mask": attention_mask.to(self.base.device)}
        # pyvene: locations None + intervene_on_prompt=True acts on every call at every
        # position; intervene_on_prompt=False acts at position 0 of every call after the
        # prompt; explicit prompt positions + True act on the prompt call only.
        locations = {"base": list(range(input_ids.shape[1]))} if positions == "prompt" else None
        device = self.base.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                pyvene_call(self.base.model):
            torch.manual_seed(seed)
            _, output = self.intervenable.generate(base, unit_locations=locations,
                                                   intervene_on_prompt=positions != "generated", **generate_kwargs)
        return output

    def complete(self, prompts: str | Sequence[str], *, max_new_tokens: int = 40, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 positions: str | None = None, batch_size: int = 16) -> list[str]:
        """Continue each prompt; returns the new text only, one string per prompt.

        ``top_k``/``top_p`` None mean no such filtering (not the model's generation-config
        defaults); the paper samples with ``temperature=1.0, top_k=10``. Batch b (of ``batch_size`` prompts, left-padded) is sampled with seed ``seed + b``:
        the same prompts, seed and batch size give the same text.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        inputs = self.model_inputs(prompts)
        sampling = {"do_sample": do_sample}
        if do_sample:
            # settings left out fall back to the generation config (top_k 50, a model's top_p): pass no-ops.
            sampling.update(temperature=temperature, top_k=top_k or 0, top_p=1.0 if top_p is None else top_p)
        tokenizer = self.base.tokenizer
        texts = []
        starts = range(0, len(inputs), batch_size)
        for b, start in enumerate(tqdm(starts, desc="generate", unit="batch", disable=len(starts) <= 1)):
            batch = tokenizer(inputs[start:start + batch_size], return_tensors="pt", padding=True,
                              padding_side="left")
            out = self.generate(batch["input_ids"], batch["attention_mask"], positions=positions, seed=seed + b,
                                max_new_tokens=max_new_tokens, **sampling)
            texts += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return texts

    # ------------------------------------------------------------------ persistence
    def method_config(self) -> dict:
        """The method's own JSON-able settings, saved in ``steering.json``."""
        raise NotImplementedError

    def method_arrays(self) -> dict[str, np.ndarray]:
        """The method's own arrays, saved in ``steering.safetensors``."""
        raise NotImplementedError

    @classmethod
    def from_saved(cls, model: LoadedModel, config: dict, arrays: dict[str, np.ndarray]) -> "SteeredModel":
        """Rebuild the method from what :meth:`method_config`/:meth:`method_arrays` saved.
        Raises KeyError/TypeError/ValueError when they are inconsistent."""
        raise NotImplementedError

    def config(self) -> dict:
        """Everything :meth:`from_pretrained` and the model card need, JSON-able."""
        return {"format_version": FORMAT_VERSION, "library": "steer_experts", "method": self.method,
                "base_model": {"name": self.base.name, "fingerprint": self.base.fingerprint},
                "positions": self.positions, **self.method_config()}

    def save_pretrained(self, folder: str | Path, repo_id: str | None = None, overwrite: bool = False) -> Path:
        """Write the steered model (not the base weights) to ``folder``; returns it.

        ``repo_id`` only fills the loading example of the model card.
        Files: ``steering.json`` and ``steering.safetensors`` (what :meth:`from_pretrained`
        reads; never pickles), ``README.md`` (model card), and pyvene's own files in ``pyvene/``
        so ``pyvene.IntervenableModel.load(folder / "pyvene", model)`` works too. A folder that
        holds other files (e.g. a model's) is refused unless ``overwrite=True``.
        """
        folder = claim_output_folder(folder, SAVED_NAMES, overwrite=overwrite, what="steered model")
        config = self.config()
        arrays = {key: np.ascontiguousarray(value) for key, value in self.method_arrays().items()}
        config[STAMP_KEY] = stamp(arrays, config)
        if self.interventions:
            # pyvene writes its own config.json: kept in a subfolder so it can never replace a model's.
            with tempfile.TemporaryDirectory(dir=folder, prefix=".pyvene-") as tmp:
                with contextlib.redirect_stdout(io.StringIO()):  # pyvene prints "Directory ... exists"
                    self.intervenable.save(tmp)
                new = Path(f"{tmp}-new")
                os.replace(tmp, new)
                if (folder / PYVENE_DIR).exists():
                    os.replace(folder / PYVENE_DIR, tmp)  # the old one is deleted with the temporary folder
                os.replace(new, folder / PYVENE_DIR)
        elif (folder / PYVENE_DIR).exists():
            shutil.rmtree(folder / PYVENE_DIR)  # ours, from an earlier save of a method with interventions
        atomic_write(folder / WEIGHTS_NAME,
                     lambda p: save_file(arrays, str(p), metadata=header_metadata(config[STAMP_KEY])))
        atomic_write(folder / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(config, indent=1)))
        atomic_write(folder / CARD_NAME, lambda p: Path(p).write_text(render_model_card(config, repo_id)))
        return folder

    @classmethod
    def from_pretrained(cls, folder_or_repo: str | Path, model: LoadedModel) -> "SteeredModel":
        """Load a steered model saved by :meth:`save_pretrained` (folder or Hub repo id) onto ``model``,
        whatever its method.

        Raises:
            ModelMismatchError: ``model`` is not the base model it was saved with.
            ValueError: the folder is corrupt or from an incompatible version.
            FileNotFoundError / HubUnavailableError: nothing to load there.
        """
        folder = resolve_folder(folder_or_repo, [CONFIG_NAME, WEIGHTS_NAME], what="steered model")
        try:
            config = json.loads((folder / CONFIG_NAME).read_text())
            if config.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format_version {config.get('format_version')!r}, expected {FORMAT_VERSION}")
            method = _steering_method(config.get("method", "experts"))
            if method is None:
                raise ValueError(f"unknown steering method {config.get('method')!r}; "
                                 f"known: {sorted({*STEERING_METHODS, *_METHOD_MODULES})}")
            base = config["base_model"]
            arrays = load_verified(folder / WEIGHTS_NAME, config, what="steered model")
        except (OSError, KeyError, TypeError, ValueError, SafetensorError) as err:
            raise CorruptFileError(f"{folder} is not a valid steered model ({type(err).__name__}: {err}). "
                                   "Re-create it with SteeredModel.save_pretrained.") from None
        if model.fingerprint != base["fingerprint"]:
            raise ModelMismatchError(
                f"This steered model was saved for {base['name']!r} (fingerprint {base['fingerprint'][:12]}), "
                f"but the model given is {model.name!r} (fingerprint {model.fingerprint[:12]}). "
                "Load the base model it was made with.")
        try:
            return method.from_saved(model, config, arrays)
        except CorruptFileError as err:
            raise CorruptFileError(f"{folder} is not a valid steered model ({err}). "
                                   "Re-create it with SteeredModel.save_pretrained.") from None
        except (KeyError, TypeError, ValueError) as err:
            raise CorruptFileError(f"{folder} is not a valid steered model ({type(err).__name__}: {err}). "
                                   "Re-create it with SteeredModel.save_pretrained.") from None

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None) -> str:
        """Upload exactly what :meth:`save_pretrained` writes to the Hub repo ``repo_id``; returns its URL.

        Raises:
            HubUnavailableError: offline, not logged in, or the upload failed.
        """
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, repo_id=repo_id)
            return upload_folder(tmp, repo_id, private=private, token=token,
                                 commit_message=f"Upload {self!r}")


def checked_sites(model: LoadedModel, saved: Sequence[dict], actual: Sequence[UnitSite]) -> list[UnitSite]:
    """The saved sites (dicts), checked to be among ``actual`` (the model's own). Raises ValueError."""
    sites = [UnitSite(**s) for s in saved]
    actual = set(actual)
    missing = [s for s in sites if s not in actual]
    if missing:
        raise ValueError(f"sites {missing[:3]} do not exist in {model.name!r}")
    return sites


class ExpertSteeredModel(SteeredModel):
    """A model whose expert units are steered (:func:`steer`).

    Attributes (besides :class:`SteeredModel`'s):
        plan: the :class:`SteeringPlan` (units, weights, targets).
        spec: the :class:`SteeringSpec` it was built from.
        sites: every unit site of the expert set (one per layer).
    """

    method = "experts"

    def __init__(self, base: LoadedModel, plan: SteeringPlan, spec: SteeringSpec, sites: Sequence[UnitSite],
                 unit_kind: str):
        self.plan = plan
        self.spec = spec
        self.sites = list(sites)
        self.unit_kind = unit_kind
        super().__init__(base, plan.interventions(self.sites), spec.positions)

    def __repr__(self) -> str:
        toward = ", ".join(f"{n}:{s:+g}" for n, s in self.spec.concepts.items())
        return (f"SteeredModel({self.base.name!r}, {toward}, {len(self.plan)} units in "
                f"{len(set(self.plan.layer.tolist()))} layers, mode={self.spec.mode}, alpha={self.spec.alpha:g})")

    def method_config(self) -> dict:
        """Unit kind, sites, spec, concepts and per-concept expert statistics."""
        return {
            "unit_kind": self.unit_kind,
            "sites": [asdict(s) for s in self.sites],
            "spec": asdict(self.spec),
            "concepts": self.plan.concepts,
            "contested_units": self.plan.contested,
            "experts": self.plan.concept_summary(),
        }

    def method_arrays(self) -> dict[str, np.ndarray]:
        """The plan's per-unit arrays."""
        return {key: getattr(self.plan, key) for key in _PLAN_ARRAYS}

    @classmethod
    def from_saved(cls, model: LoadedModel, config: dict, arrays: dict[str, np.ndarray]) -> "ExpertSteeredModel":
        """Rebuild from the saved plan, checked against its spec and the sites of ``model``."""
        check_steered_save(config, arrays, "the plan")
        plan = SteeringPlan(list(config["concepts"]), *(arrays[key] for key in _PLAN_ARRAYS),
                            contested=int(config["contested_units"]))
        spec = SteeringSpec(**config["spec"])
        unit_kind = config["unit_kind"]
        sites = [UnitSite(**s) for s in config["sites"]]
        _check_plan(plan, sites)
        checked_sites(model, config["sites"], locate_units(model.model, unit_kind))
        return cls(model, plan, spec, sites, unit_kind)


def _check_plan(plan: SteeringPlan, sites: Sequence[UnitSite]) -> None:
    lengths = {len(getattr(plan, key)) for key in _PLAN_ARRAYS}
    if len(lengths) != 1:
        raise ValueError(f"plan arrays have different lengths {sorted(lengths)}")
    widths = {s.layer: s.width for s in sites}
    if not all(int(layer) in widths for layer in np.unique(plan.layer)):
        raise ValueError("plan names a layer that has no site")
    if len(plan) and (plan.neuron.min() < 0 or (plan.neuron >= np.vectorize(widths.get)(plan.layer)).any()):
        raise ValueError("plan names a neuron outside its layer")
    if len(plan) and (plan.concept.min() < 0 or plan.concept.max() >= len(plan.concepts)):
        raise ValueError("plan names a concept index outside the concept list")
