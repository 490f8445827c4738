"""Stage 6: steering interventions as pyvene interventions.

One :class:`ExpertIntervention` sits on one layer's units (the *input* of the
MLP down projection, i.e. the true neuron, never act(gate) alone) and moves
every unit u toward a target::

    t_u = v_u                 (bound b_u = 0: set)
    t_u = max(z_u, v_u)       (b_u = +1: clamp up, never lowers the unit)
    t_u = min(z_u, v_u)       (b_u = -1: clamp down, never raises it)
    t_u = z_u + v_u           (b_u = +2: shift by v_u)
    z_u <- z_u + w_u * (t_u - z_u)        (torch.lerp; w_u = 0 leaves z_u as is)

Every steering mode is this one formula with different (w, v, b): setting an
expert to its expected value is w = alpha, v = on_p50; AurA dampening (z <- f z)
is w = 1 - f, v = 0; ablation is v = 0 or v = off_mean; clamping is b = +-1;
adding the concept's token-level difference is b = 2, z <- z + alpha v.

:class:`AdditionIntervention` adds one fixed vector at every position of a
module's output (the residual stream, for DiffMean).

The whole state of each is pyvene's ``source_representation`` (float32; shape
(3, width) for experts -- rows w, v, b; (width,) for the added vector).
pyvene's ``IntervenableModel.load`` rebuilds interventions from config fields and
restores only that tensor, so both round-trip through pyvene's own ``save``/``load``.

pyvene has side effects on the model it wraps; :func:`build_intervenable` and
:func:`pyvene_call` undo them (gradients flags, train mode, forward hooks).
"""

from __future__ import annotations

import contextlib
import io
from collections import ChainMap
from typing import Iterator, Mapping

import torch

with contextlib.redirect_stdout(io.StringIO()):  # pyvene prints an nnsight notice to stdout on import
    import pyvene
    from pyvene.models import modeling_utils as _pyvene_modeling
    from pyvene.models.interventions import ConstantSourceIntervention, LocalistRepresentationIntervention

from .units import UnitSite

WEIGHT_ROW, TARGET_ROW, BOUND_ROW = 0, 1, 2
SET, CLAMP_UP, CLAMP_DOWN, SHIFT = 0, 1, -1, 2


class _DimensionTable(ChainMap):
    """pyvene's per-model-class dimension table, answering ``{}`` for classes it lacks.

    ``IntervenableModel.load`` looks the model class up in that table and raises
    KeyError for classes pyvene has no mapping for (gemma3). Interventions on a
    module path need no dimension, so an empty table is the right answer. The
    ChainMap stays a live view of pyvene's dict: registrations made later by
    users are still seen.
    """

    def __missing__(self, key):
        return {}


if not isinstance(_pyvene_modeling.type_to_dimension_mapping, _DimensionTable):
    _pyvene_modeling.type_to_dimension_mapping = _DimensionTable(_pyvene_modeling.type_to_dimension_mapping)


class ExpertIntervention(ConstantSourceIntervention, LocalistRepresentationIntervention):
    """Move each unit of one layer toward a target: ``z <- lerp(z, target, weight)``.

    Build it with :meth:`from_units`. Its state is ``source_representation``,
    float32 of shape (3, width): row 0 the per-unit weight (0 = untouched, 1 =
    move exactly to the target, > 1 overshoots), row 1 the per-unit value in
    activation units, row 2 the bound (0 set, +1 clamp up, -1 clamp down, +2 shift).
    It acts on every position pyvene hands it.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        state = getattr(self, "source_representation", None)
        if state is not None and (state.dim() != 2 or state.shape[0] != 3):
            raise ValueError(f"ExpertIntervention state must have shape (3, width); got {tuple(state.shape)}.")

    @classmethod
    def from_units(cls, width: int, neurons, weights, targets, bounds=0) -> "ExpertIntervention":
        """An intervention on a layer ``width`` units wide that moves ``neurons`` (indices) toward
        ``targets`` (activation units) with ``weights`` (0 = untouched, 1 = all the way); ``bounds``
        0 sets, +1 clamps up (max), -1 clamps down (min), +2 shifts by the target. Other units
        are untouched."""
        neurons = torch.as_tensor(neurons, dtype=torch.long)
        state = torch.zeros(3, width, dtype=torch.float32)
        state[WEIGHT_ROW, neurons] = torch.as_tensor(weights, dtype=torch.float32)
        state[TARGET_ROW, neurons] = torch.as_tensor(targets, dtype=torch.float32)
        state[BOUND_ROW, neurons] = torch.as_tensor(bounds, dtype=torch.float32)
        return cls(source_representation=state)

    @property
    def weight(self) -> torch.Tensor:
        """Per-unit weight, shape (width,)."""
        return self.source_representation[WEIGHT_ROW]

    @property
    def target(self) -> torch.Tensor:
        """Per-unit target value, shape (width,), activation units."""
        return self.source_representation[TARGET_ROW]

    @property
    def bound(self) -> torch.Tensor:
        """Per-unit bound, shape (width,): 0 set, +1 clamp up, -1 clamp down, +2 shift."""
        return self.source_representation[BOUND_ROW]

    def forward(self, base, source=None, subspaces=None, **kwargs):
        weight, target, bound, kind = self._prepared(base.device, base.dtype)
        # One elementwise op per kind when the layer's units share a bound (the usual case):
        # a chain of torch.where over the whole width costs a tenth of a generation step.
        if kind == SHIFT:
            return torch.addcmul(base, weight, target)
        if kind == CLAMP_UP:
            target = torch.maximum(base, target)
        elif kind == CLAMP_DOWN:
            target = torch.minimum(base, target)
        elif kind is None:
            target = torch.where(bound == SHIFT, base + target, torch.where(
                bound == CLAMP_UP, torch.maximum(base, target),
                torch.where(bound == CLAMP_DOWN, torch.minimum(base, target), target)))
        # lerp is exact at both ends: weight 0 returns z, weight 1 returns the target.
        return torch.lerp(base, target, weight)

    def _prepared(self, device: torch.device, dtype: torch.dtype):
        """(weight, target, bound rows on ``device`` in ``dtype``, the bound shared by every unit
        this intervention moves (weight != 0) or None when they differ).

        Asked at every forward of every generation step, so it is cached until the state
        tensor, the device or the dtype changes: splitting and casting the state each call
        cost a third of the intervention's time."""
        state = self.source_representation
        if state is None:
            raise RuntimeError("ExpertIntervention has no state: it was built without source_representation.")
        # the cache holds the state tensor itself, so a new tensor at a freed address never passes for it
        cached = self.__dict__.get("_prepared_cache")
        if cached is None or cached[0] is not state or cached[1] != (state._version, device, dtype):
            # .to is a no-op when device and dtype already match; after pyvene's load the
            # state may be a plain attribute that model.to(...) did not move.
            weight, target, bound = state.to(device, dtype)
            kinds = torch.unique(bound[weight != 0]).tolist()
            kind = int(kinds[0]) if len(kinds) == 1 else (SET if not kinds else None)
            cached = self.__dict__["_prepared_cache"] = (state, (state._version, device, dtype),
                                                         (weight, target, bound, kind))
        return cached[2]

    def __str__(self):
        return f"ExpertIntervention({int((self.weight != 0).sum())} of {self.weight.numel()} units)"


class AdditionIntervention(ConstantSourceIntervention, LocalistRepresentationIntervention):
    """Add one fixed vector at every position: ``h <- h + s`` (DiffMean steering).

    Its state is ``source_representation``, float32 of shape (width,): the vector
    added, in the units of the hooked activation (for a residual stream, factor x
    typical norm x unit direction).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        state = getattr(self, "source_representation", None)
        if state is not None and state.dim() != 1:
            raise ValueError(f"AdditionIntervention state must have shape (width,); got {tuple(state.shape)}.")

    def forward(self, base, source=None, subspaces=None, **kwargs):
        state = self.source_representation
        if state is None:
            raise RuntimeError("AdditionIntervention has no state: it was built without source_representation.")
        return base + state.to(base.device, base.dtype)

    def __str__(self):
        return f"AdditionIntervention(|s| = {float(self.source_representation.norm()):.3g})"


def build_intervenable(model: torch.nn.Module, interventions: Mapping[UnitSite, torch.nn.Module]
                       ) -> "pyvene.IntervenableModel":
    """Wrap ``model`` in a pyvene ``IntervenableModel`` with one intervention per site (on its input).

    pyvene turns off ``requires_grad`` on every parameter and calls ``model.eval()``;
    both are restored here, so the model is as it was apart from being wrapped.
    """
    representations = [
        pyvene.RepresentationConfig(
            component=site.pyvene_component, unit="pos", max_number_of_units=None,
            intervention=intervention, source_representation=intervention.source_representation,
        )
        for site, intervention in interventions.items()
    ]
    requires_grad = [p.requires_grad for p in model.parameters()]
    training = model.training
    try:
        with pyvene_call(model):
            return pyvene.IntervenableModel(pyvene.IntervenableConfig(representations=representations), model)
    finally:
        for p, flag in zip(model.parameters(), requires_grad):
            p.requires_grad_(flag)
        model.train(training)


def _capture_flag_holders(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if "_output_capturing_hooks_installed" in m.__dict__]


@contextlib.contextmanager
def pyvene_call(model: torch.nn.Module) -> Iterator[None]:
    """Run a pyvene call on ``model`` and give the model its own forward hooks back afterwards.

    pyvene removes every forward and pre-forward hook of every submodule at each
    call, including hooks you registered and transformers' output-capturing hooks
    (after which ``output_hidden_states=True`` silently returns nothing). Inside
    the block your hooks are inactive; transformers' capture flags are cleared so
    it re-installs its hooks for the call. On exit every module's hooks and flags
    are restored exactly as they were.
    """
    modules = list(model.modules())
    saved_hooks = [(m, m._forward_hooks.copy(), m._forward_pre_hooks.copy()) for m in modules]
    saved_flags = [(m, m.__dict__["_output_capturing_hooks_installed"]) for m in _capture_flag_holders(model)]
    for m, _ in saved_flags:
        m._output_capturing_hooks_installed = False
    try:
        yield
    finally:
        for m, forward_hooks, pre_hooks in saved_hooks:
            m._forward_hooks.clear()
            m._forward_hooks.update(forward_hooks)
            m._forward_pre_hooks.clear()
            m._forward_pre_hooks.update(pre_hooks)
        for m in _capture_flag_holders(model):
            # hooks installed during the call were wiped by pyvene; only the saved state is true.
            m.__dict__.pop("_output_capturing_hooks_installed")
        for m, flag in saved_flags:
            m._output_capturing_hooks_installed = flag
