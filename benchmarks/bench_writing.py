"""Concept writing: the CTranslate2 writer against the transformers writer, on the same words.

Three writers write ``--rounds`` rounds for each word with the same prompts, batch, token limit and
filters, in one process, taking turns word by word so that a noisy neighbour slows all alike:

* transformers as it was before this benchmark existed: no top-k cut (top_k 0), 64 new tokens;
* transformers with today's settings (top_k 50);
* CTranslate2 int8 with today's settings: the default writer.

Printed per writer: kept sentences/s, tokens/s, yield (kept / candidate sentences) and why the
rest was dropped; then the ratios of kept sentences/s. The same answers are also split the old way
(a full stop after "Dr." ended a sentence) to show what the new splitter adds to the yield.

    python benchmarks/bench_writing.py [--words ocean,doctor,bread,guitar] [--rounds 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from steer_experts.models import load_model
from steer_experts.words import mention_pattern
from steer_experts.writing import DROP_REASONS, WritingSettings, chat_sampler, sentence_problem, write_concepts
from steer_experts.writing.writer import _LIST_MARKER, _SENTENCE_END


class Recording:
    """Passes messages to a sampler; keeps its answers and the seconds it took."""

    def __init__(self, sampler):
        self.sampler, self.name, self.answers, self.seconds = sampler, sampler.name, [], 0.0

    def sample(self, messages, seed, sampling):
        start = time.perf_counter()
        answers, tokens = self.sampler.sample(messages, seed, sampling)
        self.seconds += time.perf_counter() - start
        self.answers.append((messages, answers))
        return answers, tokens


def _split_as_before(text: str) -> list[str]:
    """The splitter before titles were kept whole (split after every . ! ?)."""
    out = []
    for line in text.splitlines():
        line = _LIST_MARKER.sub("", line).strip()
        out.extend(s.strip() for s in _SENTENCE_END.split(line) if s.strip())
    return out


def _yield_as_before(recording: Recording, words: list[str], settings: WritingSettings) -> float:
    kept = generated = 0
    seen: dict[str, set] = {w: set() for w in words}
    for word, (_, answers) in zip([w for w in words for _ in range(settings.max_rounds)], recording.answers):
        pattern = mention_pattern(word)
        for answer in answers:
            for sentence in _split_as_before(answer):
                generated += 1
                key = " ".join(sentence.lower().split())
                if sentence_problem(sentence, pattern, settings.min_words, settings.max_words) is None \
                        and key not in seen[word]:
                    kept += 1
                    seen[word].add(key)
    return kept / generated


def main() -> None:
    """Run both writers and print the table and the ratio."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--words", default="ocean,doctor,bread,guitar")
    p.add_argument("--rounds", type=int, default=1, help="rounds per word and writer")
    p.add_argument("--batch-size", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    words = args.words.split(",")
    model = load_model("smollm2-135m")
    today = WritingSettings(n_positives=10_000, max_rounds=args.rounds, batch_size=args.batch_size)
    before = replace(today, top_k=0, max_new_tokens=64)
    writers = {"transformers (before)": (before, Recording(chat_sampler(model, "transformers"))),
               "transformers, top_k 50": (today, Recording(chat_sampler(model, "transformers"))),
               "ctranslate2-int8, top_k 50": (today, Recording(chat_sampler(model, "ctranslate2")))}
    totals = {name: Counter() for name in writers}
    with tempfile.TemporaryDirectory() as tmp:
        for word in words:
            for i, (name, (settings, recording)) in enumerate(writers.items()):
                report = write_concepts(model, [word], Path(tmp) / str(i), settings, progress=False, sampler=recording)
                totals[name].update(report.words[0].counts)
                totals[name]["tokens"] += report.words[0].tokens
    print(f"{len(words)} words x {args.rounds} rounds x {args.batch_size} prompts; {today.max_new_tokens} new tokens "
          f"(before: {before.max_new_tokens}); {args.threads} threads")
    print(f"{'writer':28} {'seconds':>8} {'tokens/s':>9} {'kept':>6} {'kept/s':>7} {'yield':>6} {'old split':>9}  dropped")
    rate = {}
    for name, (settings, recording) in writers.items():
        t = totals[name]
        rate[name] = t["kept"] / recording.seconds
        drops = ", ".join(f"{r} {t[r] / t['generated']:.0%}" for r in DROP_REASONS if t[r])
        print(f"{name:28} {recording.seconds:8.1f} {t['tokens'] / recording.seconds:9.1f} {t['kept']:6d} "
              f"{rate[name]:7.2f} {t['kept'] / t['generated']:6.1%} {_yield_as_before(recording, words, settings):9.1%}"
              f"  {drops}")
    new, old, same = rate["ctranslate2-int8, top_k 50"], rate["transformers (before)"], rate["transformers, top_k 50"]
    print(f"ratio (kept sentences/s), the default writer / transformers before: {new / old:.2f}x")
    print(f"ratio (kept sentences/s), CTranslate2 / transformers, both top_k 50: {new / same:.2f}x")


if __name__ == "__main__":
    main()
