"""Concept data written by a local instruct model: word matching, filtering, seeding, resuming."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from steer_experts.writing import (
    DROP_REASONS, ConceptWriter, WritingSettings, round_prompts, round_seed, sentence_problem, split_sentences,
    write_concepts,
)
from steer_experts.words import mention_pattern, mentions
from steer_experts.concepts import ConceptDataError, ConceptSet
from steer_experts.models import LoadedModel

from ..conftest import tiny_config


@pytest.mark.parametrize("sentence, word, expected", [
    ("She sits on the old chair.", "sitting", True),
    ("He was sitting by the door.", "sit", True),
    ("The sites are busy today.", "sitting", False),
    ("Flowers bloom in May.", "flower", True),
    ("The flower is red.", "flowers", True),
    ("Berries are sweet.", "berry", True),
    ("He looked happier than ever.", "happy", True),
    ("The cat's toy was lost.", "cat", True),
    ("The catalog arrived.", "cat", False),
    ("Cut the paper into strips.", "stripes", False),
    ("The DOG barked.", "dog", True),
    ("A hot-dog stand.", "dog", False),
])
def test_mentions(sentence, word, expected):
    assert mentions(sentence, word) is expected


def test_split_sentences_removes_list_markers():
    text = "Here are five facts:\n1. Dogs bark loudly. Cats meow!\n2) \"Dogs are fun.\" They run.\n- A dog sleeps"
    assert split_sentences(text) == ["Here are five facts:", "Dogs bark loudly.", "Cats meow!", "\"Dogs are fun.\"",
                                     "They run.", "A dog sleeps"]


def test_split_sentences_does_not_end_a_sentence_at_a_title():
    text = "Dr. Lee met Mrs. Park at St. Mary's. She is a doctor, e.g. for children. Bye now."
    assert split_sentences(text) == ["Dr. Lee met Mrs. Park at St. Mary's.", "She is a doctor, e.g. for children.",
                                     "Bye now."]


def test_sentence_problem_without_a_pattern_needs_no_mention():
    assert sentence_problem("The cat sleeps on the mat.", None, 4, 20) is None
    assert sentence_problem("The cat sleeps on", None, 4, 20) == "incomplete"


@pytest.mark.parametrize("sentence, reason", [
    ("A dog sleeps on the mat", "incomplete"),
    ("Dogs bark.", "too_short"),
    ("The dog " + "ran very far " * 15 + "away.", "too_long"),
    ("The dog is happy today \U0001F436.", "symbols"),
    ("The cat sleeps on the mat.", "no_mention"),
    ("No fact about \"dog\" is known.", "quoted"),
    ("The last word is \"dog\".", "quoted"),
    ("The dog sleeps on the mat.", None),
])
def test_sentence_problem(sentence, reason):
    assert sentence_problem(sentence, mention_pattern("dog"), 4, 20) == reason


def test_round_prompts_alternate_styles_and_rotate():
    s = WritingSettings(batch_size=6)
    first, second = round_prompts("dog", 0, s), round_prompts("dog", 1, s)
    assert [style for style, _ in first] == ["facts", "stories"] * 3
    assert all('"dog"' in m for _, m in first)
    assert first != second and len({m for _, m in first}) == 6
    assert round_seed(0, "dog", 0) == round_seed(0, "dog", 0)
    assert len({round_seed(0, "dog", 0), round_seed(0, "dog", 1), round_seed(0, "cat", 0), round_seed(1, "dog", 0)}) == 4


def test_settings_are_checked():
    with pytest.raises(ValueError, match="Unknown or no styles"):
        WritingSettings(styles=("poems",))
    with pytest.raises(ValueError, match="max_words"):
        WritingSettings(min_words=10, max_words=5)


@pytest.fixture(scope="module")
def tiny_instruct(tokenizer):
    """A tiny random Llama with SmolLM2's tokenizer and chat template: fast, writes noise."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer)), dtype=torch.float32).eval()
    return LoadedModel.from_hf(model, tokenizer, name="tiny-instruct")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Tiny models run faster on one thread."""


SMALL = dict(batch_size=4, max_new_tokens=12, n_positives=50)


@pytest.mark.parametrize("backend", ["ctranslate2", "transformers"])
def test_same_seed_same_state_and_resume_is_exact(tiny_instruct, tmp_path, tiny_cache, backend):
    small = dict(SMALL, backend=backend)
    once = write_concepts(tiny_instruct, ["dog", "cat"], tmp_path / "a", WritingSettings(max_rounds=2, **small),
                          progress=False)
    first = write_concepts(tiny_instruct, ["dog", "cat"], tmp_path / "b", WritingSettings(max_rounds=1, **small),
                           progress=False)
    resumed = write_concepts(tiny_instruct, ["dog", "cat"], tmp_path / "b", WritingSettings(max_rounds=2, **small),
                             progress=False)
    strip = lambda p: {k: v for k, v in asdict(p).items() if k != "seconds"}  # noqa: E731
    assert [strip(p) for p in once.words] == [strip(p) for p in resumed.words]
    assert resumed.run_tokens == once.run_tokens - first.run_tokens  # only the second rounds ran
    for p in once.words:
        assert p.rounds == 2
        assert p.counts["generated"] == p.counts["kept"] + sum(p.counts[r] for r in DROP_REASONS)
        assert 0 < p.tokens <= 2 * SMALL["batch_size"] * SMALL["max_new_tokens"]
    other_seed = write_concepts(tiny_instruct, ["dog"], tmp_path / "c",
                                WritingSettings(max_rounds=1, seed=1, **small), progress=False)
    assert other_seed.words[0].tokens != once.words[0].tokens or other_seed.words[0].counts != once.words[0].counts


class ScriptedWriter(torch.nn.Module):
    """A tiny llama whose ``generate`` answers each prompt with one seeded, well-formed sentence naming
    the word of the prompt (a random tiny model writes noise, of which nothing is ever kept).

    The sentence is drawn with the global RNG, which the writer seeds per (word, round), so a resumed run
    draws what an uninterrupted one does; a sentence drawn again is a duplicate to drop."""

    def __init__(self, model, tokenizer):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.config = model.config

    def generate(self, input_ids, attention_mask=None, *, max_new_tokens, pad_token_id, **sampling):
        tok = self.tokenizer
        rows = []
        for prompt in tok.batch_decode(input_ids, skip_special_tokens=True):
            word = next(w for w in ("dog", "cat") if f'"{w}"' in prompt)
            n = int(torch.randint(0, 8, ()))  # few enough that rounds repeat sentences
            rows.append(tok(f"My {word} walked {n} miles along the quiet river today.",
                            add_special_tokens=False)["input_ids"][:max_new_tokens])
        width = max(map(len, rows))
        new = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


@pytest.fixture(scope="module")
def scripted_instruct(tokenizer):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer)), dtype=torch.float32).eval()
    return LoadedModel.from_hf(ScriptedWriter(model, tokenizer), tokenizer, name="scripted-instruct")


def test_resume_keeps_the_sentences_already_written(scripted_instruct, tmp_path):
    """Two rounds in one run and one round then a resumed second keep the same sentences, in the same
    order, in the state and in the concept file; the resumed run starts from the saved sentences."""
    settings = dict(batch_size=4, max_new_tokens=24, n_positives=50, backend="transformers")
    words = ["dog", "cat"]
    once = write_concepts(scripted_instruct, words, tmp_path / "a", WritingSettings(max_rounds=2, **settings),
                          progress=False)
    first = write_concepts(scripted_instruct, words, tmp_path / "b", WritingSettings(max_rounds=1, **settings),
                           progress=False)
    resumed = write_concepts(scripted_instruct, words, tmp_path / "b", WritingSettings(max_rounds=2, **settings),
                             progress=False)
    for a, f, r in zip(once.words, first.words, resumed.words):
        assert 0 < len(f.kept) < len(a.kept)  # both rounds kept sentences, so resuming has something to lose
        assert r.kept == a.kept and r.kept[:len(f.kept)] == f.kept
        assert all(a.word in k["text"] for k in a.kept)
        texts = [k["text"] for k in a.kept]  # repeats across rounds are dropped, not kept twice
        assert len(set(texts)) == len(texts) and a.counts["duplicate"] > 0
        assert r.counts == a.counts
        rows = lambda folder: (folder / f"{a.word}.jsonl").read_text()  # noqa: E731
        assert rows(tmp_path / "b") == rows(tmp_path / "a")
        assert len(rows(tmp_path / "b").splitlines()) == len(a.kept)
    assert resumed.run_kept == sum(len(a.kept) - len(f.kept) for a, f in zip(once.words, first.words))


class ScriptedSampler:
    """Answers each message about dogs with two seeded sentences, one naming the dog and one not; raises
    KeyboardInterrupt (a killed run) on the call numbered ``fail_on``."""

    name = "scripted"

    def __init__(self, fail_on: int | None = None):
        self.calls, self.fail_on = 0, fail_on

    def sample(self, messages, seed, sampling):
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyboardInterrupt
        rng = np.random.default_rng(seed)
        answers = []
        for _ in messages:
            n = rng.integers(0, 40)
            answers.append(f"1. My dog walked {n} miles by the river today.\n2. The rain fell for {n} hours.")
        return answers, 10 * len(messages)


def test_a_killed_run_resumes_where_it_stopped(tiny_instruct, tmp_path):
    """A run killed in its third round keeps its first two rounds on disk; the rerun does the rest and
    ends as an uninterrupted run does. The everyday style keeps sentences that do not name the word."""
    settings = WritingSettings(batch_size=3, n_positives=1000, max_rounds=3, styles=("facts", "everyday"))
    whole = write_concepts(tiny_instruct, ["dog"], tmp_path / "a", settings, progress=False,
                           sampler=ScriptedSampler()).words[0]
    with pytest.raises(KeyboardInterrupt):
        write_concepts(tiny_instruct, ["dog"], tmp_path / "b", settings, progress=False, sampler=ScriptedSampler(3))
    saved = ConceptWriter(tiny_instruct, tmp_path / "b", settings, ScriptedSampler()).progress_of("dog")
    assert saved.rounds == 2 and 0 < len(saved.kept) < len(whole.kept)
    resumed = write_concepts(tiny_instruct, ["dog"], tmp_path / "b", settings, progress=False,
                             sampler=ScriptedSampler()).words[0]
    assert asdict(resumed) | {"seconds": 0} == asdict(whole) | {"seconds": 0}
    assert (tmp_path / "b" / "dog.jsonl").read_text() == (tmp_path / "a" / "dog.jsonl").read_text()
    styles = {k["style"] for k in whole.kept if "dog" not in k["text"]}
    assert styles == {"everyday"}  # sentences without the word come from the everyday style only


def test_other_settings_are_refused(tiny_instruct, tmp_path, tiny_cache):
    write_concepts(tiny_instruct, ["dog"], tmp_path, WritingSettings(max_rounds=1, **SMALL), progress=False)
    with pytest.raises(ConceptDataError, match="temperature"):
        ConceptWriter(tiny_instruct, tmp_path, WritingSettings(temperature=0.5, **SMALL))
    with pytest.raises(ConceptDataError, match="backend"):  # the other backend would sample other sentences
        ConceptWriter(tiny_instruct, tmp_path, WritingSettings(backend="transformers", **SMALL))


@pytest.mark.integration
def test_smollm2_writes_loadable_concepts(smollm2, tmp_path):
    settings = WritingSettings(batch_size=4, max_new_tokens=48, n_positives=3, max_rounds=2)
    report = write_concepts(smollm2, ["apple"], tmp_path, settings, progress=False)
    (concept,) = ConceptSet.load(tmp_path).concepts
    assert concept.name == "apple" and 1 <= len(concept.positives) <= 3
    for s in concept.positives:
        assert mentions(s, "apple") and sentence_problem(s, mention_pattern("apple"), 4, 40) is None
    rows = [json.loads(line) for line in (tmp_path / "apple.jsonl").read_text().splitlines()]
    assert {r["style"] for r in rows} <= {"facts", "stories"} and all(r["label"] == 1 for r in rows)
    summary = report.to_dict()
    assert summary["kept_sentences"] >= summary["positives_per_word"]["apple"] == len(rows)
    assert 0 < summary["yield"] <= 1 and summary["tokens_per_second"] > 0


def test_generate_concepts_writes_only_styles_that_name_the_word(tmp_path):
    """The men100 run once defaulted to every style, and half its positives were everyday sentences that
    need not name the word."""
    from steer_experts.writing.writer import MENTION_FREE_STYLES

    from ..helpers import recipe

    args = recipe("generate_concepts").parse_args(["--out", str(tmp_path / "out")])
    styles = args.styles.split(",")
    assert styles == list(WritingSettings.styles)
    assert not set(styles) & MENTION_FREE_STYLES


def test_a_packed_concept_set_loads_by_name_with_its_provenance(tiny_instruct, tmp_path, monkeypatch):
    """generate_concepts --package: the kept sentences with their styles, counts per word that match the
    writing state, the same bytes twice, loadable by name; a file the recipe did not write is never replaced."""
    import gzip

    from steer_experts import concepts as concepts_module
    from steer_experts.concepts import builtin_concept_sets, builtin_provenance

    from ..helpers import recipe
    from steer_experts.lens.organisation import styles_of

    generate = recipe("generate_concepts")
    settings = WritingSettings(batch_size=4, n_positives=5, max_rounds=2, styles=("facts", "stories"))
    writer = ConceptWriter(tiny_instruct, tmp_path / "writing", settings, ScriptedSampler())
    result = writer.write(["dog"], progress=False)
    assert len(result.words[0].kept) > settings.n_positives  # so the cap is exercised
    data = generate.pack(writer, result, [{"note": "why"}])
    assert generate.pack(writer, result, [{"note": "why"}]) == data

    monkeypatch.setattr(concepts_module, "BUILTIN_FOLDER", tmp_path / "package")
    monkeypatch.setattr(generate, "BUILTIN_FOLDER", tmp_path / "package")
    generate.install("scripted-dogs", data)  # into a package folder it creates
    generate.install("scripted-dogs", data)  # its own file may be replaced
    assert "scripted-dogs" in builtin_concept_sets()
    (concept,) = ConceptSet.load_builtin("scripted-dogs").concepts
    kept = result.words[0].kept[:settings.n_positives]
    assert concept.name == "dog" and concept.positives == tuple(k["text"] for k in kept)
    assert ConceptSet.load("scripted-dogs").concepts == [concept]
    provenance = builtin_provenance("scripted-dogs")
    counts = result.words[0].counts
    assert provenance["per_word"]["dog"]["kept"] == settings.n_positives
    assert provenance["per_word"]["dog"]["candidates"] == counts["generated"]
    assert provenance["per_word"]["dog"]["dropped"] == {r: counts[r] for r in DROP_REASONS}
    assert provenance["model_fingerprint"] == tiny_instruct.fingerprint and provenance["notes"] == [{"note": "why"}]
    assert provenance["prompts"] == settings.generation_key()["prompts"]
    styles = styles_of("scripted-dogs")
    assert sum(len(v["dog"]) for v in styles.values()) == settings.n_positives
    assert set(styles) <= {"facts", "stories"}

    (tmp_path / "package" / "theirs.json.gz").write_bytes(gzip.compress(b'{"provenance": {"written_by": "someone"}}'))
    with pytest.raises(ConceptDataError, match="not written by this recipe"):
        generate.install("theirs", data)
    with pytest.raises(ConceptDataError, match="No built-in concept set 'nothing'"):
        ConceptSet.load_builtin("nothing")


def test_a_pack_only_run_keeps_the_last_writing_runs_reports(tiny_instruct, tmp_path, monkeypatch):
    """--budget-minutes 0 --package packs what is written and leaves report.md and writing_report.json of the
    run that wrote it (a pack-only run once replaced them with "0 s, 0 sentences")."""
    from types import SimpleNamespace

    from ..helpers import recipe

    generate = recipe("generate_concepts")
    monkeypatch.setattr(generate, "LazyModel", lambda args: SimpleNamespace(get=lambda: tiny_instruct))
    out = tmp_path / "out"
    out.mkdir()
    reports = {"report.md": "the writing run\n", "writing_report.json": '{"kept_sentences": 7}\n'}
    for name, text in reports.items():
        (out / name).write_text(text)
    argv = ["--out", str(out), "--words", "dog", "--backend", "transformers", "--quiet", "--package", "dogs"]
    generate.main([*argv, "--budget-minutes", "0"])
    assert {name: (out / name).read_text() for name in reports} == reports
    assert (out / "dogs.json.gz").exists()
