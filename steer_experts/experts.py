"""Stage 5: expert selection.

An :class:`ExpertSet` is the expertise of every unit of one model for a set of
concepts, together with the map from global unit index to (layer, neuron) and
the fingerprint of the model it was computed on. It is what ``discover`` writes
and what steering reads. :meth:`ExpertSet.from_responses` scores collected responses
into one, :meth:`ExpertSet.concat` stacks the concepts of several. :meth:`ExpertSet.select` turns it into an
:class:`ExpertSelection`: the experts of one concept (top-k, AP > tau, per
layer) or a control (random, lowest AP), each with the value it will be set to.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import save_file

from .atomic import atomic_write, claim_output_folder
from .concepts import resolve_concept
from .errors import CorruptFileError, InvalidArgumentError, SteerExpertsError, UnitNotFoundError
from .expertise import Expertise, compute_expertise, scoring_device
from .integrity import STAMP_KEY, check_finite, check_unit_interval, header_metadata, load_verified, stamp
from .hub import resolve_folder, upload_folder
from .models import LoadedModel
from .units import UnitSite, locate_units

FORMAT_VERSION = 2  # 2: JSON and safetensors carry a shared save id and the arrays' content hash
VALUE_STATS = ("on_p50", "on_mean", "on_p90", "off_mean", "zero")
WEIGHTS_NAME = "expert_set.safetensors"
CONFIG_NAME = "expert_set.json"
FIGURE_NAME = "ap_by_layer.png"
# What save_pretrained and `steer-experts discover` write: a folder holding only these is ours.
SAVED_NAMES = (WEIGHTS_NAME, CONFIG_NAME, FIGURE_NAME)


def operating_point_key(concept: str, max_perplexity_ratio: float) -> str:
    """Where an operating point is kept in ``ExpertSet.metadata["operating_points"]``."""
    return f"{concept} ppl<={float(max_perplexity_ratio):g}"


class ModelMismatchError(SteerExpertsError, ValueError):
    """Raised when experts are used with a model other than the one they were found on."""


def check_tau(tau) -> float:
    """``tau`` if it is an AP threshold in [0, 1); :class:`InvalidArgumentError` otherwise (NaN too)."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float, np.number)) or not 0 <= tau < 1:
        raise InvalidArgumentError(f"tau must be a number in [0, 1); got {tau!r}.")
    return float(tau)


@dataclass
class ExpertSelection:
    """Some units of one concept with their statistics (arrays aligned, best first).

    ``units`` are global unit indices; ``layer``/``neuron`` locate them. Statistic
    arrays (``ap``, ``auroc`` in [0, 1]; ``on_*``/``off_mean`` in activation units)
    are the selected units' values for ``concept``.
    """

    concept: str
    how: str
    units: np.ndarray
    layer: np.ndarray
    neuron: np.ndarray
    ap: np.ndarray
    auroc: np.ndarray
    on_p50: np.ndarray
    on_mean: np.ndarray
    on_p90: np.ndarray
    off_mean: np.ndarray

    def __len__(self) -> int:
        return len(self.units)

    def values(self, stat: str = "on_p50") -> np.ndarray:
        """The value each unit is set to: one of ``VALUE_STATS`` (float32, activation units)."""
        if stat not in VALUE_STATS:
            raise InvalidArgumentError(f"Unknown value statistic {stat!r}; choose one of {VALUE_STATS}.")
        if stat == "zero":
            return np.zeros(len(self), dtype=np.float32)
        return getattr(self, stat).astype(np.float32)

    def table(self) -> list[dict]:
        """One dict per expert: rank, layer, neuron, ap, auroc, on_p50, off_mean."""
        return [
            {"rank": r + 1, "layer": int(self.layer[r]), "neuron": int(self.neuron[r]), "ap": float(self.ap[r]),
             "auroc": float(self.auroc[r]), "on_p50": float(self.on_p50[r]), "off_mean": float(self.off_mean[r])}
            for r in range(len(self))
        ]


class ExpertSet:
    """Expertise of every unit of one model for several concepts.

    Args:
        expertise: per-concept, per-unit statistics (see :class:`Expertise`).
        sites: the unit sites (one per layer) the columns were collected from, in order.
        model_name: how the model was loaded (e.g. ``"smollm2-135m"``).
        model_fingerprint: :attr:`LoadedModel.fingerprint` of that model.
        unit_kind: the unit kind (``"mlp"``).
        metadata: free-form JSON-able facts (pooling, max length, data source...).
    """

    def __init__(self, expertise: Expertise, sites: Sequence[UnitSite], model_name: str,
                 model_fingerprint: str, unit_kind: str = "mlp", metadata: dict | None = None):
        widths = [s.width for s in sites]
        if sum(widths) != expertise.ap.shape[1]:
            raise InvalidArgumentError(f"Sites hold {sum(widths)} units but expertise has {expertise.ap.shape[1]} columns.")
        self.expertise = expertise
        self.sites = list(sites)
        self.model_name = model_name
        self.model_fingerprint = model_fingerprint
        self.unit_kind = unit_kind
        self.metadata = dict(metadata or {})
        self.layer = np.repeat([s.layer for s in sites], widths).astype(np.int64)
        self.neuron = np.concatenate([np.arange(w) for w in widths]).astype(np.int64)
        self._layer_offset = {s.layer: int(o) for s, o in zip(sites, np.cumsum([0] + widths[:-1]))}

    @classmethod
    def from_responses(cls, responses, concepts, model: LoadedModel, *, unit_kind: str = "mlp",
                       metadata: dict | None = None, progress: bool = True) -> "ExpertSet":
        """Score ``responses`` (a :class:`~steer_experts.responses.Responses` or a (sentences, units)
        array collected from ``model``'s ``unit_kind`` units) for ``concepts`` (a ``ConceptSet`` over
        the same sentences, or ``ConceptSet.rows(sentences)`` for a subset of them).

        Scores on the model's GPU when it has one (``expertise.scoring_device``); on the CPU with as many
        threads as torch computes with (``torch.set_num_threads``, the CLI's ``--threads``), so that
        processes sharing a machine do not each take every core."""
        sites = responses.sites if hasattr(responses, "sites") else locate_units(model.model, unit_kind)
        expertise = compute_expertise(responses, concepts, threads=torch.get_num_threads(),
                                      device=scoring_device(model.device), progress=progress)
        return cls(expertise, sites, model.name, model.fingerprint, unit_kind, metadata)

    @classmethod
    def concat(cls, parts: Sequence["ExpertSet"], metadata: dict | None = None) -> "ExpertSet":
        """One ExpertSet holding the concepts of ``parts`` in order (same model, same units); its
        metadata is the first part's, updated with ``metadata``."""
        first = parts[0]
        for p in parts[1:]:
            if p.model_fingerprint != first.model_fingerprint or p.n_units != first.n_units:
                raise InvalidArgumentError("Expert sets to concatenate must come from the same model and units.")
        stack = {s: np.concatenate([getattr(p.expertise, s) for p in parts]) for s in Expertise.STATS}
        expertise = Expertise(concepts=[c for p in parts for c in p.concepts], **stack,
                              n_positives=np.concatenate([p.expertise.n_positives for p in parts]),
                              n_negatives=np.concatenate([p.expertise.n_negatives for p in parts]))
        return cls(expertise, first.sites, first.model_name, first.model_fingerprint, first.unit_kind,
                   dict(first.metadata, **(metadata or {})))

    # ------------------------------------------------------------------ basics
    @property
    def concepts(self) -> list[str]:
        """Concept names, one per row of the expertise arrays."""
        return list(self.expertise.concepts)

    @property
    def n_units(self) -> int:
        """Number of units (columns) across all layers."""
        return len(self.layer)

    def __repr__(self) -> str:
        return (f"ExpertSet({len(self.concepts)} concepts x {self.n_units} {self.unit_kind} units, "
                f"model={self.model_name!r}, fingerprint={self.model_fingerprint[:12]})")

    def concept_index(self, concept: str) -> int:
        """Row of ``concept`` (exact name, or its word for sense-keyed names)."""
        return self.concepts.index(resolve_concept(concept, self.concepts))

    def unit_index(self, layer: int, neuron: int) -> int:
        """Global unit index of (layer, neuron)."""
        if layer not in self._layer_offset or not 0 <= neuron < self.sites[list(self._layer_offset).index(layer)].width:
            raise UnitNotFoundError(f"No unit at layer {layer}, neuron {neuron} in this {self.unit_kind} expert set.")
        return self._layer_offset[layer] + neuron

    def check_model(self, model: LoadedModel) -> None:
        """Raise :class:`ModelMismatchError` unless ``model`` is the model these experts were found on."""
        if model.fingerprint != self.model_fingerprint:
            raise ModelMismatchError(
                f"These experts were found on {self.model_name!r} (fingerprint {self.model_fingerprint[:12]}), "
                f"but the model given is {model.name!r} (fingerprint {model.fingerprint[:12]}). "
                "Run discovery on this model, or load the model the experts came from."
            )
        actual = [(s.layer, s.module_path, s.width) for s in locate_units(model.model, self.unit_kind)]
        if actual != [(s.layer, s.module_path, s.width) for s in self.sites]:
            raise ModelMismatchError(
                f"These experts' units ({len(self.sites)} layers, {self.n_units} units) are not the "
                f"{self.unit_kind} units of {model.name!r} ({len(actual)} layers, {sum(a[2] for a in actual)} units)."
            )

    # ------------------------------------------------------------------ selection
    def _selection(self, c: int, units: np.ndarray, how: str) -> ExpertSelection:
        e = self.expertise
        return ExpertSelection(
            self.concepts[c], how, units, self.layer[units], self.neuron[units],
            *(getattr(e, stat)[c, units] for stat in ("ap", "auroc", "on_p50", "on_mean", "on_p90", "off_mean")),
        )

    def select(self, concept: str, k: int | None = None, tau: float | None = None, per_layer: int | None = None,
               control: str | None = None, seed: int = 0, layers: Sequence[int] | None = None,
               scores: np.ndarray | None = None) -> ExpertSelection:
        """Choose units of ``concept``.

        Exactly one of:
            k: the k units of highest AP across all layers together.
            tau: every unit with AP > tau (tau in [0, 1)).
            per_layer: the ``per_layer`` units of highest AP in each layer.
        ``control`` replaces the experts by a baseline of the same size ``k``:
        ``"random"`` (k units drawn with ``seed``) or ``"lowest"`` (k lowest-AP units).
        ``layers`` (None: all) limits the candidates, experts and controls alike, to those layers.
        ``scores`` (one number per unit) ranks the experts for ``k`` and ``per_layer`` instead of
        AP (e.g. :func:`steer_experts.diffmean.aligned_scores`); ``tau`` always thresholds AP.

        Returns:
            An :class:`ExpertSelection`, highest AP first (random controls in draw order).
        """
        c = self.concept_index(concept)
        given = [name for name, v in (("k", k), ("tau", tau), ("per_layer", per_layer)) if v is not None]
        if len(given) != 1:
            raise InvalidArgumentError(f"Give exactly one of k, tau or per_layer; got {given or 'none'}.")
        if control is not None and k is None:
            raise InvalidArgumentError("Controls are defined for a count: pass k with control=.")
        candidates = np.arange(self.n_units)
        if layers is not None:
            unknown = sorted(set(layers) - set(self._layer_offset))
            if unknown:
                raise InvalidArgumentError(f"layers {unknown} do not exist; this expert set has layers "
                                 f"{min(self._layer_offset)}..{max(self._layer_offset)}.")
            candidates = candidates[np.isin(self.layer, list(layers))]
        ap = self.expertise.ap[c]
        if scores is not None:
            scores = np.asarray(scores, dtype=np.float64)
            if scores.shape != ap.shape or not np.isfinite(scores).all():
                raise InvalidArgumentError(f"scores must be {ap.shape[0]} finite numbers, one per unit; got shape {scores.shape}.")
        rank = ap if scores is None or tau is not None else scores
        order = candidates[np.argsort(-rank[candidates], kind="stable")]
        if k is not None:
            if not isinstance(k, (int, np.integer)) or k < 0 or k > len(candidates):
                raise InvalidArgumentError(f"k must be an integer in [0, {len(candidates)}] (the units available); got {k!r}.")
            if control == "random":
                units = np.random.default_rng(seed).choice(candidates, size=k, replace=False)
                return self._selection(c, units.astype(np.int64), f"random k={k} seed={seed}")
            if control == "lowest":
                return self._selection(c, candidates[np.argsort(ap[candidates], kind="stable")[:k]], f"lowest k={k}")
            if control is not None:
                raise InvalidArgumentError(f"Unknown control {control!r}; use 'random' or 'lowest'.")
            return self._selection(c, order[:k], f"top k={k}")
        if tau is not None:
            check_tau(tau)
            return self._selection(c, order[ap[order] > tau], f"ap > {tau}")
        if not isinstance(per_layer, (int, np.integer)) or per_layer < 1:
            raise InvalidArgumentError(f"per_layer must be a positive integer; got {per_layer!r}.")
        in_layer = self.layer[order]
        chosen = np.concatenate([order[in_layer == layer][:per_layer] for layer in np.unique(in_layer)])
        return self._selection(c, chosen[np.argsort(-rank[chosen], kind="stable")], f"top {per_layer} per layer")

    def operating_point(self, concept: str, max_perplexity_ratio: float = 2.0) -> dict:
        """The (k, alpha) operating point stored for ``concept`` by
        :func:`steer_experts.calibration.calibrate` for that perplexity budget, as a dict with
        ``k``, ``alpha``, ``concept_score``, ``ppl_ratio`` and the cells tried. Raises KeyError if none."""
        name = self.concepts[self.concept_index(concept)]
        stored = self.metadata.get("operating_points", {}).get(operating_point_key(name, max_perplexity_ratio))
        if stored is None:
            raise KeyError(f"No operating point for {name!r} within {max_perplexity_ratio:g}x perplexity in this "
                           "expert set; run steer_experts.calibration.calibrate (or `steer-experts generate --auto "
                           "--concepts FILE`) first.")
        return stored

    # ------------------------------------------------------------------ queries
    def experts_of(self, concept: str, k: int = 10) -> list[dict]:
        """The ``k`` best experts of ``concept`` as rows (rank, layer, neuron, ap, ...)."""
        return self.select(concept, k=min(k, self.n_units)).table()

    def label(self, layer: int, neuron: int, tau: float = 0.5) -> list[tuple[str, float]]:
        """The concepts (layer, neuron) is expert for (AP > tau), best first, with AP."""
        check_tau(tau)
        column = self.expertise.ap[:, self.unit_index(layer, neuron)]
        order = np.argsort(-column, kind="stable")
        return [(self.concepts[i], float(column[i])) for i in order if column[i] > tau]

    def summary(self, top: int = 10, taus: Sequence[float] = (0.5, 0.7, 0.8, 0.9, 0.95)) -> str:
        """A text report per concept: top experts with layer and AP, counts above each tau, layer histogram."""
        lines = [repr(self)]
        for concept in self.concepts:
            c = self.concept_index(concept)
            ap = self.expertise.ap[c]
            lines.append(f"\n== {concept}  ({self.expertise.n_positives[c]} positives, "
                         f"{self.expertise.n_negatives[c]} negatives; AP of a random unit ~ "
                         f"{self.expertise.n_positives[c] / (self.expertise.n_positives[c] + self.expertise.n_negatives[c]):.3f})")
            lines.append(f"{'rank':>4} {'layer':>5} {'neuron':>6} {'AP':>7} {'AUROC':>7} {'on_p50':>8} {'off_mean':>8}")
            for row in self.experts_of(concept, top):
                lines.append(f"{row['rank']:>4} {row['layer']:>5} {row['neuron']:>6} {row['ap']:>7.4f} "
                             f"{row['auroc']:>7.4f} {row['on_p50']:>8.3f} {row['off_mean']:>8.3f}")
            lines.append("units with AP > tau: " + ", ".join(f"{t}: {int((ap > t).sum())}" for t in taus))
            best = self.select(concept, k=min(100, self.n_units))
            counts = np.bincount(best.layer, minlength=len(self.sites))
            lines.append("layers of the top 100: " + " ".join(f"L{i}:{n}" for i, n in enumerate(counts) if n))
        return "\n".join(lines)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write ``expert_set.safetensors`` (statistics) and ``expert_set.json`` (everything else) atomically.

        Both carry one save id and the content hash of the statistics, checked by
        :meth:`from_pretrained`. A folder holding other files is refused unless ``overwrite=True``.
        """
        folder = claim_output_folder(folder, SAVED_NAMES, overwrite=overwrite, what="expert set")
        e = self.expertise
        tensors = {stat: np.ascontiguousarray(getattr(e, stat)) for stat in Expertise.STATS}
        tensors["n_positives"] = np.asarray(e.n_positives, dtype=np.int64)
        tensors["n_negatives"] = np.asarray(e.n_negatives, dtype=np.int64)
        config = {
            "format_version": FORMAT_VERSION, "concepts": e.concepts, "model_name": self.model_name,
            "model_fingerprint": self.model_fingerprint, "unit_kind": self.unit_kind,
            "sites": [{"layer": s.layer, "module_path": s.module_path, "width": s.width} for s in self.sites],
            "metadata": self.metadata,
        }
        config[STAMP_KEY] = stamp(tensors, config)
        atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata=header_metadata(config[STAMP_KEY])))
        atomic_write(folder / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(config, indent=1)))
        return folder

    @classmethod
    def from_pretrained(cls, folder_or_repo: str | Path, model: LoadedModel | None = None) -> "ExpertSet":
        """Load an expert set from a folder or a Hub repo id; if ``model`` is given, check it matches."""
        folder = resolve_folder(folder_or_repo, [CONFIG_NAME, WEIGHTS_NAME], what="expert set")
        try:
            config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
            if not isinstance(config, dict) or config.get("format_version") != FORMAT_VERSION:
                version = config.get("format_version") if isinstance(config, dict) else None
                raise ValueError(f"format_version {version!r}, expected {FORMAT_VERSION}")
            tensors = load_verified(folder / WEIGHTS_NAME, config, what="expert set")
            expertise = Expertise(concepts=list(config["concepts"]), **{s: tensors[s] for s in Expertise.STATS},
                                  n_positives=tensors["n_positives"], n_negatives=tensors["n_negatives"])
            if not all(isinstance(c, str) for c in expertise.concepts):
                raise ValueError("concept names must be strings")
            sites = [UnitSite(**s) for s in config["sites"]]
            if any(not isinstance(s.width, int) or s.width < 1 for s in sites):
                raise ValueError("every site needs a positive integer width")
            shapes = {tensors[s].shape for s in Expertise.STATS}
            if shapes != {(len(expertise.concepts), sum(s.width for s in sites))}:
                raise ValueError(f"statistic shapes {shapes} do not match the concepts and sites")
            counts = (len(expertise.concepts),)
            if tensors["n_positives"].shape != counts or tensors["n_negatives"].shape != counts:
                raise ValueError("n_positives / n_negatives do not match the concepts")
            if (tensors["n_positives"] < 1).any() or (tensors["n_negatives"] < 1).any():
                raise ValueError("every concept needs at least one positive and one negative")
            check_unit_interval(tensors, ("ap", "auroc"), str(folder))
            check_finite(tensors, Expertise.STATS, str(folder))
            expert_set = cls(expertise, sites, config["model_name"], config["model_fingerprint"],
                             config["unit_kind"], config.get("metadata"))
        except (OSError, KeyError, TypeError, ValueError, SafetensorError) as err:
            raise CorruptFileError(f"{folder} is not a valid expert set ({type(err).__name__}: {err}). "
                                   "Re-create it with ExpertSet.save_pretrained or `steer-experts discover`.") from None
        if model is not None:
            expert_set.check_model(model)
        return expert_set

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None) -> str:
        """Upload the folder ``save_pretrained`` writes to the Hub; returns the repo URL."""
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return upload_folder(tmp, repo_id, private=private, token=token)
