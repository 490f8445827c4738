"""Concept data written by a local instruct model (ExpertLens style).

For each word, the model is asked (through its chat template) for short facts
and short stories about the word. The answers are split into sentences, and a
sentence is kept only if it is complete, of bounded length, free of emoji and
control characters, new for that word, and mentions the word or an inflection
of it. Answers come from a chat sampler (:mod:`.samplers`: CTranslate2 where it
converts the model, else transformers). Negatives are not written per word:
they come from the other concepts' sentences
(:meth:`ConceptSet.with_sampled_negatives`) or from the neutral sentence bank
(:mod:`.neutral_bank`), which this writer wrote once with the "everyday" style.

Generation runs in *rounds*: one round is one batch of prompts for one word
sampled under a seed derived from (seed, word, round). A word's
sentences therefore depend only on the settings and the word, never on the
other words, the batching of other words, or where an interrupted run stopped.

On disk (``folder``)::

    <word>.jsonl              rows {"concept", "text", "label": 1, "style"}: the first
                              n_positives kept sentences (ConceptSet.load reads these)
    writing/settings.json     the settings; resuming with other settings is refused
    writing/<word>.json       state: rounds done, every kept sentence, counts, seconds

Both files of a word are rewritten atomically after each round, so a killed run
resumes at the next round.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from ..atomic import atomic_write, file_safe, settings_changes
from ..concepts import ConceptDataError
from ..models import LoadedModel
from ..words import mention_pattern
from .samplers import BACKENDS, ChatSampler, Sampling, chat_sampler

# Several phrasings per style: the same prompt sampled many times repeats itself.
PROMPTS: dict[str, tuple[str, ...]] = {
    "facts": (
        'Write five short facts about "{word}". Put each fact on its own line. '
        'Every sentence must contain the word "{word}".',
        'List five true statements about "{word}", one sentence each. Use the word "{word}" in every sentence.',
        'Write five simple sentences that explain what "{word}" is and how people use the word "{word}".',
        'Tell me five interesting things about "{word}". Each sentence must contain the word "{word}".',
    ),
    "stories": (
        'Write a short story of three sentences about "{word}". Use the word "{word}" in every sentence.',
        'Tell a tiny story, three sentences long, in which the word "{word}" appears in each sentence.',
        'Write a three-sentence story for children about "{word}". Mention "{word}" in every sentence.',
        'Write a short scene of three sentences where "{word}" matters. Say "{word}" in each sentence.',
    ),
    # For the neutral sentence bank: everyday text on a topic, which need not name the topic.
    "everyday": (
        "Write five short, ordinary sentences about {word}. Put each sentence on its own line.",
        "Describe a normal day involving {word} in five simple sentences, one per line.",
        "Write five plain sentences that someone might say about {word}. One sentence per line.",
        "Write a short story of four simple sentences about {word}.",
    ),
}
MENTION_FREE_STYLES = frozenset({"everyday"})  # their sentences are kept whether or not they name the word


@dataclass(frozen=True)
class WritingSettings:
    """How concept sentences are written and filtered.

    Attributes:
        n_positives: kept sentences wanted per word.
        styles: prompt styles to alternate (keys of ``PROMPTS``).
        batch_size: prompts per round (one generation batch, all for one word).
        max_new_tokens: generated tokens per prompt (at 64, a quarter of the candidate sentences were cut
            off by the limit; at 128, a seventh).
        temperature, top_k, top_p: sampling settings (top_k 0: no top-k cut). A top-k cut of 50 keeps
            CTranslate2 from sorting SmolLM2's whole 49,152-token vocabulary at every step: 1.6x its tokens/s.
        min_words, max_words: a kept sentence has this many words (inclusive).
        max_rounds: rounds per word before giving up on reaching ``n_positives``.
        seed: base seed; round seeds derive from (seed, word, round).
        backend: what samples the answers, one of ``BACKENDS`` (see :func:`~.samplers.chat_sampler`);
            the backend that actually runs is recorded with the folder's settings.
    """

    n_positives: int = 100
    styles: tuple[str, ...] = ("facts", "stories")
    batch_size: int = 48
    max_new_tokens: int = 128
    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 0.95
    min_words: int = 4
    max_words: int = 40
    max_rounds: int = 30
    seed: int = 0
    backend: str = "auto"

    def __post_init__(self):
        unknown = [s for s in self.styles if s not in PROMPTS]
        if unknown or not self.styles:
            raise ValueError(f"Unknown or no styles {list(self.styles)}; choose from {sorted(PROMPTS)}.")
        if min(self.n_positives, self.batch_size, self.max_new_tokens, self.max_rounds, self.min_words) < 1:
            raise ValueError("n_positives, batch_size, max_new_tokens, max_rounds and min_words must be >= 1.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: no top-k cut), got {self.top_k}.")
        if self.backend not in BACKENDS:
            raise ValueError(f"Unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}.")
        if self.max_words < self.min_words:
            raise ValueError(f"max_words ({self.max_words}) must be >= min_words ({self.min_words}).")

    def generation_key(self) -> dict:
        """The settings that change which sentences are generated (n_positives and max_rounds do not;
        the backend is recorded as the one that ran)."""
        key = asdict(self)
        for free in ("n_positives", "max_rounds", "backend"):
            key.pop(free)
        key["styles"] = list(self.styles)
        key["prompts"] = {s: list(PROMPTS[s]) for s in self.styles}
        return key


# --------------------------------------------------------------------------- sentence filtering

_LIST_MARKER = re.compile(r"^\s*(?:[-*\u2022]+|\d+[.)]|[A-Za-z][.)](?=\s))\s*")
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'\u201d\u2019)]))\s+")
DROP_REASONS = ("incomplete", "too_short", "too_long", "symbols", "no_mention", "quoted", "duplicate")
_QUOTES = "\"'\u201c\u201d\u2018\u2019"


# A full stop after these ends no sentence ("Dr. Smith"); splitting there left "Dr." as a too-short sentence
# and the rest without its subject.
_ABBREVIATION = re.compile(r"(?:^|\s)(?:Dr|Mr|Mrs|Ms|Prof|St|Mt|Jr|Sr|vs|e\.g|i\.e)\.$", re.IGNORECASE)


def split_sentences(text: str) -> list[str]:
    """Split generated text into candidate sentences: by line, then after . ! ? (not after a title
    such as "Dr."); list markers removed."""
    out = []
    for line in text.splitlines():
        line = _LIST_MARKER.sub("", line).strip()
        pieces: list[str] = []
        for piece in (p.strip() for p in _SENTENCE_END.split(line)):
            if pieces and _ABBREVIATION.search(pieces[-1]):
                pieces[-1] += " " + piece
            elif piece:
                pieces.append(piece)
        out.extend(pieces)
    return out


def sentence_problem(sentence: str, pattern: re.Pattern | None, min_words: int, max_words: int) -> str | None:
    """Why ``sentence`` is not kept (one of ``DROP_REASONS`` except duplicate), or None if it is fine.
    With ``pattern`` None, the sentence need not mention anything."""
    if not re.search(r"[.!?][\"'\u201d\u2019)]*$", sentence):
        return "incomplete"  # cut off by max_new_tokens, or a heading like "Facts:"
    n_words = len(sentence.split())
    if n_words < min_words:
        return "too_short"
    if n_words > max_words:
        return "too_long"
    if any(unicodedata.category(ch) == "So" or unicodedata.category(ch)[0] == "C" for ch in sentence):
        return "symbols"  # emoji and pictographs, control characters, private use
    if pattern is None:
        return None
    found = list(pattern.finditer(sentence))
    if not found:
        return "no_mention"
    if all(_in_quotes(sentence, m.start(), m.end()) for m in found):
        return "quoted"  # talks about the word ('no fact about "sitting" ...'), not the thing
    return None


def _in_quotes(sentence: str, start: int, end: int) -> bool:
    return 0 < start and end < len(sentence) and sentence[start - 1] in _QUOTES and sentence[end] in _QUOTES


# --------------------------------------------------------------------------- writing


@dataclass
class WordProgress:
    """What has been written for one word (persisted as ``writing/<word>.json``).

    ``kept`` holds ``{"text", "style", "round"}`` in generation order; ``counts``
    has ``generated`` (candidate sentences), ``kept`` and one entry per drop reason;
    ``tokens`` counts generated tokens (padding after the end excluded); ``seconds``
    is generation wall time.
    """

    word: str
    rounds: int = 0
    kept: list[dict] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("generated", "kept", *DROP_REASONS), 0))
    tokens: int = 0
    seconds: float = 0.0

    def done(self, settings: WritingSettings) -> bool:
        """True once the word has ``n_positives`` sentences or has used ``max_rounds`` rounds."""
        return len(self.kept) >= settings.n_positives or self.rounds >= settings.max_rounds


@dataclass
class WritingReport:
    """Totals of a writing run: per-word progress and throughput.

    ``throughput`` (sentences kept per second, tokens per second) covers the
    rounds run in this call only; ``yield_`` is kept / candidate sentences over all rounds.
    """

    words: list[WordProgress]
    n_positives: int
    run_seconds: float
    run_tokens: int
    run_kept: int
    stopped_early: bool

    @property
    def kept_per_second(self) -> float:
        """Sentences kept per second of this run's wall time."""
        return self.run_kept / self.run_seconds if self.run_seconds else float("nan")

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of this run's wall time."""
        return self.run_tokens / self.run_seconds if self.run_seconds else float("nan")

    @property
    def yield_(self) -> float:
        """Kept / candidate sentences over every round of every word."""
        generated = sum(w.counts["generated"] for w in self.words)
        return sum(w.counts["kept"] for w in self.words) / generated if generated else float("nan")

    def to_dict(self) -> dict:
        """JSON-ready summary (no sentences)."""
        drops = {r: sum(w.counts[r] for w in self.words) for r in DROP_REASONS}
        return {
            "words": len(self.words), "run_seconds": round(self.run_seconds, 1), "run_tokens": self.run_tokens,
            "run_kept": self.run_kept, "kept_per_second": self.kept_per_second,
            "tokens_per_second": self.tokens_per_second, "yield": self.yield_, "stopped_early": self.stopped_early,
            "generated_sentences": sum(w.counts["generated"] for w in self.words),
            "kept_sentences": sum(w.counts["kept"] for w in self.words), "dropped": drops,
            "positives_per_word": {w.word: min(len(w.kept), self.n_positives) for w in self.words},
            "rounds_per_word": {w.word: w.rounds for w in self.words},
        }


def round_seed(seed: int, word: str, round_index: int) -> int:
    """The sampling seed of one round: a hash of (seed, word, round), 63 bits."""
    digest = hashlib.blake2b(f"{seed}\x1f{word}\x1f{round_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def round_prompts(word: str, round_index: int, settings: WritingSettings) -> list[tuple[str, str]]:
    """The (style, user message) pairs of one round: styles alternate, phrasings rotate with the round."""
    out = []
    for i in range(settings.batch_size):
        style = settings.styles[i % len(settings.styles)]
        templates = PROMPTS[style]
        template = templates[(i // len(settings.styles) + round_index) % len(templates)]
        out.append((style, template.format(word=word)))
    return out


class ConceptWriter:
    """Writes concept sentences for words with one instruct model into one folder.

    Args:
        model: an instruct model with a chat template (e.g. ``load_model("smollm2-135m")``).
        folder: where the concept files and the writing state live.
        settings: see :class:`WritingSettings`.
        sampler: what writes the answers (default: :func:`~.samplers.chat_sampler` of ``settings.backend``).

    Raises:
        ConceptDataError: the folder holds sentences written with other settings or another model.
    """

    def __init__(self, model: LoadedModel, folder: str | Path, settings: WritingSettings = WritingSettings(),
                 sampler: ChatSampler | None = None):
        self.model, self.settings = model, settings
        self.folder = Path(folder)
        self.state_folder = self.folder / "writing"
        if getattr(model.tokenizer, "chat_template", None) is None:
            raise ValueError(f"{model.name} has no chat template; concept writing needs an instruct model.")
        self.sampler = sampler or chat_sampler(model, settings.backend)
        self._check_settings()

    def _check_settings(self) -> None:
        wanted = {"model": self.model.name, "fingerprint": self.model.fingerprint, **self.settings.generation_key(),
                  "backend": self.sampler.name}
        differ = settings_changes(self.state_folder / "settings.json", wanted)
        if differ:
            raise ConceptDataError(
                f"{self.folder} holds sentences written with other settings ({', '.join(differ)} differ). "
                "Use another folder, or the same settings to resume."
            )

    def progress_of(self, word: str) -> WordProgress:
        """The saved progress of ``word`` (empty if none)."""
        path = self.state_folder / f"{file_safe(word)}.json"
        if not path.exists():
            return WordProgress(word)
        data = json.loads(path.read_text())
        if data["word"] != word:
            raise ConceptDataError(f"{path} belongs to {data['word']!r}, not {word!r}: two words share a file name.")
        return WordProgress(**data)

    def _save(self, progress: WordProgress) -> None:
        name = file_safe(progress.word)
        atomic_write(self.state_folder / f"{name}.json", lambda p: p.write_text(json.dumps(asdict(progress))))
        rows = [{"concept": progress.word, "text": k["text"], "label": 1, "style": k["style"]}
                for k in progress.kept[: self.settings.n_positives]]
        if rows:
            atomic_write(self.folder / f"{name}.jsonl",
                         lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in rows)))

    def run_round(self, progress: WordProgress) -> None:
        """Generate one round for ``progress.word``, filter, and add the kept sentences to ``progress``."""
        s = self.settings
        prompts = round_prompts(progress.word, progress.rounds, s)
        start = time.perf_counter()
        answers, tokens = self.sampler.sample([m for _, m in prompts], round_seed(s.seed, progress.word, progress.rounds),
                                              Sampling(s.max_new_tokens, s.temperature, s.top_p, s.top_k))
        progress.seconds += time.perf_counter() - start
        progress.tokens += tokens
        pattern = mention_pattern(progress.word)
        seen = {" ".join(k["text"].lower().split()) for k in progress.kept}
        for (style, _), answer in zip(prompts, answers):
            for sentence in split_sentences(answer):
                progress.counts["generated"] += 1
                problem = sentence_problem(sentence, None if style in MENTION_FREE_STYLES else pattern,
                                           s.min_words, s.max_words)
                key = " ".join(sentence.lower().split())
                if problem is None and key in seen:
                    problem = "duplicate"
                if problem:
                    progress.counts[problem] += 1
                    continue
                seen.add(key)
                progress.counts["kept"] += 1
                progress.kept.append({"text": sentence, "style": style, "round": progress.rounds})
        progress.rounds += 1

    def write(self, words: Sequence[str], *, budget_seconds: float | None = None,
              progress: bool = True) -> WritingReport:
        """Write sentences for every word until each has ``n_positives`` (or ``max_rounds`` rounds).

        Words take turns one round at a time, so a run stopped by ``budget_seconds``
        (wall time; no new round starts after it) leaves every word with about the
        same number of sentences. Words already done are skipped.
        """
        words = list(dict.fromkeys(w.strip().lower() for w in words))
        if not words or any(not w for w in words):
            raise ValueError("Give at least one non-empty word.")
        states = {w: self.progress_of(w) for w in words}
        start = time.perf_counter()
        run_tokens = run_kept = 0
        stopped = False
        bar = tqdm(total=len(words) * self.settings.n_positives, unit="sent", desc="writing", disable=not progress)
        bar.update(sum(min(len(p.kept), self.settings.n_positives) for p in states.values()))
        try:
            while not stopped:
                pending = [w for w in words if not states[w].done(self.settings)]
                if not pending:
                    break
                fewest = min(states[w].rounds for w in pending)
                for w in (w for w in pending if states[w].rounds == fewest):
                    if budget_seconds is not None and time.perf_counter() - start > budget_seconds:
                        stopped = True
                        break
                    p = states[w]
                    before_kept, before_tokens = len(p.kept), p.tokens
                    self.run_round(p)
                    self._save(p)
                    run_kept += len(p.kept) - before_kept
                    run_tokens += p.tokens - before_tokens
                    bar.update(min(len(p.kept), self.settings.n_positives) - min(before_kept, self.settings.n_positives))
                    bar.set_postfix(word=w, kept_s=f"{run_kept / (time.perf_counter() - start):.2f}")
        finally:
            bar.close()
        return WritingReport([states[w] for w in words], self.settings.n_positives, time.perf_counter() - start, run_tokens, run_kept, stopped)


def write_concepts(model: LoadedModel, words: Sequence[str], folder: str | Path,
                   settings: WritingSettings = WritingSettings(), *, budget_seconds: float | None = None,
                   progress: bool = True, sampler: ChatSampler | None = None) -> WritingReport:
    """Write positive sentences for ``words`` into ``folder`` (resuming); see :class:`ConceptWriter`.

    Load the result with ``ConceptSet.load(folder).with_sampled_negatives(n, seed)``.
    """
    return ConceptWriter(model, folder, settings, sampler).write(words, budget_seconds=budget_seconds,
                                                                 progress=progress)
