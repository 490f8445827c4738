"""Concept data: loaders, shared sentences, negative sampling, validation."""

from __future__ import annotations

import json

import datasets
import pytest

from steer_experts.concepts import Concept, ConceptDataError, ConceptSet, resolve_concept
from steer_experts.errors import InvalidArgumentError

from ..conftest import ONESEC, needs_shared_data

EXAMPLE = "examples/concepts.jsonl"


def _records():
    return [
        {"concept": "cat", "text": "The cat purred on the sofa.", "label": 1},
        {"concept": "cat", "text": "A kitten chased a ball of wool.", "label": "positive"},
        {"concept": "dog", "text": "The dog barked at the postman.", "label": 1},
        {"concept": "dog", "text": "The cat purred on the sofa.", "label": 0},
    ]


@needs_shared_data
def test_onesec_loader_reads_the_real_files():
    cs = ConceptSet.load(ONESEC)
    raw = {p.stem: json.loads(p.read_text()) for p in ONESEC.glob("*.json")}
    assert len(cs) == 3
    for concept in cs.concepts:
        source = raw[concept.name.split("-")[0]]["sentences"]
        assert concept.positives == tuple(dict.fromkeys(source["positive"]))
        assert concept.negatives == tuple(dict.fromkeys(source["negative"]))
    # every distinct sentence appears once, however many concepts use it
    assert len(cs.sentences) == len(set(cs.sentences)) == len({s for c in cs.concepts for s in c.positives + c.negatives})


def test_shared_sentences_are_collected_once():
    cs = ConceptSet.from_records(_records())
    assert cs.sentences.count("The cat purred on the sofa.") == 1
    assert cs.report.shared_sentences == 1
    cat, dog = cs.names.index("cat"), cs.names.index("dog")
    assert set(cs.positive_indices(cat)) & set(cs.negative_indices(dog))


def test_jsonl_csv_and_dataset_loaders_agree(tmp_path):
    rows = _records()
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "c.csv").write_text("concept,text,label\n" + "\n".join(
        f'{r["concept"]},"{r["text"]}",{r["label"]}' for r in rows))
    a = ConceptSet.from_jsonl(tmp_path / "c.jsonl")
    b = ConceptSet.from_csv(tmp_path / "c.csv")
    c = ConceptSet.from_dataset(datasets.Dataset.from_list([{**r, "label": str(r["label"])} for r in rows]))
    assert a.concepts == b.concepts == c.concepts
    assert a["dog"].negatives == ("The cat purred on the sofa.",)
    assert a["cat"].negatives is None  # to be sampled


def test_example_file_loads_with_sampled_negatives():
    cs = ConceptSet.load(EXAMPLE).with_sampled_negatives(1000, seed=0)
    assert cs.names == ["football", "music", "cooking", "ocean"]
    for i, c in enumerate(cs.concepts):
        assert len(c.positives) == 30 and len(c.negatives) == 90
        assert not set(c.positives) & set(c.negatives)


def test_negative_sampling_is_seeded_and_capped():
    cs = ConceptSet.load(EXAMPLE)
    a = cs.with_sampled_negatives(20, seed=1)
    assert a.concepts == cs.with_sampled_negatives(20, seed=1).concepts
    assert a.concepts != cs.with_sampled_negatives(20, seed=2).concepts
    assert all(len(c.negatives) == 20 for c in a.concepts)
    # a concept's negatives do not depend on which other concepts are sampled alongside it
    alone = cs.subset(["football", "music"]).with_sampled_negatives(1000, seed=1)["football"].negatives
    assert set(alone) <= set(cs.with_sampled_negatives(1000, seed=1)["football"].negatives)


def test_split_is_disjoint_and_complete():
    cs = ConceptSet.load(EXAMPLE).with_sampled_negatives(1000)
    first, second = cs.split(0.5, seed=0)
    for c, a, b in zip(cs.concepts, first.concepts, second.concepts):
        assert not set(a.positives) & set(b.positives)
        assert set(a.positives) | set(b.positives) == set(c.positives)
        assert set(a.negatives) | set(b.negatives) == set(c.negatives)


def test_capped_positives_are_seeded_nested_and_in_order():
    cs = ConceptSet.load(EXAMPLE).with_sampled_negatives(50, seed=0)
    small, large, again = cs.capped(3, seed=1), cs.capped(6, seed=1), cs.capped(3, seed=1)
    other = cs.capped(3, seed=2)
    assert small.concepts == again.concepts
    assert any(a.positives != b.positives for a, b in zip(small.concepts, other.concepts))
    for c, s, l in zip(cs.concepts, small.concepts, large.concepts):
        assert len(s.positives) == min(3, len(c.positives)) and len(l.positives) == min(6, len(c.positives))
        assert set(s.positives) <= set(l.positives) <= set(c.positives)
        assert list(s.positives) == [p for p in c.positives if p in set(s.positives)]  # original order
        assert s.negatives == c.negatives
    assert [len(c.positives) for c in cs.capped(10_000).concepts] == [len(c.positives) for c in cs.concepts]
    with pytest.raises(InvalidArgumentError, match="at least 1"):
        cs.capped(0)


def test_resolve_sense_keyed_names():
    names = ["football-1_04_00__", "man-1_18_00__", "woman-1_18_00__"]
    assert resolve_concept("football", names) == "football-1_04_00__"
    assert resolve_concept("man-1_18_00__", names) == "man-1_18_00__"
    with pytest.raises(KeyError, match="unknown"):
        resolve_concept("cat", names)
    with pytest.raises(KeyError, match="ambiguous"):
        resolve_concept("a", ["a-1", "a-2"])


# ---------------------------------------------------------------- validation: one test per error


def test_no_positives():
    with pytest.raises(ConceptDataError, match="'cat' has no positive sentences"):
        ConceptSet([Concept("cat", (), ("x",))])


def test_no_negatives_after_sampling():
    with pytest.raises(ConceptDataError, match="no other concepts' sentences to sample from"):
        ConceptSet([Concept("cat", ("A cat.",))]).with_sampled_negatives()


def test_negatives_missing_before_sampling():
    cs = ConceptSet([Concept("cat", ("A cat.",)), Concept("dog", ("A dog.",))])
    with pytest.raises(ConceptDataError, match="with_sampled_negatives"):
        cs.negative_indices(0)


def test_empty_sentence():
    with pytest.raises(ConceptDataError, match="positive sentence #1 is empty"):
        ConceptSet([Concept("cat", ("A cat.", "  "), ("A dog.",))])


def test_non_string_sentence():
    with pytest.raises(ConceptDataError, match="not a string"):
        ConceptSet([Concept("cat", ("A cat.", 3), ("A dog.",))])


def test_duplicates_are_dropped_and_counted():
    cs = ConceptSet([Concept("cat", ("A cat.", "A cat.", "Cats."), ("A dog.", "A dog."))])
    assert cs["cat"].positives == ("A cat.", "Cats.")
    assert cs.report.duplicates_dropped == {"cat": 2}


def test_sentence_both_positive_and_negative():
    with pytest.raises(ConceptDataError, match="both positive and negative"):
        ConceptSet([Concept("cat", ("A cat.",), ("A cat.",))])


def test_repeated_concept_names():
    with pytest.raises(ConceptDataError, match="unique"):
        ConceptSet([Concept("cat", ("A.",)), Concept("cat", ("B.",))])


def test_no_concepts():
    with pytest.raises(ConceptDataError, match="No concepts"):
        ConceptSet([])


def test_bad_label(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"concept": "cat", "text": "A cat.", "label": "maybe"}))
    with pytest.raises(ConceptDataError, match="row 1: label 'maybe'"):
        ConceptSet.from_jsonl(tmp_path / "c.jsonl")


def test_missing_column(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"concept": "cat", "sentence": "A cat."}))
    with pytest.raises(ConceptDataError, match=r"missing column\(s\) \['text'\]"):
        ConceptSet.from_jsonl(tmp_path / "c.jsonl")


def test_bad_json_line(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"concept": "cat", "text": "A cat."}\n{oops\n')
    with pytest.raises(ConceptDataError, match="c.jsonl:2: not valid JSON"):
        ConceptSet.from_jsonl(tmp_path / "c.jsonl")


def test_not_a_onesec_file(tmp_path):
    (tmp_path / "c.json").write_text('{"concept": "cat"}')
    with pytest.raises(ConceptDataError, match="not a OneSec concept file"):
        ConceptSet.load(tmp_path / "c.json")


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(ConceptDataError, match="No concept file or folder"):
        ConceptSet.load(tmp_path / "nope")
    with pytest.raises(ConceptDataError, match="has no .json, .jsonl or .csv"):
        ConceptSet.load(tmp_path)


def test_the_shipped_men100_concepts():
    """men100 ships with the package: 100 words, every positive names its word (facts and stories only),
    and the counts are those its provenance records."""
    from steer_experts.concepts import builtin_concept_sets, builtin_provenance, builtin_rows
    from steer_experts.words import mention_pattern

    assert "men100" in builtin_concept_sets()
    concepts = ConceptSet.load_builtin("men100")
    provenance = builtin_provenance("men100")
    assert len(concepts) == 100 and provenance["model"] == "smollm2-135m"
    for c in concepts.concepts:
        assert len(c.positives) == provenance["per_word"][c.name]["kept"] <= provenance["n_positives"], c.name
        pattern = mention_pattern(c.name)
        assert all(pattern.search(s) for s in c.positives), c.name
    assert {r["style"] for r in builtin_rows("men100")} == {"facts", "stories"}
    assert provenance["positives"]["total"] == sum(len(c.positives) for c in concepts.concepts)
