"""Stage 1: concept data.

A :class:`Concept` is a name with positive sentences (the concept is present)
and negative sentences (it is absent). A :class:`ConceptSet` holds several and
collects every distinct sentence once, so that unit responses are computed once
per sentence however many concepts use it.

Loaders: the OneSec / apple ml-selfcond JSON format, JSONL, CSV, a
``datasets.Dataset``, or a folder of any of those, and the concept sets that ship
with the package (:meth:`ConceptSet.load_builtin`, e.g. ``"men100"``). Concepts
given without negatives get negatives sampled (seeded) from the other concepts' positives.
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .errors import InvalidArgumentError, SteerExpertsError, UnknownConceptError


class ConceptDataError(SteerExpertsError, ValueError):
    """Raised when concept data is malformed; the message says what and where."""


# Concept sets shipped as package data: {"provenance": {...}, "rows": [{"concept", "text", "style"}, ...]}.
BUILTIN_FOLDER = Path(__file__).with_name("concept_data")


def builtin_concept_sets() -> list[str]:
    """The names of the concept sets that ship with the package (for :meth:`ConceptSet.load_builtin`)."""
    return sorted(p.name.removesuffix(".json.gz") for p in BUILTIN_FOLDER.glob("*.json.gz"))


@functools.cache
def _builtin(name: str) -> dict:
    path = BUILTIN_FOLDER / f"{name}.json.gz"
    if not path.is_file():
        raise ConceptDataError(f"No built-in concept set {name!r}; the package ships {builtin_concept_sets()}.")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def builtin_rows(name: str) -> list[dict]:
    """The rows ``{"concept", "text", "label", "style"}`` of the built-in concept set ``name``, in file order."""
    return _builtin(name)["rows"]


def builtin_provenance(name: str) -> dict:
    """How the built-in concept set ``name`` was made: model, prompts, seeds, filters, counts per concept."""
    return _builtin(name)["provenance"]


@dataclass(frozen=True)
class Concept:
    """A concept: its name, positive sentences and (optionally) negative sentences.

    ``negatives=None`` means "sample them from the other concepts" (see
    :meth:`ConceptSet.with_sampled_negatives`).
    """

    name: str
    positives: tuple[str, ...]
    negatives: tuple[str, ...] | None = None
    group: str | None = None


def resolve_concept(query: str, names: Sequence[str]) -> str:
    """Return the concept name ``query`` refers to: an exact name, or the word of a
    sense-keyed name (``"football"`` for OneSec's ``"football-1_04_00__"``) when unique.

    Raises:
        KeyError: no concept, or more than one, matches; the message lists the names.
    """
    if query in names:
        return query
    matches = [n for n in names if n.split("-")[0] == query]
    if len(matches) == 1:
        return matches[0]
    why = f"is ambiguous ({matches})" if matches else "is unknown"
    raise UnknownConceptError(f"Concept {query!r} {why}. Known concepts: {list(names)}")


@dataclass
class ValidationReport:
    """What validation changed rather than rejected: counts per concept."""

    duplicates_dropped: dict[str, int] = field(default_factory=dict)
    shared_sentences: int = 0  # sentences used by more than one concept (collected once)

    def __str__(self) -> str:
        dups = sum(self.duplicates_dropped.values())
        return f"{dups} duplicate sentences dropped, {self.shared_sentences} sentences shared between concepts"


def _dedupe(name: str, kind: str, sentences: Iterable[str], report: ValidationReport) -> tuple[str, ...]:
    # A string or a mapping is iterable too, and would become letters or keys.
    if isinstance(sentences, (str, bytes, dict)) or not isinstance(sentences, Iterable):
        raise ConceptDataError(f"Concept {name!r}: {kind} sentences must be a list of strings, "
                               f"got {type(sentences).__name__} {_preview(sentences)}.")
    items = list(sentences)
    seen: dict[str, None] = {}
    for i, s in enumerate(items):
        if not isinstance(s, str):
            raise ConceptDataError(f"Concept {name!r}: {kind} sentence #{i} is {type(s).__name__}, not a string.")
        if not s.strip():
            raise ConceptDataError(f"Concept {name!r}: {kind} sentence #{i} is empty. Remove empty sentences.")
        seen[s] = None
    dropped = len(items) - len(seen)
    if dropped:
        report.duplicates_dropped[name] = report.duplicates_dropped.get(name, 0) + dropped
    return tuple(seen)


@dataclass
class ConceptRows:
    """Concepts given directly as row indices into one response matrix: names, and per concept
    the rows of its positives and of its negatives (int arrays)."""

    names: list[str]
    positives: list[np.ndarray]
    negatives: list[np.ndarray]

    def positive_indices(self, i: int) -> np.ndarray:
        """Rows of concept ``i``'s positives."""
        return np.asarray(self.positives[i])

    def negative_indices(self, i: int) -> np.ndarray:
        """Rows of concept ``i``'s negatives."""
        return np.asarray(self.negatives[i])


class ConceptSet:
    """Concepts whose distinct sentences are collected once.

    Attributes:
        concepts: the validated concepts, in order.
        sentences: every distinct sentence, in first-seen order.
        report: what validation dropped or merged.
    """

    def __init__(self, concepts: Sequence[Concept]):
        report = ValidationReport()
        if not concepts:
            raise ConceptDataError("No concepts given. A concept needs a name and positive sentences.")
        for c in concepts:
            if not isinstance(c.name, str) or not c.name.strip():
                raise ConceptDataError(f"Every concept needs a non-empty string name; got {_preview(c.name)}.")
        names = [c.name for c in concepts]
        dup_names = sorted({n for n in names if names.count(n) > 1})
        if dup_names:
            raise ConceptDataError(f"Concept names must be unique; repeated: {dup_names}.")
        clean = []
        for c in concepts:
            if not c.name or not isinstance(c.name, str):
                raise ConceptDataError(f"Every concept needs a non-empty string name; got {c.name!r}.")
            pos = _dedupe(c.name, "positive", c.positives, report)
            if not pos:
                raise ConceptDataError(f"Concept {c.name!r} has no positive sentences.")
            neg = None
            if c.negatives is not None:
                neg = _dedupe(c.name, "negative", c.negatives, report)
                both = set(pos) & set(neg)
                if both:
                    raise ConceptDataError(
                        f"Concept {c.name!r}: {len(both)} sentences are both positive and negative, "
                        f"e.g. {next(iter(both))[:80]!r}. A sentence can only be one."
                    )
            clean.append(Concept(c.name, pos, neg, c.group))
        self.concepts: list[Concept] = clean
        self.report = report
        index: dict[str, int] = {}
        uses = 0
        for c in clean:
            for s in c.positives + (c.negatives or ()):
                uses += 1
                index.setdefault(s, len(index))
        self.sentences: list[str] = list(index)
        report.shared_sentences = uses - len(index)
        self._index = index

    # ------------------------------------------------------------------ access
    @property
    def names(self) -> list[str]:
        """Concept names, in order."""
        return [c.name for c in self.concepts]

    def __len__(self) -> int:
        return len(self.concepts)

    def __getitem__(self, name: str) -> Concept:
        return self.concepts[self.names.index(resolve_concept(name, self.names))]

    def __repr__(self) -> str:
        return f"ConceptSet({len(self)} concepts, {len(self.sentences)} distinct sentences)"

    def positive_indices(self, i: int) -> np.ndarray:
        """Rows of ``sentences`` that are positives of concept ``i``."""
        return np.array([self._index[s] for s in self.concepts[i].positives], dtype=np.int64)

    def negative_indices(self, i: int) -> np.ndarray:
        """Rows of ``sentences`` that are negatives of concept ``i``."""
        negatives = self.concepts[i].negatives
        if negatives is None:
            raise ConceptDataError(
                f"Concept {self.concepts[i].name!r} has no negatives yet; call with_sampled_negatives() first."
            )
        return np.array([self._index[s] for s in negatives], dtype=np.int64)

    def rows(self, sentences: Sequence[str]) -> ConceptRows:
        """The concepts (with negatives) as row indices into ``sentences``, which must hold all their
        sentences: the view that scores expertise on a subset of already collected responses."""
        row = {s: i for i, s in enumerate(sentences)}
        return ConceptRows(self.names, [np.array([row[s] for s in c.positives], dtype=np.int64) for c in self.concepts],
                           [np.array([row[s] for s in c.negatives], dtype=np.int64) for c in self.concepts])

    # ------------------------------------------------------------------ transforms
    def with_sampled_negatives(self, n_negatives: int = 1000, seed: int = 0) -> "ConceptSet":
        """Give each concept without negatives up to ``n_negatives`` sampled from other concepts' positives.

        Sampling is seeded and independent of concept order (each concept gets its
        own stream). Concepts that already have negatives keep them.

        Raises:
            ConceptDataError: a concept would end up with no negatives.
        """
        if isinstance(n_negatives, bool) or not isinstance(n_negatives, (int, np.integer)) or n_negatives < 1:
            raise InvalidArgumentError(f"n_negatives must be a positive integer; got {n_negatives!r}.")
        all_positives = list(dict.fromkeys(s for c in self.concepts for s in c.positives))
        out = []
        for i, c in enumerate(self.concepts):
            if c.negatives is not None:
                out.append(c)
                continue
            own = set(c.positives)
            pool = [s for s in all_positives if s not in own]
            if not pool:
                raise ConceptDataError(
                    f"Concept {c.name!r} has no negatives and there are no other concepts' sentences to "
                    "sample from. Give negatives explicitly or add more concepts."
                )
            rng = np.random.default_rng([seed, *c.name.encode()])
            take = rng.choice(len(pool), size=min(n_negatives, len(pool)), replace=False)
            out.append(Concept(c.name, c.positives, tuple(pool[j] for j in sorted(take)), c.group))
        return ConceptSet(out)

    def contrasted(self) -> "ConceptSet":
        """Each concept with the other concepts' positives added to its own negatives (sample negatives
        first: :meth:`with_sampled_negatives`). For concepts that share a theme (man and woman), this
        keeps what tells one from the other."""
        out = []
        for c in self.concepts:
            own = set(c.positives)
            others = [s for o in self.concepts if o.name != c.name for s in o.positives if s not in own]
            out.append(Concept(c.name, c.positives, tuple(dict.fromkeys(c.negatives + tuple(others))), c.group))
        return ConceptSet(out)

    def subset(self, names: Sequence[str]) -> "ConceptSet":
        """The concepts named, in the order given."""
        return ConceptSet([self[n] for n in names])

    def capped(self, n_positives: int, seed: int = 0) -> "ConceptSet":
        """Every concept with at most ``n_positives`` of its positives, a seeded sample kept in their order;
        negatives unchanged. Samples are nested: a larger cap keeps every positive a smaller one kept."""
        if n_positives < 1:
            raise InvalidArgumentError(f"n_positives must be at least 1; got {n_positives}.")
        out = []
        for c in self.concepts:
            keep = np.random.default_rng([seed, *c.name.encode()]).permutation(len(c.positives))[:n_positives]
            out.append(Concept(c.name, tuple(c.positives[j] for j in sorted(keep)), c.negatives, c.group))
        return ConceptSet(out)

    def split(self, fraction: float = 0.5, seed: int = 0) -> tuple["ConceptSet", "ConceptSet"]:
        """Split every concept's positives and negatives into two disjoint parts (seeded).

        Returns ``(first, second)`` where ``first`` holds about ``fraction`` of each list.
        """
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must be in (0, 1); got {fraction}.")
        firsts, seconds = [], []
        for c in self.concepts:
            rng = np.random.default_rng([seed, *c.name.encode()])
            parts = []
            for sents in (c.positives, c.negatives):
                if sents is None:
                    parts.append((None, None))
                    continue
                order = rng.permutation(len(sents))
                cut = max(1, min(len(sents) - 1, round(fraction * len(sents))))
                parts.append((tuple(sents[j] for j in sorted(order[:cut])), tuple(sents[j] for j in sorted(order[cut:]))))
            firsts.append(Concept(c.name, parts[0][0], parts[1][0], c.group))
            seconds.append(Concept(c.name, parts[0][1], parts[1][1], c.group))
        return ConceptSet(firsts), ConceptSet(seconds)

    # ------------------------------------------------------------------ loaders
    @classmethod
    def from_onesec(cls, paths: str | Path | Sequence[str | Path]) -> "ConceptSet":
        """Load ml-selfcond / OneSec JSON files: ``{concept, group, sentences: {positive, negative}}``."""
        paths = [paths] if isinstance(paths, (str, Path)) else paths
        return cls([_read_onesec(Path(p)) for p in paths])

    @classmethod
    def from_records(
        cls, records: Iterable[dict], concept_column: str = "concept", text_column: str = "text",
        label_column: str = "label", where: str = "records",
    ) -> "ConceptSet":
        """Build from rows ``{concept, text, label}``; label 1/"positive" or 0/"negative".

        Concepts that have no negative rows get ``negatives=None`` (to be sampled).
        """
        pos: dict[str, list[str]] = {}
        neg: dict[str, list[str]] = {}
        for n, row in enumerate(records, 1):
            if not isinstance(row, dict):
                raise ConceptDataError(f"{where}, row {n}: expected an object with {concept_column!r} and "
                                       f"{text_column!r}, got {type(row).__name__} {_preview(row)}.")
            missing = [k for k in (concept_column, text_column) if k not in row]
            if missing:
                raise ConceptDataError(f"{where}, row {n}: missing column(s) {missing}; row has {sorted(row)}.")
            for column in (concept_column, text_column):
                if not isinstance(row[column], str):
                    raise ConceptDataError(f"{where}, row {n}: {column!r} must be a string, got "
                                           f"{type(row[column]).__name__} {_preview(row[column])}.")
            label = row.get(label_column, 1)
            if label is None or isinstance(label, (list, dict, float)):
                raise ConceptDataError(f"{where}, row {n}: label {label!r} is not 1/0/positive/negative.")
            label = str(label).strip().lower()
            if label in ("1", "positive", "pos", "true"):
                pos.setdefault(row[concept_column], []).append(row[text_column])
            elif label in ("0", "negative", "neg", "false"):
                neg.setdefault(row[concept_column], []).append(row[text_column])
                pos.setdefault(row[concept_column], [])
            else:
                raise ConceptDataError(f"{where}, row {n}: label {row[label_column]!r} is not 1/0/positive/negative.")
        return cls([Concept(name, tuple(p), tuple(neg[name]) if name in neg else None) for name, p in pos.items()])

    @classmethod
    def from_jsonl(cls, path: str | Path, **columns) -> "ConceptSet":
        """Load JSONL rows ``{"concept", "text", "label"}`` (label optional, default positive)."""
        path = Path(path)
        rows = []
        for n, line in enumerate(_read_text(path).splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ConceptDataError(f"{path}:{n}: not valid JSON ({err.msg}).") from None
        return cls.from_records(rows, where=str(path), **columns)

    @classmethod
    def from_csv(cls, path: str | Path, **columns) -> "ConceptSet":
        """Load CSV with a header row containing concept, text and (optionally) label columns."""
        path = Path(path)
        text = _read_text(path)
        try:
            rows = list(csv.DictReader(io.StringIO(text, newline="")))
        except csv.Error as err:
            raise ConceptDataError(f"{path}: not valid CSV ({err}).") from None
        for n, row in enumerate(rows, 2):
            if None in row or None in row.values():
                raise ConceptDataError(f"{path}:{n}: the row has {'more' if None in row else 'fewer'} fields "
                                       "than the header.")
        return cls.from_records(rows, where=str(path), **columns)

    @classmethod
    def from_dataset(cls, dataset, **columns) -> "ConceptSet":
        """Load a ``datasets.Dataset`` with concept, text and (optionally) label columns."""
        return cls.from_records(iter(dataset), where="dataset", **columns)

    @classmethod
    def load_builtin(cls, name: str) -> "ConceptSet":
        """A concept set that ships with the package, by name (:func:`builtin_concept_sets`), offline.
        Its provenance is :func:`builtin_provenance`."""
        return cls.from_records(builtin_rows(name), where=f"built-in concept set {name!r}")

    @classmethod
    def load(cls, path: str | Path) -> "ConceptSet":
        """Load a file (``.json`` OneSec, ``.jsonl``, ``.csv``), a folder of such files, or, where no such
        path exists, a built-in concept set by name (:meth:`load_builtin`)."""
        if not Path(path).expanduser().exists() and str(path) in builtin_concept_sets():
            return cls.load_builtin(str(path))
        path = Path(path).expanduser()
        if not path.exists():
            raise ConceptDataError(f"No concept file or folder at {path}, and no built-in concept set of that "
                                   f"name ({builtin_concept_sets()}).")
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl", ".csv")) if path.is_dir() else [path]
        if not files:
            raise ConceptDataError(f"{path} has no .json, .jsonl or .csv concept files.")
        concepts: list[Concept] = []
        for f in files:
            if f.suffix == ".json":
                concepts.append(_read_onesec(f))
            elif f.suffix == ".jsonl":
                concepts.extend(cls.from_jsonl(f).concepts)
            elif f.suffix == ".csv":
                concepts.extend(cls.from_csv(f).concepts)
            else:
                raise ConceptDataError(f"{f}: unknown concept file type {f.suffix!r}; use .json, .jsonl or .csv.")
        return cls(concepts)


def _preview(value, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width] + "..."


def _read_text(path: Path) -> str:
    """The file's text as UTF-8; a clear error naming the file and line where it is not."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConceptDataError(f"{path}:{line}: not UTF-8 text (byte {data[err.start]:#04x} at offset "
                               f"{err.start}). Save the file as UTF-8.") from None


def _sentence_list(path: Path, data: dict, field: str, required: bool) -> tuple[str, ...] | None:
    sentences = data["sentences"].get(field)
    if sentences is None and not required:
        return None
    where = f"{path}: field sentences.{field}"
    if not isinstance(sentences, list):
        raise ConceptDataError(f"{where} must be a list of strings, got {type(sentences).__name__} "
                               f"{_preview(sentences)}.")
    for i, s in enumerate(sentences):
        if not isinstance(s, str):
            raise ConceptDataError(f"{where}: item #{i} is {type(s).__name__} {_preview(s)}, not a string.")
    return tuple(sentences)


def _read_onesec(path: Path) -> Concept:
    expected = ('Expected {"concept": ..., "sentences": {"positive": [...], "negative": [...]}}.')
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise ConceptDataError(f"{path}:{err.lineno}: not valid JSON ({err.msg}). {expected}") from None
    if not isinstance(data, dict) or not isinstance(data.get("sentences"), dict) or "concept" not in data:
        raise ConceptDataError(f"{path} is not a OneSec concept file. {expected}")
    if not isinstance(data["concept"], str) or not data["concept"].strip():
        raise ConceptDataError(f"{path}: field concept must be a non-empty string, got {_preview(data['concept'])}.")
    group = data.get("group")
    if group is not None and not isinstance(group, str):
        raise ConceptDataError(f"{path}: field group must be a string, got {_preview(group)}.")
    negatives = _sentence_list(path, data, "negative", required=False)
    return Concept(data["concept"], _sentence_list(path, data, "positive", required=True), negatives or None, group)
