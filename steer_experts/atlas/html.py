"""The atlas's HTML: one page shell, tables, inline SVG charts and highlighted tokens.

Everything a page needs is inside it (style, script, charts), so the site opens from the file
system with no server and makes no request. Every chart is an ``<svg role="img">`` with a
``<title>`` and ``<desc>`` that say in words what it shows; numbers a reader may want to copy are
in real tables beside the charts.
"""

from __future__ import annotations

import html
import json
from typing import Sequence

import numpy as np

STYLE = """
body{font-family:system-ui,sans-serif;margin:0 auto;max-width:70rem;padding:1rem 1.5rem;color:#1b1b1b}
nav{margin-bottom:1rem;font-size:.9rem} nav a{margin-right:1rem}
table{border-collapse:collapse;margin:.5rem 0 1.5rem} th,td{padding:.2rem .6rem;border-bottom:1px solid #ddd;
text-align:left} td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.tok{border-radius:2px} .sentence{margin:.25rem 0;line-height:1.7}
.muted{color:#666;font-size:.9rem} #search{font-size:1rem;padding:.3rem;width:22rem}
#results li{margin:.15rem 0} svg{max-width:100%;height:auto} h2{margin-top:2rem}
"""

SEARCH_SCRIPT = """
(function () {
  const box = document.getElementById("search"), list = document.getElementById("results");
  const index = JSON.parse(document.getElementById("atlas-index").textContent);
  function matches(q) {
    q = q.trim().toLowerCase();
    if (!q) return [];
    const unit = q.match(/^l?(\\d+)\\s*[\\/:,\\s]\\s*n?(\\d+)$/);
    if (unit) {
      const name = "L" + unit[1] + "/N" + unit[2];
      return index.neurons.filter(n => n.name.toLowerCase() === name.toLowerCase());
    }
    return index.concepts.filter(c => c.name.toLowerCase().includes(q))
      .concat(index.neurons.filter(n => n.name.toLowerCase().includes(q))).slice(0, 50);
  }
  box.addEventListener("input", function () {
    list.replaceChildren();
    for (const hit of matches(box.value)) {
      const li = document.createElement("li"), a = document.createElement("a");
      a.href = hit.href; a.textContent = hit.name + (hit.what ? " (" + hit.what + ")" : "");
      li.appendChild(a); list.appendChild(li);
    }
  });
})();
"""


def esc(text) -> str:
    """``text`` made safe inside HTML (quotes included)."""
    return html.escape(str(text), quote=True)


def page(title: str, body: str, *, root: str = "", script: str = "") -> str:
    """A whole HTML page: ``title``, ``body`` (HTML), links relative to the site's root via ``root``
    ("" at the root, "../" one folder down) and an optional inline ``script``."""
    nav = (f'<nav><a href="{root}index.html">Atlas index</a>'
           f'<a href="{root}similarity.html">Similarity map</a></nav>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
            f"<style>{STYLE}</style></head><body>{nav}<main><h1>{esc(title)}</h1>{body}</main>"
            + (f"<script>{script}</script>" if script else "") + "</body></html>\n")


def table(headers: Sequence[str], rows: Sequence[Sequence], numeric: Sequence[bool] | None = None,
          caption: str = "") -> str:
    """An HTML table; cells are HTML already (use :func:`esc` for text); ``numeric`` columns align right."""
    numeric = numeric or [False] * len(headers)
    cls = [' class="n"' if n else "" for n in numeric]
    head = "".join(f'<th scope="col"{c}>{esc(h)}</th>' for h, c in zip(headers, cls))
    body = "".join("<tr>" + "".join(f"<td{c}>{cell}</td>" for cell, c in zip(row, cls)) + "</tr>" for row in rows)
    return (f"<table>{f'<caption>{esc(caption)}</caption>' if caption else ''}"
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def _svg(width: int, height: int, title: str, desc: str, content: str) -> str:
    return (f'<svg role="img" aria-label="{esc(title)}" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" xmlns="http://www.w3.org/2000/svg"><title>{esc(title)}</title>'
            f"<desc>{esc(desc)}</desc>{content}</svg>")


def bar_chart(labels: Sequence[str], values: Sequence[float], title: str, *, y_max: float = 1.0,
              y_label: str = "AP") -> str:
    """Vertical bars (values in [0, ``y_max``]), one per label; the description names the highest."""
    values = np.asarray(values, dtype=float)
    width, height, pad = max(320, 18 * len(values) + 60), 200, 40
    step = (width - pad - 10) / max(1, len(values))
    bars = []
    for i, (label, v) in enumerate(zip(labels, values)):
        h = 0 if not np.isfinite(v) else (height - 2 * pad) * min(v, y_max) / y_max
        x = pad + i * step
        bars.append(f'<rect x="{x:.1f}" y="{height - pad - h:.1f}" width="{0.8 * step:.1f}" height="{h:.1f}" '
                    f'fill="#3b6ea8"><title>{esc(label)}: {v:.3f}</title></rect>')
        if len(values) <= 40 or i % 5 == 0:
            bars.append(f'<text x="{x + 0.4 * step:.1f}" y="{height - pad + 14}" font-size="9" '
                        f'text-anchor="middle">{esc(label)}</text>')
    axis = (f'<line x1="{pad}" y1="{height - pad}" x2="{width - 10}" y2="{height - pad}" stroke="#333"/>'
            f'<text x="4" y="{pad - 8}" font-size="10">{esc(y_label)} (max {y_max:g})</text>'
            f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#333"/>')
    best = int(np.nanargmax(values)) if len(values) and np.isfinite(values).any() else None
    desc = f"{len(values)} bars." + (f" Highest: {labels[best]} at {values[best]:.3f}." if best is not None else "")
    return _svg(width, height, title, desc, axis + "".join(bars))


def heatmap(rows: Sequence[str], columns: Sequence[str], values: np.ndarray, title: str,
            row_links: Sequence[str] | None = None) -> str:
    """A rows x columns grid shaded by value in [0, 1] (white to dark blue); rows link to ``row_links``."""
    cell, left, top = 12, 110, 30
    width, height = left + cell * len(columns) + 10, top + cell * len(rows) + 10
    parts = []
    for j, c in enumerate(columns):
        if len(columns) <= 40 or j % 5 == 0:
            parts.append(f'<text x="{left + j * cell + cell / 2}" y="{top - 6}" font-size="8" '
                         f'text-anchor="middle">{esc(c)}</text>')
    for i, r in enumerate(rows):
        label = f'<text x="{left - 4}" y="{top + i * cell + 9}" font-size="9" text-anchor="end">{esc(r)}</text>'
        parts.append(f'<a href="{esc(row_links[i])}">{label}</a>' if row_links else label)
        for j, c in enumerate(columns):
            v = float(values[i, j])
            shade = 255 - int(200 * min(max(v, 0.0), 1.0))
            parts.append(f'<rect x="{left + j * cell}" y="{top + i * cell}" width="{cell - 1}" height="{cell - 1}" '
                         f'fill="rgb({shade},{shade},255)"><title>{esc(r)}, {esc(c)}: {v:.3f}</title></rect>')
    i, j = np.unravel_index(int(np.nanargmax(values)), values.shape)
    desc = (f"{len(rows)} rows by {len(columns)} columns; darker is higher. Highest: {rows[i]} at "
            f"{columns[j]} ({values[i, j]:.3f}).")
    return _svg(width, height, title, desc, "".join(parts))


def histogram(groups: dict[str, np.ndarray], title: str, *, bins: int = 30) -> str:
    """Overlaid histograms of each group's values (same bins), as outlined steps, with a legend."""
    colours = ["#c0392b", "#7f8c8d", "#2874a6", "#27ae60"]
    finite = np.concatenate([v[np.isfinite(v)] for v in groups.values()])
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
    width, height, pad = 360, 170, 30
    counts = {g: np.histogram(v, edges)[0] / max(1, len(v)) for g, v in groups.items()}
    top = max(float(c.max()) for c in counts.values()) or 1.0
    parts, desc = [], []
    for k, (g, c) in enumerate(counts.items()):
        xs = pad + (width - 2 * pad) * np.arange(bins + 1) / bins
        ys = height - pad - (height - 2 * pad) * c / top
        path = f"M{xs[0]:.1f},{height - pad}" + "".join(
            f"L{xs[i]:.1f},{ys[i]:.1f}L{xs[i + 1]:.1f},{ys[i]:.1f}" for i in range(bins)) + f"L{xs[-1]:.1f},{height - pad}"
        parts.append(f'<path d="{path}" fill="none" stroke="{colours[k % 4]}" stroke-width="1.5"/>'
                     f'<text x="{width - pad}" y="{14 + 12 * k}" font-size="10" text-anchor="end" '
                     f'fill="{colours[k % 4]}">{esc(g)}</text>')
        v = groups[g]
        desc.append(f"{g}: {len(v)} sentences, median {np.median(v):.3f}" if len(v) else f"{g}: none")
    parts.append(f'<text x="{pad}" y="{height - 8}" font-size="9">{lo:.3g}</text>'
                 f'<text x="{width - pad}" y="{height - 8}" font-size="9" text-anchor="end">{hi:.3g}</text>')
    return _svg(width, height, title, "; ".join(desc) + ".", "".join(parts))


def highlighted(tokens: Sequence[str], values: np.ndarray, scale: float) -> str:
    """A sentence with each token shaded by its value relative to ``scale`` (the unit's largest value
    shown), the value in the token's tooltip and in a visually hidden aria label."""
    out = []
    for token, v in zip(tokens, values):
        alpha = 0.0 if scale <= 0 else max(0.0, min(1.0, float(v) / scale))
        out.append(f'<span class="tok" data-value="{float(v):.4f}" title="{float(v):.3f}" '
                   f'style="background:rgba(230,126,34,{alpha:.2f})">{esc(token)}</span>')
    return '<div class="sentence">' + "".join(out) + "</div>"


def scatter(points: np.ndarray, labels: Sequence[str], links: Sequence[str], title: str) -> str:
    """A 2-D layout of labelled points (each links to its page)."""
    width = height = 520
    pad = 40
    lo, hi = points.min(axis=0), points.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    xy = pad + (width - 2 * pad) * (points - lo) / span
    parts = [f'<a href="{esc(link)}"><circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="#3b6ea8"/>'
             f'<text x="{x + 6:.1f}" y="{y + 3:.1f}" font-size="10">{esc(label)}</text></a>'
             for (x, y), label, link in zip(xy, labels, links)]
    return _svg(width, height, title, f"{len(labels)} concepts placed so that similar ones lie close; "
                "the table below lists each concept's nearest.", "".join(parts))


def dendrogram(icoord: Sequence[Sequence[float]], dcoord: Sequence[Sequence[float]], leaves: Sequence[str],
               title: str) -> str:
    """A dendrogram drawn from scipy's ``dendrogram(no_plot=True)`` coordinates (leaves at the bottom)."""
    width, height, pad, bottom = max(400, 14 * len(leaves) + 40), 300, 20, 90
    x_max = 10 * len(leaves)
    d_max = max((max(d) for d in dcoord), default=1.0) or 1.0
    def x(v): return pad + (width - 2 * pad) * v / x_max
    def y(v): return height - bottom - (height - bottom - pad) * v / d_max
    parts = [f'<polyline fill="none" stroke="#333" points="'
             + " ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in zip(ic, dc)) + '"/>'
             for ic, dc in zip(icoord, dcoord)]
    parts += [f'<text transform="translate({x(5 + 10 * i):.1f},{height - bottom + 6}) rotate(60)" '
              f'font-size="9">{esc(leaf)}</text>' for i, leaf in enumerate(leaves)]
    return _svg(width, height, title, "Leaves left to right: " + ", ".join(leaves) + ".", "".join(parts))


def index_data(concepts: Sequence[dict], neurons: Sequence[dict]) -> str:
    """The search index as an inline JSON block (``<script type="application/json">``): read
    without a request, which ``file://`` pages may not make."""
    data = json.dumps({"concepts": list(concepts), "neurons": list(neurons)}).replace("</", "<\\/")
    return f'<script type="application/json" id="atlas-index">{data}</script>'
