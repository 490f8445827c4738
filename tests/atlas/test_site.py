"""The atlas on a tiny model: every page is written, every link resolves, nothing points off the file
system, the shaded tokens are the model's own per-token responses, and bad input writes nothing."""

from __future__ import annotations

import html
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from steer_experts.atlas import build_atlas
from steer_experts.errors import InvalidArgumentError, OutputFolderError
from steer_experts.responses import token_responses
from steer_experts.units import locate_units

from .conftest import TOPICS

class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.urls += [v for k, v in attrs if k in ("href", "src") and v is not None]


def _links(path: Path) -> list[str]:
    parser = _Links()
    parser.feed(path.read_text())
    return parser.urls


def test_every_page_is_written_and_every_link_resolves(site):
    report, _, _, experts = site
    folder = report.folder
    pages = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.html"))
    assert pages == json.loads((folder / "atlas.json").read_text())["pages"]
    neurons = {f"L{layer}-N{neuron}.html" for c in experts.concepts
               for layer, neuron in zip(experts.select(c, k=4).layer, experts.select(c, k=4).neuron)}
    assert sorted(p.name for p in (folder / "neurons").iterdir()) == sorted(neurons)
    assert len(list((folder / "concepts").iterdir())) == 4 and report.pages == len(pages) == 2 + 4 + len(neurons)
    for page in pages:
        for url in _links(folder / page):
            assert not re.match(r"^[a-z]+:", url), f"{page} points off the file system: {url}"
            assert (folder / page).parent.joinpath(url.split("#")[0]).resolve().is_file(), f"{page}: {url}"
    assert report.bytes == sum((folder / p).stat().st_size for p in pages)


def test_the_index_lists_every_concept_and_searchable_neuron(site):
    report, _, _, experts = site
    text = (report.folder / "index.html").read_text()
    index = json.loads(re.search(r'id="atlas-index">(.*?)</script>', text, re.S).group(1))
    assert [c["name"] for c in index["concepts"]] == list(TOPICS)
    sel = experts.select("rain", k=4)
    entry = next(n for n in index["neurons"] if n["name"] == f"L{sel.layer[0]}/N{sel.neuron[0]}")
    assert "rain" in entry["what"] and (report.folder / entry["href"]).is_file()
    for name in TOPICS:
        assert f">{name}</a>" in text


def test_shaded_tokens_are_the_units_own_responses(site):
    """A concept page shades its top expert's top sentence with the per-token responses that a plain
    forward hook reads, and that sentence is the one with the highest pooled (max) response."""
    report, model, concepts, experts = site
    sel = experts.select("dogs", k=4)
    layer, neuron, unit = int(sel.layer[0]), int(sel.neuron[0]), int(sel.units[0])
    page = (report.folder / "concepts" / "dogs.html").read_text()
    block = page.split(f">L{layer}/N{neuron}</a></h3>")[1]
    first = re.search(r'<div class="sentence">(.*?)</div>', block).group(1)
    shown = [float(v) for v in re.findall(r'data-value="([-0-9.e]+)"', first)]
    text = "".join(re.findall(r'>([^<]*)</span>', first)).replace("&#x27;", "'")

    site_ = locate_units(model.model)[layer]
    seen = {}

    def read(_module, args):
        seen["x"] = args[0][0, :, neuron].detach().clone()

    handle = model.model.get_submodule(site_.module_path).register_forward_pre_hook(read)
    try:
        with torch.no_grad():
            model.model(**model.tokenizer(text, return_tensors="pt"))
    finally:
        handle.remove()
    np.testing.assert_allclose(shown, seen["x"].numpy(), atol=1e-4)
    pooled = {s: token_responses(model, [s], [unit])[0]["values"].max() for s in concepts.sentences}
    assert text == max(pooled, key=pooled.get)


def test_bad_input_writes_nothing(atlas_inputs, tmp_path):
    model, concepts, experts, cache = atlas_inputs
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(OutputFolderError, match="did not write"):
        build_atlas(experts, foreign, progress=False)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    with pytest.raises(InvalidArgumentError, match="lacks 1 of the expert set's concepts"):
        build_atlas(experts, tmp_path / "a", model=model, concepts=concepts.subset(["dogs", "rain", "music"]),
                    progress=False)
    with pytest.raises(InvalidArgumentError, match="both the model and the concept data"):
        build_atlas(experts, tmp_path / "b", model=model, progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_statistics_only_without_data_and_a_rebuild_replaces_its_own_files(atlas_inputs, tmp_path):
    _, _, experts, _ = atlas_inputs
    first = build_atlas(experts, tmp_path / "s", top=3, progress=False)
    again = build_atlas(experts, tmp_path / "s", top=1, progress=False)
    assert again.pages < first.pages and 'class="tok"' not in (tmp_path / "s" / "concepts" / "dogs.html").read_text()
    written = sorted(p.relative_to(tmp_path / "s").as_posix() for p in (tmp_path / "s").rglob("*.html"))
    assert written == json.loads((tmp_path / "s" / "atlas.json").read_text())["pages"]  # no stale pages left
    assert "<svg" in (tmp_path / "s" / "similarity.html").read_text()


def test_the_command_writes_the_site_and_refuses_bad_options(atlas_inputs, tmp_path, capsys):
    from steer_experts.cli import main

    _, _, experts, _ = atlas_inputs
    saved = experts.save_pretrained(tmp_path / "experts")
    assert main(["atlas", "--experts", str(saved), "--out", str(tmp_path / "site"), "--top", "2"]) == 0
    out = capsys.readouterr().out
    pages = json.loads((tmp_path / "site" / "atlas.json").read_text())["pages"]
    assert f"Wrote {len(pages)} pages" in out and (tmp_path / "site" / "index.html").as_uri() in out
    with pytest.raises(SystemExit) as exit_:
        main(["atlas", "--experts", str(saved), "--out", str(tmp_path / "other"), "--tau", "1.5"])
    assert exit_.value.code == 2 and "must be in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_steered_samples_sit_beside_the_unsteered_one(atlas_inputs, tmp_path):
    from steer_experts.steering import steer

    model, concepts, experts, cache = atlas_inputs
    build_atlas(experts, tmp_path / "s", model=model, concepts=concepts, top=2, steer_prompt="The day began",
                steer_ks=(1, 5), cache_dir=cache, progress=False)
    page = (tmp_path / "s" / "concepts" / "rain.html").read_bytes().decode()  # no newline translation
    table = page.split("<h2>Steered toward this concept</h2>")[1].split("</table>")[0]
    cells = re.findall(r"<td>(.*?)</td>", table, re.S)
    expected = ["unsteered", steer(model, experts, "rain", k=0).complete(["The day began"])[0],
                "k = 1", steer(model, experts, "rain", k=1).complete(["The day began"])[0],
                "k = 5", steer(model, experts, "rain", k=5).complete(["The day began"])[0]]
    assert [html.unescape(c) for c in cells] == expected and expected[1] != expected[5]
    with pytest.raises(InvalidArgumentError, match="Steered samples need the model"):
        build_atlas(experts, tmp_path / "t", steer_prompt="The day began", progress=False)
