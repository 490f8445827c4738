"""Stage 2: where a model's units are.

Units are located through a registry of *unit kinds* (``UNIT_KINDS``): each kind
maps a model to a list of :class:`UnitSite` -- one module per layer whose input
holds that layer's units. ``"mlp"`` (the MLP neurons) is the kind experts are
found in; the residual stream (:func:`locate_residual_stream`) is where DiffMean
steers; other kinds plug in with :func:`register_unit_kind`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import PreTrainedModel

from .errors import InvalidArgumentError, SteerExpertsError



@dataclass(frozen=True)
class UnitSite:
    """One layer's units: the input (or, with ``port="output"``, the output) of ``module_path``,
    ``width`` units wide.

    ``module_path`` is a dotted path for ``model.get_submodule``;
    :attr:`pyvene_component` is the same place in pyvene's path syntax.
    """

    layer: int
    module_path: str
    width: int
    port: str = "input"

    @property
    def pyvene_component(self) -> str:
        """The site in pyvene's path syntax, e.g. ``model.layers[3].mlp.down_proj.input``."""
        parts = []
        for part in self.module_path.split("."):
            if part.isdigit():
                parts[-1] += f"[{part}]"
            else:
                parts.append(part)
        return ".".join(parts) + "." + self.port


class UnsupportedArchitectureError(SteerExpertsError, NotImplementedError):
    """Raised when no unit locator knows the model's architecture."""


# Where the MLP's down projection lives, per architecture: (layers path, module
# inside a layer). Its *input* is the neuron: act(gate(x)) * up(x) for gated MLPs,
# act(fc(x)) otherwise -- never act(gate) alone.
MLP_DOWN_PROJ: dict[str, tuple[str, str]] = {
    **{t: ("model.layers", "mlp.down_proj") for t in (
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "phi3")},
    "gemma3": ("model.language_model.layers", "mlp.down_proj"),
    "gpt2": ("transformer.h", "mlp.c_proj"),
    "gpt_neox": ("gpt_neox.layers", "mlp.dense_4h_to_h"),
}


# The norm the LM head reads, per architecture (same keys as MLP_DOWN_PROJ).
FINAL_NORM: dict[str, str] = {
    **{t: "model.norm" for t in MLP_DOWN_PROJ if MLP_DOWN_PROJ[t][0] == "model.layers"},
    "gemma3": "model.language_model.norm",
    "gpt2": "transformer.ln_f",
    "gpt_neox": "gpt_neox.final_layer_norm",
}


def _input_width(module: torch.nn.Module) -> int:
    if isinstance(module, torch.nn.Linear):
        return module.in_features
    weight = getattr(module, "weight", None)
    if weight is not None and weight.dim() == 2:  # gpt2's Conv1D stores (in, out)
        return weight.shape[0]
    raise UnsupportedArchitectureError(f"Cannot tell the input width of {type(module).__name__}.")


def locate_mlp_neurons(model: PreTrainedModel) -> list[UnitSite]:
    """Return one :class:`UnitSite` per layer: the input of the MLP's down projection."""
    model_type = model.config.model_type
    if model_type not in MLP_DOWN_PROJ:
        raise UnsupportedArchitectureError(
            f"No MLP neuron locator for model_type={model_type!r}. Supported: {sorted(MLP_DOWN_PROJ)}. "
            "To add one, set steer_experts.units.MLP_DOWN_PROJ[model_type] = (layers path, "
            "down-projection path inside a layer), e.g. ('model.layers', 'mlp.down_proj')."
        )
    layers_path, inner = MLP_DOWN_PROJ[model_type]
    layers = model.get_submodule(layers_path)
    sites = []
    for i, layer in enumerate(layers):
        module = layer.get_submodule(inner)
        sites.append(UnitSite(i, f"{layers_path}.{i}.{inner}", _input_width(module)))
    return sites


def locate_residual_stream(model: PreTrainedModel) -> list[UnitSite]:
    """Return one :class:`UnitSite` per layer: the output of the decoder block (the residual stream)."""
    locate_mlp_neurons(model)  # the same architectures, and the same error for the others
    layers_path = MLP_DOWN_PROJ[model.config.model_type][0]
    width = model.config.get_text_config().hidden_size
    return [UnitSite(i, f"{layers_path}.{i}", width, port="output")
            for i in range(len(model.get_submodule(layers_path)))]


def final_norm(model: PreTrainedModel) -> torch.nn.Module:
    """Return the normalisation the LM head reads (e.g. llama's ``model.norm``, gpt2's ``ln_f``)."""
    locate_mlp_neurons(model)  # the same architectures, and the same error for the others
    model_type = model.config.model_type
    if model_type not in FINAL_NORM:
        raise UnsupportedArchitectureError(
            f"No final-norm locator for model_type={model_type!r}. Set steer_experts.units.FINAL_NORM[{model_type!r}] "
            "to the path of the norm the LM head reads, e.g. 'model.norm'.")
    return model.get_submodule(FINAL_NORM[model_type])


def write_columns(model: PreTrainedModel, site: UnitSite) -> torch.Tensor:
    """What each unit of an MLP ``site`` writes to the residual stream: its down-projection
    column, float64 (width, hidden), on the CPU."""
    module = model.get_submodule(site.module_path)
    weight = module.weight.detach().double().cpu()
    return weight.T if isinstance(module, torch.nn.Linear) else weight  # gpt2's Conv1D stores (in, out)


UNIT_KINDS: dict[str, Callable[[PreTrainedModel], list[UnitSite]]] = {"mlp": locate_mlp_neurons}


def register_unit_kind(name: str, locator: Callable[[PreTrainedModel], list[UnitSite]]) -> None:
    """Add a unit kind: ``locator(model)`` returns the sites whose inputs are the units."""
    UNIT_KINDS[name] = locator


def locate_units(model: PreTrainedModel, kind: str = "mlp") -> list[UnitSite]:
    """Return the unit sites of ``kind`` (see ``UNIT_KINDS``) in layer order."""
    if kind not in UNIT_KINDS:
        raise InvalidArgumentError(f"Unknown unit kind {kind!r}; known kinds: {sorted(UNIT_KINDS)}.")
    return UNIT_KINDS[kind](model)


def decoder_stack(model: PreTrainedModel) -> torch.nn.Module:
    """Return the model without its LM head (``model.base_model``): enough to compute unit responses."""
    return model.base_model
