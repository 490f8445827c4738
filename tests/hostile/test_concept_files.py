"""Hostile concept files: every malformed file is a ConceptDataError naming the file and what is wrong,
and loading it writes nothing."""

from __future__ import annotations

import json
import re

import pytest

from steer_experts.cli import main
from steer_experts.concepts import ConceptDataError, ConceptSet
from steer_experts.errors import SteerExpertsError

from .disk import tree


def onesec(positive=("A goal.", "A match."), negative=("Rain fell.",), concept="football", **extra) -> bytes:
    data = {"concept": concept, "group": "sport", "sentences": {"positive": positive, "negative": negative}}
    data.update(extra)
    return json.dumps(data).encode()


def jsonl(*rows) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


GOOD_ROW = {"concept": "football", "text": "A goal.", "label": 1}

# (file name, bytes, the message the error must contain, as a regular expression)
CASES = {
    "onesec positive is a string": ("c.json", onesec(positive="A goal."), r"sentences\.positive must be a list of strings, got str"),
    "onesec positive is a dict": ("c.json", onesec(positive={"a": "A goal."}), r"sentences\.positive must be a list of strings, got dict"),
    "onesec positive is a number": ("c.json", onesec(positive=3), r"sentences\.positive must be a list of strings, got int"),
    "onesec positive is null": ("c.json", onesec(positive=None), r"sentences\.positive must be a list of strings, got NoneType"),
    "onesec positive holds a number": ("c.json", onesec(positive=["A goal.", 7]), r"sentences\.positive: item #1 is int"),
    "onesec positive holds null": ("c.json", onesec(positive=[None]), r"sentences\.positive: item #0 is NoneType"),
    "onesec positive holds a list": ("c.json", onesec(positive=[["A goal."]]), r"sentences\.positive: item #0 is list"),
    "onesec positive holds a dict": ("c.json", onesec(positive=[{"text": "A goal."}]), r"item #0 is dict"),
    "onesec negative is a string": ("c.json", onesec(negative="Rain fell."), r"sentences\.negative must be a list of strings, got str"),
    "onesec negative holds a dict": ("c.json", onesec(negative=[{"t": 1}]), r"sentences\.negative: item #0 is dict"),
    "onesec negative holds a bool": ("c.json", onesec(negative=[True]), r"sentences\.negative: item #0 is bool"),
    "onesec concept is a number": ("c.json", onesec(concept=5), r"field concept must be a non-empty string, got 5"),
    "onesec concept is null": ("c.json", onesec(concept=None), r"field concept must be a non-empty string, got None"),
    "onesec concept is empty": ("c.json", onesec(concept="  "), r"field concept must be a non-empty string"),
    "onesec concept is a list": ("c.json", onesec(concept=["football"]), r"field concept must be a non-empty string"),
    "onesec group is a number": ("c.json", onesec(group=3), r"field group must be a string"),
    "onesec without concept": ("c.json", json.dumps({"sentences": {"positive": ["A."]}}).encode(), r"is not a OneSec concept file"),
    "onesec without sentences": ("c.json", json.dumps({"concept": "x"}).encode(), r"is not a OneSec concept file"),
    "onesec sentences is a list": ("c.json", json.dumps({"concept": "x", "sentences": ["A."]}).encode(), r"is not a OneSec concept file"),
    "onesec without positive": ("c.json", json.dumps({"concept": "x", "sentences": {"negative": ["A."]}}).encode(), r"sentences\.positive must be a list"),
    "onesec top level is a list": ("c.json", b"[1, 2]", r"is not a OneSec concept file"),
    "onesec top level is a string": ("c.json", b'"football"', r"is not a OneSec concept file"),
    "onesec truncated": ("c.json", onesec()[:30], r"c\.json:1: not valid JSON"),
    "onesec empty file": ("c.json", b"", r"c\.json:1: not valid JSON"),
    "onesec not UTF-8": ("c.json", b'{"concept": "caf\xe9",\n "sentences": {}}', r"c\.json:1: not UTF-8 text \(byte 0xe9"),
    "onesec no positives": ("c.json", onesec(positive=[]), r"has no positive sentences"),
    "onesec blank positive": ("c.json", onesec(positive=["A goal.", "   "]), r"positive sentence #1 is empty"),
    "onesec sentence both positive and negative": ("c.json", onesec(positive=["Same."], negative=["Same."]), r"both positive and negative"),
    "jsonl row is a list": ("c.jsonl", jsonl(GOOD_ROW, ["football", "A match."]), r"c\.jsonl, row 2: expected an object .* got list"),
    "jsonl row is a string": ("c.jsonl", jsonl('"football: A match."'), r"row 1: expected an object .* got str"),
    "jsonl row is a number": ("c.jsonl", jsonl("42"), r"row 1: expected an object .* got int"),
    "jsonl row is null": ("c.jsonl", jsonl("null"), r"row 1: expected an object .* got NoneType"),
    "jsonl concept is a number": ("c.jsonl", jsonl({"concept": 3, "text": "A goal."}), r"row 1: 'concept' must be a string, got int"),
    "jsonl concept is null": ("c.jsonl", jsonl({"concept": None, "text": "A goal."}), r"row 1: 'concept' must be a string, got NoneType"),
    "jsonl concept is a list": ("c.jsonl", jsonl({"concept": ["a"], "text": "A goal."}), r"'concept' must be a string, got list"),
    "jsonl concept is blank": ("c.jsonl", jsonl({"concept": " ", "text": "A goal."}), r"non-empty string name"),
    "jsonl text is a list": ("c.jsonl", jsonl({"concept": "x", "text": ["A", "B"]}), r"row 1: 'text' must be a string, got list"),
    "jsonl text is null": ("c.jsonl", jsonl({"concept": "x", "text": None}), r"'text' must be a string, got NoneType"),
    "jsonl text is a number": ("c.jsonl", jsonl({"concept": "x", "text": 1.5}), r"'text' must be a string, got float"),
    "jsonl text is empty": ("c.jsonl", jsonl({"concept": "x", "text": ""}), r"positive sentence #0 is empty"),
    "jsonl invalid line": ("c.jsonl", jsonl(GOOD_ROW, "{not json"), r"c\.jsonl:2: not valid JSON"),
    "jsonl missing text": ("c.jsonl", jsonl({"concept": "x"}), r"row 1: missing column\(s\) \['text'\]"),
    "jsonl unknown label": ("c.jsonl", jsonl({"concept": "x", "text": "A.", "label": "maybe"}), r"label 'maybe' is not"),
    "jsonl label is a list": ("c.jsonl", jsonl({"concept": "x", "text": "A.", "label": [1]}), r"label \[1\] is not"),
    "jsonl label is null": ("c.jsonl", jsonl({"concept": "x", "text": "A.", "label": None}), r"label None is not"),
    "jsonl not UTF-8 on line 3": ("c.jsonl", jsonl(GOOD_ROW, GOOD_ROW) + b'{"concept": "x", "text": "\xff"}\n', r"c\.jsonl:3: not UTF-8 text \(byte 0xff"),
    "jsonl UTF-16": ("c.jsonl", jsonl(GOOD_ROW).decode().encode("utf-16"), r"c\.jsonl:1: not UTF-8 text"),
    "jsonl empty": ("c.jsonl", b"\n\n", r"No concepts given"),
    "jsonl only negatives": ("c.jsonl", jsonl({"concept": "x", "text": "A.", "label": 0}), r"has no positive sentences"),
    "csv not UTF-8": ("c.csv", b"concept,text,label\nx,caf\xe9,1\n", r"c\.csv:2: not UTF-8 text"),
    "csv missing text column": ("c.csv", b"concept,sentence\nx,A goal.\n", r"missing column\(s\) \['text'\]"),
    "csv row with extra field": ("c.csv", b"concept,text,label\nx,A goal.,1,extra\n", r"c\.csv:2: the row has more fields"),
    "csv row with missing field": ("c.csv", b"concept,text,label\nx,A goal.,1\ny\n", r"c\.csv:3: the row has fewer fields"),
    "csv unknown label": ("c.csv", b"concept,text,label\nx,A goal.,yes please\n", r"label 'yes please' is not"),
    "csv header only": ("c.csv", b"concept,text,label\n", r"No concepts given"),
    "unknown suffix": ("c.txt", b"football: A goal.", r"unknown concept file type '\.txt'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_concept_file_is_a_clear_error(tmp_path, case):
    name, content, message = CASES[case]
    path = tmp_path / name
    path.write_bytes(content)
    before = tree(tmp_path)
    with pytest.raises(ConceptDataError, match=message) as info:
        ConceptSet.load(path)
    assert isinstance(info.value, SteerExpertsError) and isinstance(info.value, ValueError)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("case", ["onesec positive is a string", "jsonl row is a list", "onesec not UTF-8",
                                  "csv row with extra field"])
def test_cli_reports_a_malformed_file_in_one_line_and_writes_nothing(tmp_path, capsys, case):
    name, content, message = CASES[case]
    (tmp_path / name).write_bytes(content)
    before = tree(tmp_path)
    assert main(["discover", "--concepts", str(tmp_path / name), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("steer-experts discover: error: ") and str(tmp_path / name) in err
    assert re.search(message, err) and "Traceback" not in err
    assert tree(tmp_path) == before


def folder_case(tmp_path, case):
    if case == "missing path":
        return tmp_path / "nowhere", r"No concept file or folder at"
    folder = tmp_path / "concepts"
    folder.mkdir()
    if case == "empty folder":
        return folder, r"has no \.json, \.jsonl or \.csv concept files"
    if case == "folder of other files":
        (folder / "notes.txt").write_text("football")
        return folder, r"has no \.json, \.jsonl or \.csv concept files"
    if case == "same concept in two files":
        (folder / "a.json").write_bytes(onesec())
        (folder / "b.json").write_bytes(onesec(positive=["Another goal."]))
        return folder, r"Concept names must be unique; repeated: \['football'\]"
    if case == "one bad file among good ones":
        (folder / "a.json").write_bytes(onesec())
        (folder / "b.json").write_bytes(onesec(concept="man", positive="He walked."))
        return folder, r"b\.json: field sentences\.positive must be a list of strings"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing path", "empty folder", "folder of other files", "same concept in two files",
                                  "one bad file among good ones"])
def test_bad_concept_folder_is_a_clear_error(tmp_path, case):
    path, message = folder_case(tmp_path, case)
    before = tree(tmp_path)
    with pytest.raises(ConceptDataError, match=message):
        ConceptSet.load(path)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("n_negatives", [0, -1, 2.5, "10", True])
def test_bad_negative_count_is_refused(n_negatives):
    from steer_experts.errors import InvalidArgumentError

    concepts = ConceptSet.from_records([{"concept": "a", "text": "A."}, {"concept": "b", "text": "B."}])
    with pytest.raises(InvalidArgumentError, match="n_negatives must be a positive integer"):
        concepts.with_sampled_negatives(n_negatives)


@pytest.mark.parametrize("concept, message", [
    (("football", "A goal."), r"Concept 'football': positive sentences must be a list of strings, got str"),
    (("football", {"A goal.": 1}), r"positive sentences must be a list of strings, got dict"),
    (("football", b"A goal."), r"positive sentences must be a list of strings, got bytes"),
    (("football", 3), r"positive sentences must be a list of strings, got int"),
    (("football", ["A goal."], "Rain."), r"negative sentences must be a list of strings, got str"),
    ((5, ["A goal."]), r"Every concept needs a non-empty string name; got 5"),
    ((None, ["A goal."]), r"Every concept needs a non-empty string name; got None"),
])
def test_bad_concept_object_is_a_clear_error(concept, message):
    from steer_experts.concepts import Concept

    with pytest.raises(ConceptDataError, match=message):
        ConceptSet([Concept(*concept)])
