"""DiffMean: steering along the difference of mean residual activations.

The simplest residual baseline of AxBench (Wu et al. 2025), here so that expert
steering is always compared with it on the same footing:

* :func:`residual_means` runs the model once over a concept's sentences and keeps,
  for every layer, the mean residual-stream activation (the decoder block's
  output) over the non-special tokens of the positives and of the negatives, and
  the median token norm (L2, activation units) -- one pass serves every layer.
* The direction at layer l is ``v_l = mean_pos_l - mean_neg_l``, unit-normalised.
* :func:`steer_diffmean` adds ``factor x norm_l x v_l`` at every position, prompt
  and generated tokens alike, through a pyvene
  :class:`~steer_experts.interventions.AdditionIntervention` on the block output;
  ``norm_l`` is the layer's median token norm, so ``factor`` is a fraction of a
  typical activation and comparable across layers. (The median, not the mean:
  from layer 11 on, SmolLM2's first token carries a norm about 20x the others'.)

:func:`unit_alignment` tells how much each expert neuron writes along the
DiffMean direction of its own layer: the cosine between its ``down_proj``
column and ``v_l``. :func:`aligned_scores` combines it with AP, so that expert
steering can prefer experts that push the residual stream the way the concept
does (``steer(..., scores=aligned_scores(...))``). :func:`unit_shifts` is the same
difference of means taken in the neuron basis, for ``steer(..., mode="add")``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from .atomic import atomic_write
from .concepts import Concept
from .errors import InvalidArgumentError
from .experts import ExpertSet, ModelMismatchError
from .interventions import AdditionIntervention
from .models import LoadedModel
from .units import UnitSite, decoder_stack, locate_residual_stream, write_columns
from .steering import SteeredModel, checked_sites

FORMAT_VERSION = 1


@dataclass
class ResidualMeans:
    """Mean residual activations of one concept's positives and negatives, every layer.

    Arrays are float64: ``positive_mean``/``negative_mean`` (layers, hidden) and
    ``token_norm`` (layers,), the median L2 norm of a token's activation over all the
    tokens counted; all in activation units. ``n_positive_tokens`` and
    ``n_negative_tokens`` count the tokens averaged.
    """

    concept: str
    positive_mean: np.ndarray
    negative_mean: np.ndarray
    token_norm: np.ndarray
    n_positive_tokens: int
    n_negative_tokens: int
    model_name: str
    model_fingerprint: str

    @property
    def n_layers(self) -> int:
        """Number of decoder layers."""
        return len(self.token_norm)

    def direction(self, layer: int) -> np.ndarray:
        """The unit DiffMean direction at ``layer`` (mean positive minus mean negative), float64."""
        if not 0 <= layer < self.n_layers:
            raise InvalidArgumentError(f"layer must be in [0, {self.n_layers}); got {layer!r}.")
        diff = self.positive_mean[layer] - self.negative_mean[layer]
        return diff / np.linalg.norm(diff)

    def save(self, path: str | Path) -> Path:
        """Write to one safetensors file (arrays, with the rest as JSON metadata), atomically."""
        meta = {"format_version": FORMAT_VERSION, "concept": self.concept, "model_name": self.model_name,
                "model_fingerprint": self.model_fingerprint, "n_positive_tokens": self.n_positive_tokens,
                "n_negative_tokens": self.n_negative_tokens}
        arrays = {"positive_mean": self.positive_mean, "negative_mean": self.negative_mean,
                  "token_norm": self.token_norm}
        return atomic_write(path, lambda p: save_file(arrays, str(p), metadata={"json": json.dumps(meta)}))

    @classmethod
    def load(cls, path: str | Path) -> "ResidualMeans":
        """Read what :meth:`save` wrote (no pickle)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads(f.metadata()["json"])
        if meta.pop("format_version") != FORMAT_VERSION:
            raise InvalidArgumentError(f"{path}: residual means of another format version; recompute them.")
        return cls(**load_file(str(path)), **meta)


def residual_means(model: LoadedModel, concept: Concept, *, max_length: int = 128, batch_size: int = 32,
                   progress: bool = True) -> ResidualMeans:
    """Mean block-output activations of ``concept``'s positives and negatives, at every layer.

    Special tokens (BOS, padding) are left out, as AxBench drops the prefix tokens.
    Sentences are cut at ``max_length`` tokens and batched by length. Raises ValueError
    without negatives.
    """
    sites = locate_residual_stream(model.model)
    sums, counts, norms = _token_sums(model, concept, sites, max_length, batch_size, progress, "residual means",
                                      with_norms=True)
    token_norm = np.array([float(torch.cat(n).median()) for n in norms])
    return ResidualMeans(concept.name, np.stack([s[0] for s in sums]) / counts[0],
                         np.stack([s[1] for s in sums]) / counts[1], token_norm,
                         counts[0], counts[1], model.name, model.fingerprint)


def unit_shifts(model: LoadedModel, experts: ExpertSet, concept: Concept, *, max_length: int = 128,
                batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """Per unit of ``experts`` (float64, activation units): its mean response over the tokens of
    ``concept``'s positives minus that over its negatives -- DiffMean in the neuron basis.

    Tokens are counted as in :func:`residual_means`. Pass the result to
    ``steer(..., mode="add", shifts=...)``: each expert then moves by what the concept adds
    to it on an average token.
    """
    experts.check_model(model)
    sums, counts, _ = _token_sums(model, concept, experts.sites, max_length, batch_size, progress, "unit means")
    return np.concatenate([s[0] / counts[0] - s[1] / counts[1] for s in sums])


@torch.no_grad()
def _token_sums(model: LoadedModel, concept: Concept, sites, max_length: int, batch_size: int, progress: bool,
                what: str, with_norms: bool = False) -> tuple[list[np.ndarray], list[int], list[list[torch.Tensor]]]:
    """One pass over ``concept``'s sentences. Per site: the sum of its activations (input or
    output, by ``site.port``) over non-special tokens, float64 (2, width), positives then
    negatives; the two token counts; and, ``with_norms``, per site every token's L2 norm (kept only
    when asked: unit sites are wide, and their norms would be computed for nothing)."""
    if not concept.negatives:
        raise InvalidArgumentError(f"Concept {concept.name!r} has no negatives; DiffMean needs both sides. "
                         "Sample them first (ConceptSet.with_sampled_negatives).")
    sums = [np.zeros((2, s.width)) for s in sites]
    norms: list[list[torch.Tensor]] = [[] for _ in sites]
    counts = [0, 0]
    tokenizer = model.tokenizer
    special = torch.tensor(sorted(tokenizer.all_special_ids))
    stack = decoder_stack(model.model)
    captured: dict[int, torch.Tensor] = {}

    def keep_output(i):
        def hook(_module, _args, output):
            captured[i] = output[0] if isinstance(output, tuple) else output
        return hook

    def keep_input(i):
        def hook(_module, args):
            captured[i] = args[0]
        return hook

    handles = [model.model.get_submodule(s.module_path).register_forward_hook(keep_output(i)) if s.port == "output"
               else model.model.get_submodule(s.module_path).register_forward_pre_hook(keep_input(i))
               for i, s in enumerate(sites)]
    try:
        for side, sentences in enumerate((concept.positives, concept.negatives)):
            lengths = [len(ids) for ids in tokenizer(list(sentences), truncation=True, max_length=max_length)["input_ids"]]
            sentences = [sentences[i] for i in np.argsort(lengths, kind="stable")]  # less padding
            starts = range(0, len(sentences), batch_size)
            for start in tqdm(starts, desc=f"{what} ({'positives' if side == 0 else 'negatives'})",
                              unit="batch", disable=not progress):
                enc = tokenizer(list(sentences[start:start + batch_size]), return_tensors="pt", padding=True,
                                truncation=True, max_length=max_length)
                enc = {key: value.to(model.device) for key, value in enc.items()}
                stack(**enc)
                mask = enc["attention_mask"].bool() & ~torch.isin(enc["input_ids"], special.to(model.device))
                counts[side] += int(mask.sum())
                for i in range(len(sites)):
                    tokens = captured[i][mask].double()
                    sums[i][side] += tokens.sum(dim=0).cpu().numpy()
                    if with_norms:
                        norms[i].append(tokens.norm(dim=1).float().cpu())
    finally:
        for handle in handles:
            handle.remove()
    if min(counts) == 0:
        raise InvalidArgumentError(f"Concept {concept.name!r} has a side with no ordinary token to average.")
    return sums, counts, norms


def unit_alignment(model: LoadedModel, experts: ExpertSet, means: ResidualMeans) -> np.ndarray:
    """Per unit of ``experts`` (float64, in [-1, 1]): the cosine between the unit's ``down_proj``
    column (what it writes to the residual stream) and the DiffMean direction of its layer."""
    experts.check_model(model)
    if means.model_fingerprint != model.fingerprint:
        raise ModelMismatchError(f"The residual means of {means.concept!r} come from another model.")
    return np.concatenate([
        (torch.nn.functional.normalize(write_columns(model.model, site), dim=1)
         @ torch.from_numpy(means.direction(site.layer))).numpy()
        for site in experts.sites])


def aligned_scores(model: LoadedModel, experts: ExpertSet, means: ResidualMeans) -> np.ndarray:
    """Per unit (float64, >= 0): AP x the expected push along the concept's DiffMean direction.

    The push of unit u at layer l is ``(on_p50 - off_mean) * <column_u, v_l> / norm_l``: how far
    moving the unit from its usual value on negatives to its value on the concept moves the
    residual stream along ``v_l``, as a fraction of a typical token norm. Only units that rise
    with the concept (on_p50 > off_mean) and write along ``v_l`` score above 0: a unit that
    falls with the concept and writes against ``v_l`` also pushes along it, but such units
    include the massive-activation neurons (SmolLM2's layer-11 units 1229 and 1487, max-pooled
    responses near 1000-2800 on every sentence), and setting those at every position wrecks
    the text. Pass the result to ``steer(..., scores=...)`` to rank experts by it.
    """
    c = experts.concept_index(means.concept)
    e = experts.expertise
    columns_norm = np.concatenate([write_columns(model.model, site).norm(dim=1).numpy() for site in experts.sites])
    rise = np.maximum(e.on_p50[c] - e.off_mean[c], 0.0)
    along = np.maximum(unit_alignment(model, experts, means), 0.0)
    return e.ap[c] * rise * along * columns_norm / means.token_norm[experts.layer]


class DiffMeanSteeredModel(SteeredModel):
    """A model steered by adding a DiffMean direction to one layer's residual stream.

    Attributes (besides :class:`SteeredModel`'s): ``concept``, ``layer``, ``factor``,
    ``norm`` (the layer's median token norm) and ``direction`` (unit, float32);
    the vector added is ``factor * norm * direction``.
    """

    method = "diffmean"

    def __init__(self, base: LoadedModel, concept: str, layer: int, factor: float, norm: float,
                 direction: np.ndarray, positions: str = "all"):
        if not (np.isfinite(factor) and np.isfinite(norm) and norm >= 0):
            raise InvalidArgumentError(f"factor and norm must be finite (norm >= 0); got {factor!r}, {norm!r}.")
        sites = locate_residual_stream(base.model)
        if not 0 <= layer < len(sites):
            raise InvalidArgumentError(f"layer must be in [0, {len(sites)}); got {layer!r}.")
        direction = np.asarray(direction, dtype=np.float32)
        if direction.shape != (sites[layer].width,) or not np.isfinite(direction).all():
            raise InvalidArgumentError(f"direction must be {sites[layer].width} finite numbers; got shape {direction.shape}.")
        self.concept, self.layer, self.factor, self.norm = concept, int(layer), float(factor), float(norm)
        self.direction = direction
        self.site: UnitSite = sites[layer]
        vector = torch.from_numpy(self.factor * self.norm * direction)
        super().__init__(base, {self.site: AdditionIntervention(source_representation=vector)}, positions)

    def __repr__(self) -> str:
        return (f"SteeredModel({self.base.name!r}, DiffMean {self.concept} at layer {self.layer}, "
                f"factor {self.factor:g} x norm {self.norm:.3g})")

    def method_config(self) -> dict:
        """Concept, layer, factor, norm and the site."""
        return {"concept": self.concept, "layer": self.layer, "factor": self.factor, "norm": self.norm,
                "site": {"layer": self.site.layer, "module_path": self.site.module_path, "width": self.site.width,
                         "port": self.site.port}}

    def method_arrays(self) -> dict[str, np.ndarray]:
        """The unit direction."""
        return {"direction": self.direction}

    @classmethod
    def from_saved(cls, model: LoadedModel, config: dict, arrays: dict[str, np.ndarray]) -> "DiffMeanSteeredModel":
        """Rebuild from the saved direction, checking that the residual site exists in ``model``."""
        checked_sites(model, [config["site"]], locate_residual_stream(model.model))
        return cls(model, config["concept"], int(config["layer"]), float(config["factor"]), float(config["norm"]),
                   arrays["direction"], config["positions"])


def steer_diffmean(model: LoadedModel, means: ResidualMeans, layer: int, factor: float,
                   positions: str = "all") -> DiffMeanSteeredModel:
    """Steer ``model`` by adding ``factor`` x (median token norm) x the unit DiffMean direction of
    ``means`` at ``layer``'s block output. ``factor`` is a fraction of a typical activation
    (AxBench sweeps 0.2-5 of the concept's largest projection; here about 0.05-0.5 of the norm).

    Raises ModelMismatchError when ``means`` come from another model, ValueError for a bad layer.
    """
    if means.model_fingerprint != model.fingerprint:
        raise ModelMismatchError(
            f"These residual means were computed on {means.model_name!r}, not on {model.name!r}; "
            "run residual_means on this model.")
    if not 0 <= layer < means.n_layers:
        raise InvalidArgumentError(f"layer must be in [0, {means.n_layers}); got {layer!r}.")
    return DiffMeanSteeredModel(model, means.concept, layer, factor, float(means.token_norm[layer]),
                                means.direction(layer), positions)
