"""Figures for people: what a table of 46,080 numbers cannot show at a glance."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from typing import Callable, Sequence  # noqa: E402

from .experts import ExpertSet  # noqa: E402


def save_figure(fig, path: str | Path, dpi: int = 120, rect: tuple | None = None) -> Path:
    """Lay out ``fig`` (within ``rect`` of the figure, when a legend sits beside it), save it as a PNG
    at ``path`` and close it, so a long run does not keep every figure in memory; returns the path."""
    fig.tight_layout(**({"rect": rect} if rect else {}))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


def concept_panels(names: Sequence[str], draw: Callable, path: str | Path, title: str, *, width: float = 5.0,
                   height: float = 4.0, min_width: float = 6.5, sharey: bool = False) -> Path:
    """A row of panels, one per concept of ``names``: ``draw(ax, name)`` fills each; ``title`` above
    them all; saved as a PNG at ``path`` (sizes in inches)."""
    fig, axes = plt.subplots(1, len(names), figsize=(max(min_width, width * len(names)), height), squeeze=False,
                             sharey=sharey)
    for ax, name in zip(axes[0], names):
        draw(ax, name)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_ap_by_layer(expert_set: ExpertSet, path: str | Path, tau: float = 0.5) -> Path:
    """Save a PNG: per concept, the best AP in each layer (line) and how many units have AP > tau (bars)."""
    n_layers = len(expert_set.sites)
    concepts = expert_set.concepts
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 0.3 * n_layers + 3), 6), sharex=True)
    width = 0.8 / len(concepts)
    for i, concept in enumerate(concepts):
        ap = expert_set.expertise.ap[expert_set.concept_index(concept)]
        best = [ap[expert_set.layer == layer].max() for layer in range(n_layers)]
        above = [(ap[expert_set.layer == layer] > tau).sum() for layer in range(n_layers)]
        top.plot(range(n_layers), best, marker="o", ms=3, label=concept)
        bottom.bar(np.arange(n_layers) + (i - (len(concepts) - 1) / 2) * width, above, width=width, label=concept)
    top.set_ylabel("best AP in layer")
    top.set_ylim(0, 1.02)
    top.legend(fontsize=8, ncol=min(4, len(concepts)))
    top.set_title(f"Expert neurons by layer ({expert_set.model_name}, {expert_set.n_units} units)")
    bottom.set_ylabel(f"units with AP > {tau}")
    bottom.set_xlabel("layer")
    return save_figure(fig, path)
