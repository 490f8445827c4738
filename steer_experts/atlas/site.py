"""Build the expert atlas: a static site of concepts and the neurons that are their experts.

Pages (all relative links; :mod:`.html` puts every asset inline):

* ``index.html`` -- every concept (experts at tau, best AP, positives, negatives), a search box
  over concepts and ``layer/neuron``, and the AP-by-layer overview of every concept.
* ``concepts/<concept>.html`` -- the top experts, AP by layer, the sentences that drive the top
  experts most with each token shaded by its response, and the nearest concepts by expert overlap.
* ``neurons/L<layer>-N<neuron>.html`` -- one per neuron in some concept's top experts: the concepts
  it is expert for, its responses on their positives vs negatives, its top sentences (shaded where
  it is one of a concept's shaded top experts).
* ``similarity.html`` -- a 2-D layout and a dendrogram of the concepts' centred AP cosine.

Sentences, histograms and token shading need the concept data (``concepts``) and the model: the
pooled responses come from the response cache (the sentences discovery saw are a cache hit), and
the per-token responses from one forward pass over the few sentences shown.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from ..atomic import atomic_write, claim_output_folder, file_safe
from ..concepts import ConceptSet
from ..errors import InvalidArgumentError
from ..experts import ExpertSet
from ..lens.similarity import ap_cosine_similarity, jaccard_similarity
from ..models import LoadedModel
from ..responses import collect_responses, token_responses
from . import html as h

SITE_NAMES = ("index.html", "similarity.html", "atlas.json", "concepts", "neurons")  # what a build writes
TOKEN_BATCH = 32  # sentences per forward pass for token shading


@dataclass
class AtlasReport:
    """What a build wrote: the ``folder``, its number of ``pages``, their total ``bytes`` and the wall
    ``seconds`` it took."""

    folder: Path
    pages: int
    bytes: int
    seconds: float


def _neuron_file(layer: int, neuron: int) -> str:
    return f"L{layer}-N{neuron}.html"


def build_atlas(experts: ExpertSet, out: str | Path, *, model: LoadedModel | None = None,
                concepts: ConceptSet | None = None, top: int = 10, shown_experts: int = 3,
                sentences_per_unit: int = 3, tau: float = 0.5, overwrite: bool = False,
                steer_prompt: str | None = None, steer_ks: Sequence[int] = (10, 50, 200),
                cache_dir: str | Path | None = None, progress: bool = True) -> AtlasReport:
    """Write the atlas of ``experts`` into ``out`` and return what was written.

    Args:
        experts: the expert set (every concept gets a page).
        out: the site's folder; refused if it holds files the atlas did not write (unless ``overwrite``).
        model, concepts: the model and concept data (with the negatives discovery used) for sentences,
            histograms and token shading; without them the pages show statistics only.
        top: experts per concept shown (and given neuron pages).
        shown_experts: top experts per concept whose sentences are shown on the concept page, each
            token shaded by the expert's response (also on the expert's neuron page).
        sentences_per_unit: top-activating sentences per neuron.
        tau: AP threshold of "expert" in counts, labels and the overlap (Jaccard) of concepts.
        steer_prompt: if given (with the model), each concept page shows greedy 40-token continuations of
            it steered with the top-k experts for each of ``steer_ks``, beside the unsteered one.
        cache_dir: root of the response cache (default: the library's).
    """
    start = time.perf_counter()
    if min(top, shown_experts, sentences_per_unit) < 1 or not 0 <= tau < 1:
        raise InvalidArgumentError(f"Need top, shown_experts, sentences_per_unit >= 1 and 0 <= tau < 1; got "
                                   f"{top}, {shown_experts}, {sentences_per_unit}, {tau}.")
    if (model is None) != (concepts is None):
        raise InvalidArgumentError("Give both the model and the concept data (for sentences), or neither.")
    if steer_prompt is not None and (model is None or not steer_prompt.strip() or not steer_ks
                                     or min(steer_ks) < 1):
        raise InvalidArgumentError("Steered samples need the model, a non-empty prompt and ks >= 1.")
    if concepts is not None:
        missing = [c for c in experts.concepts if c not in concepts.names]
        if missing:
            raise InvalidArgumentError(f"The concept data lacks {len(missing)} of the expert set's concepts "
                                       f"({', '.join(missing[:5])}); give the data the experts were found on.")
        concepts = concepts.subset(experts.concepts)
        if any(not len(concepts.negative_indices(i)) for i in range(len(concepts.names))):
            raise InvalidArgumentError("Every concept needs negatives: load the data as discovery did "
                                       "(ConceptSet.with_sampled_negatives).")
    out = claim_output_folder(out, SITE_NAMES, overwrite=overwrite, what="atlas")
    for sub in ("concepts", "neurons"):
        (out / sub).mkdir(exist_ok=True)

    names = experts.concepts
    slugs = _slugs(names)
    selections = {c: experts.select(c, k=min(top, experts.n_units)) for c in names}
    expert_for: dict[int, list[str]] = {}  # each shown unit -> the concepts it is a top expert of
    for c, selection in selections.items():
        for u in selection.units:
            expert_for.setdefault(int(u), []).append(c)
    units = sorted(expert_for)
    shaded = sorted({int(u) for s in selections.values() for u in s.units[:shown_experts]})
    evidence = (_Evidence(experts, model, concepts, units, shaded, sentences_per_unit, cache_dir, progress)
                if model else None)

    samples = _steered_samples(experts, model, steer_prompt, steer_ks, progress) if steer_prompt else {}
    pages: dict[str, str] = {}
    pages["index.html"] = _index_page(experts, expert_for, slugs, tau)
    pages["similarity.html"] = _similarity_page(experts, slugs)
    overlap = jaccard_similarity(experts, tau) if len(names) > 1 else None
    for c in tqdm(names, desc="concept pages", disable=not progress or len(names) < 20):
        pages[f"concepts/{slugs[c]}"] = _concept_page(experts, c, selections[c], overlap, slugs, shown_experts,
                                                      tau, evidence, samples.get(c))
    for u in tqdm(units, desc="neuron pages", disable=not progress or len(units) < 200):
        pages[f"neurons/{_neuron_file(*_locate(experts, u))}"] = _neuron_page(experts, u, expert_for[u], slugs,
                                                                            evidence)
    for name, text in pages.items():
        atomic_write(out / name, lambda p, text=text: p.write_text(text, encoding="utf-8"))
    manifest = {"pages": sorted(pages), "model": experts.model_name, "concepts": names, "top": top, "tau": tau}
    for name in set(_pages_written(out)) - set(pages):  # an earlier build's pages that this one has not
        (out / name).unlink(missing_ok=True)
    atomic_write(out / "atlas.json", lambda p: p.write_text(json.dumps(manifest, indent=1)))
    size = sum((out / name).stat().st_size for name in pages)
    return AtlasReport(out, len(pages), size, time.perf_counter() - start)


def _pages_written(out: Path) -> list[str]:
    """The pages an earlier build listed in ``atlas.json`` (none if it is missing or unreadable)."""
    try:
        pages = json.loads((out / "atlas.json").read_text())["pages"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [p for p in pages if isinstance(p, str) and p.endswith(".html") and ".." not in p]


def _slugs(names: list[str]) -> dict[str, str]:
    slugs, used = {}, set()
    for name in names:
        base = file_safe(name, last=60) or "concept"
        slug, n = base, 1
        while slug.lower() in used:  # case-insensitive file systems would merge them
            n += 1
            slug = f"{base}-{n}"
        used.add(slug.lower())
        slugs[name] = slug + ".html"
    return slugs


def _locate(experts: ExpertSet, unit: int) -> tuple[int, int]:
    return int(experts.layer[unit]), int(experts.neuron[unit])


class _Evidence:
    """Pooled responses of the units shown (from the response cache) and their top sentences; for the
    ``shaded`` units (each concept's top experts), those sentences' per-token responses from one
    forward pass, sentences sorted by length so that batches carry little padding."""

    def __init__(self, experts: ExpertSet, model: LoadedModel, concepts: ConceptSet, units: list[int],
                 shaded: list[int], per_unit: int, cache_dir: str | Path | None, progress: bool):
        meta = experts.metadata
        max_length = meta.get("max_length", 128)
        self.concepts = concepts
        self.sentences = concepts.sentences
        responses = collect_responses(model, self.sentences, pooling=meta.get("pooling", "max"),
                                      max_length=max_length, cache_dir=cache_dir, progress=progress)
        self.column = {u: j for j, u in enumerate(units)}
        self.pooled = responses.take(units)  # (n_sentences, len(units))
        self.top = {u: np.argsort(-self.pooled[:, j], kind="stable")[:per_unit] for u, j in self.column.items()}
        self.shaded = {u: j for j, u in enumerate(shaded)}
        rows = sorted({int(i) for u in shaded for i in self.top[u]}, key=lambda r: len(self.sentences[r]))
        self.tokens: dict[int, dict] = {}
        for b in tqdm(range(0, len(rows), TOKEN_BATCH), desc="token responses", disable=not progress):
            batch = rows[b:b + TOKEN_BATCH]
            found = token_responses(model, [self.sentences[r] for r in batch], shaded, max_length=max_length)
            self.tokens.update(zip(batch, found))

    def sentences_of(self, unit: int) -> str:
        """The unit's top sentences with their pooled responses; each token shaded by the unit's
        response there if the unit is one of the shaded."""
        j, rows = self.column[unit], self.top[unit]
        if unit not in self.shaded:
            return "".join(f'<div class="sentence">{h.esc(self.sentences[r])}</div>'
                           f'<p class="muted">pooled response {self.pooled[r, j]:.3f}</p>' for r in rows)
        k = self.shaded[unit]
        scale = max(float(self.tokens[r]["values"][:, k].max()) for r in rows)
        return "".join(h.highlighted(self.tokens[r]["tokens"], self.tokens[r]["values"][:, k], scale)
                       + f'<p class="muted">pooled response {self.pooled[r, j]:.3f}</p>' for r in rows)

    def split(self, unit: int, concept_index: int) -> dict[str, np.ndarray]:
        """The unit's pooled responses on the concept's positives and negatives."""
        j = self.column[unit]
        return {"positives": self.pooled[self.concepts.positive_indices(concept_index), j],
                "negatives": self.pooled[self.concepts.negative_indices(concept_index), j]}


def _steered_samples(experts: ExpertSet, model: LoadedModel, prompt: str, ks: Sequence[int],
                     progress: bool) -> dict[str, list[tuple[str, str]]]:
    """Per concept: (setting, greedy continuation of ``prompt``) unsteered and at each k."""
    from ..steering import steer

    plain = steer(model, experts, experts.concepts[0], k=0).complete([prompt])[0]
    out = {}
    for c in tqdm(experts.concepts, desc="steered samples", disable=not progress):
        out[c] = [("unsteered", plain)] + [(f"k = {k}", steer(model, experts, c, k=k).complete([prompt])[0])
                                           for k in ks]
    return out


def _ap_by_layer(experts: ExpertSet, c: int) -> tuple[list[int], np.ndarray]:
    layers = [s.layer for s in experts.sites]
    ap = experts.expertise.ap[c]
    return layers, np.array([ap[experts.layer == layer].max() for layer in layers])


def _index_page(experts: ExpertSet, expert_for: dict[int, list[str]], slugs, tau: float) -> str:
    e = experts.expertise
    rows = []
    for c, name in enumerate(experts.concepts):
        rows.append([f'<a href="concepts/{h.esc(slugs[name])}">{h.esc(name)}</a>', str(int((e.ap[c] > tau).sum())),
                     f"{e.ap[c].max():.3f}", str(int(e.n_positives[c])), str(int(e.n_negatives[c]))])
    layers = [s.layer for s in experts.sites]
    overview = np.stack([_ap_by_layer(experts, c)[1] for c in range(len(experts.concepts))])
    index_concepts = [{"name": n, "href": f"concepts/{slugs[n]}", "what": "concept"} for n in experts.concepts]
    neurons = []
    for unit, concepts in expert_for.items():
        layer, neuron = _locate(experts, unit)
        neurons.append({"name": f"L{layer}/N{neuron}", "href": f"neurons/{_neuron_file(layer, neuron)}",
                        "what": ", ".join(concepts)})
    body = (f'<p>{len(experts.concepts)} concepts over {experts.n_units:,} units of <b>{h.esc(experts.model_name)}</b>. '
            f'An expert is a unit whose AP at telling a concept\'s sentences from others exceeds {tau:g}.</p>'
            '<p><label for="search">Search concepts, or a neuron as layer/neuron (e.g. 12/345): </label>'
            '<input id="search" type="search" autocomplete="off"></p><ul id="results" aria-live="polite"></ul>'
            + h.index_data(index_concepts, neurons)
            + "<h2>Concepts</h2>" + h.table(["concept", f"experts (AP > {tau:g})", "best AP", "positives", "negatives"],
                                            rows, [False, True, True, True, True])
            + "<h2>Best AP by layer</h2>"
            + h.heatmap(experts.concepts, [str(layer) for layer in layers], overview, "Best AP in each layer, per concept",
                        [f"concepts/{slugs[n]}" for n in experts.concepts]))
    return h.page("Expert atlas", body, script=h.SEARCH_SCRIPT)


def _concept_page(experts: ExpertSet, name: str, selection, overlap, slugs, shown: int, tau: float,
                  evidence: _Evidence | None, samples: list[tuple[str, str]] | None) -> str:
    e = experts.expertise
    c = experts.concept_index(name)
    rows = [[str(r["rank"]), f'<a href="../neurons/{_neuron_file(r["layer"], r["neuron"])}">L{r["layer"]}/N{r["neuron"]}</a>',
             f'{r["ap"]:.3f}', f'{r["auroc"]:.3f}', f'{r["on_p50"]:.3f}', f'{r["off_mean"]:.3f}']
            for r in selection.table()]
    layers, best = _ap_by_layer(experts, c)
    body = (f"<p>{int(e.n_positives[c])} positive and {int(e.n_negatives[c])} negative sentences; "
            f"{int((e.ap[c] > tau).sum())} units with AP &gt; {tau:g}.</p><h2>Top experts</h2>"
            + h.table(["rank", "neuron", "AP", "AUROC", "median on positives", "mean on negatives"], rows,
                      [True, False, True, True, True, True])
            + "<h2>AP by layer</h2>" + h.bar_chart([str(x) for x in layers], best, f"Best AP per layer for {name}"))
    if evidence is not None:
        body += "<h2>Why the top experts fire</h2>"
        for layer, neuron, unit in list(zip(selection.layer, selection.neuron, selection.units))[:shown]:
            body += (f'<h3><a href="../neurons/{_neuron_file(layer, neuron)}">L{layer}/N{neuron}</a></h3>'
                     + evidence.sentences_of(int(unit)))
    if samples:
        body += ("<h2>Steered toward this concept</h2><p>Greedy continuations; the top-k experts set to their "
                 "median response on positives at every position.</p>"
                 + h.table(["setting", "continuation"], [[h.esc(k), h.esc(text)] for k, text in samples]))
    if overlap is not None:
        near = [(other, v) for other, v in overlap.nearest(name, k=5) if np.isfinite(v)]
        body += f"<h2>Nearest concepts (Jaccard overlap of experts at AP &gt; {tau:g})</h2>"
        body += (h.table(["concept", "overlap"], [[f'<a href="{h.esc(slugs[o])}">{h.esc(o)}</a>', f"{v:.3f}"]
                                                  for o, v in near], [False, True])
                 if near else "<p>No overlap is defined: this concept or the others have no experts at this AP.</p>")
    return h.page(f"Concept: {name}", body, root="../")


def _neuron_page(experts: ExpertSet, unit: int, expert_for: list[str], slugs, evidence: _Evidence | None) -> str:
    layer, neuron = _locate(experts, unit)
    e = experts.expertise
    rows = [[f'<a href="../concepts/{h.esc(slugs[c])}">{h.esc(c)}</a>', f"{e.ap[experts.concept_index(c), unit]:.3f}",
             f"{e.auroc[experts.concept_index(c), unit]:.3f}"] for c in expert_for]
    body = ("<h2>Expert for</h2>" + h.table(["concept", "AP", "AUROC"], rows, [False, True, True]))
    if evidence is not None:
        body += "<h2>Responses on positives and negatives</h2>"
        for c in expert_for:
            body += h.histogram(evidence.split(unit, experts.concept_index(c)),
                                f"Pooled responses of L{layer}/N{neuron} on {c} sentences")
        body += "<h2>Top-activating sentences</h2>" + evidence.sentences_of(unit)
    return h.page(f"Neuron L{layer}/N{neuron}", body, root="../")


def _similarity_page(experts: ExpertSet, slugs) -> str:
    names = experts.concepts
    if len(names) < 3:
        return h.page("Similarity map", "<p>A map needs at least three concepts.</p>")
    from scipy.cluster.hierarchy import dendrogram, linkage
    from scipy.spatial.distance import squareform

    sim = ap_cosine_similarity(experts, centred=True)
    values = np.nan_to_num(sim.values, nan=0.0)
    distance = np.clip(1.0 - values, 0.0, 2.0)
    np.fill_diagonal(distance, 0.0)
    # classical MDS: the top two eigenvectors of the double-centred squared distances
    n = len(names)
    centre = np.eye(n) - 1.0 / n
    eigvals, eigvecs = np.linalg.eigh(-0.5 * centre @ (distance ** 2) @ centre)
    points = eigvecs[:, -2:] * np.sqrt(np.clip(eigvals[-2:], 0.0, None))
    tree = dendrogram(linkage(squareform(distance, checks=False), "average"), no_plot=True, labels=names)
    rows = [[f'<a href="concepts/{h.esc(slugs[r["concept"]])}">{h.esc(r["concept"])}</a>',
             ", ".join(f"{h.esc(o)} ({v:.2f})" for o, v in r["neighbours"])] for r in sim.nearest_table(k=3)]
    body = ("<p>Similarity is the cosine of two concepts' AP vectors over every unit, each unit's mean over the "
            "concepts subtracted (centred AP cosine); distance is 1 minus it.</p>"
            + h.scatter(points, names, [f"concepts/{slugs[c]}" for c in names], "Concepts placed by similarity")
            + "<h2>Dendrogram (average linkage)</h2>"
            + h.dendrogram(tree["icoord"], tree["dcoord"], tree["ivl"], "Dendrogram of the concepts")
            + "<h2>Nearest concepts</h2>" + h.table(["concept", "nearest (similarity)"], rows))
    return h.page("Similarity map", body)
