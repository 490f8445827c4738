"""Words of a concept: its plain word, its forms, and the patterns that find it in text.

One module holds every rule that decides whether a text mentions a concept:

* :func:`concept_word` -- the plain word of a concept name (``"football"`` for
  OneSec's ``"football-1_04_00__"``).
* :func:`concept_words` -- the noun forms that *scoring* counts: the word, its
  plural (irregulars such as man -> men included) and the possessives of both.
  Scoring stays narrow on purpose: "footballer" is another word.
* :func:`word_forms` -- the wider set that *writing* concept sentences accepts:
  every regular inflection (-s, -ed, -ing, -er, -est), worked back from an
  inflected word too, so that a sentence about "sit" may say "sitting".
* :func:`words_pattern` / :func:`mention_pattern` -- the whole-word regexes over
  those forms (scoring lets a hyphen end a word, "football-mad"; writing does not).
"""

from __future__ import annotations

import functools
import re
from typing import Iterable


def concept_word(name: str) -> str:
    """The plain word of a concept name: ``"football"`` for OneSec's ``"football-1_04_00__"``."""
    return name.split("-")[0].replace("_", " ").strip()


# --------------------------------------------------------------------------- scoring: noun forms

# Irregular plurals of common concept nouns; anything else goes through `extra`.
IRREGULAR_PLURALS: dict[str, str] = {
    "man": "men",
    "woman": "women",
    "child": "children",
    "person": "people",
    "foot": "feet",
    "tooth": "teeth",
    "goose": "geese",
    "mouse": "mice",
}

_VOWELS = frozenset("aeiou")


def _plurals(word: str) -> list[str]:
    """Plural forms of one lower-case English noun (several where spelling varies)."""
    if word in IRREGULAR_PLURALS:
        return [IRREGULAR_PLURALS[word]]
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return [word + "es"]
    if len(word) > 1 and word.endswith("y") and word[-2] not in _VOWELS:
        return [word[:-1] + "ies"]
    if word.endswith("o"):
        # "potatoes" but "photos": keep both, a wrong spelling never matches real text.
        return [word + "s", word + "es"]
    return [word + "s"]


def concept_words(concept: str, extra: Iterable[str] = ()) -> list[str]:
    """Return the concept word and its simple English inflections, lower case.

    Includes the word itself, its plural (-s, -es, consonant+y -> -ies, and the
    irregulars in :data:`IRREGULAR_PLURALS` such as man -> men, woman -> women),
    and the possessives of both (``man's``, ``men's``, ``footballs'``). For a
    multi-word concept only the last word is inflected ("ice cream" -> "ice
    creams"). ``extra`` forms (e.g. ``"footballer"``) are added verbatim, lower
    cased. Derived words are *not* generated: "footballer" is a different word
    from "football" and counts only if passed in ``extra``.
    """
    base = " ".join(concept.split()).lower()
    if not base:
        raise ValueError("concept is empty; pass the concept word, e.g. concept_words('football').")
    head, _, last = base.rpartition(" ")
    prefix = head + " " if head else ""
    forms = [base]
    for plural in _plurals(last):
        forms.append(prefix + plural)
    possessives = [f + ("'" if f.endswith("s") and f != base else "'s") for f in forms]
    words = forms + possessives + [" ".join(e.split()).lower() for e in extra]
    return list(dict.fromkeys(w for w in words if w))


def concept_forms(concept: str, capitalised: bool = False) -> list[str]:
    """The word of ``concept`` (a concept name or a word) and its plurals, without possessives:
    the forms a next token can start. ``capitalised`` follows each form with its capitalised one."""
    forms = [w for w in concept_words(concept_word(concept)) if "'" not in w]
    return list(dict.fromkeys(f for w in forms for f in ((w, w.capitalize()) if capitalised else (w,))))


@functools.lru_cache(maxsize=64)
def words_pattern(words: tuple[str, ...]) -> re.Pattern[str]:
    """A case-insensitive regex matching any of ``words`` (a tuple, e.g. of :func:`concept_words`) as a whole word."""
    # Longest first so the alternation prefers "football's" over "football";
    # (?<!\w)/(?!\w) instead of \b so words ending in an apostrophe still match.
    alternatives = sorted({w.lower() for w in words}, key=len, reverse=True)
    body = "|".join(r"\s+".join(re.escape(part) for part in w.split()) for w in alternatives)
    return re.compile(rf"(?<!\w)(?:{body})(?!\w)", re.IGNORECASE)


def word_tuple(words: Iterable[str]) -> tuple[str, ...]:
    """``words`` cleaned (white space folded, empties dropped) as a tuple; refuses a bare string or nothing."""
    if isinstance(words, str):
        raise TypeError(f"words must be a list of words, not the string {words!r}; use concept_words({words!r}).")
    cleaned = tuple(" ".join(w.split()) for w in words)
    cleaned = tuple(w for w in cleaned if w)
    if not cleaned:
        raise ValueError("words is empty; pass e.g. concept_words('football').")
    return cleaned


# --------------------------------------------------------------------------- writing: every inflection

def word_forms(word: str) -> set[str]:
    """The word and its regular English inflections, lower case.

    Covers plurals / 3rd person (-s, -es, -ies), -ed, -ing, -er, -est, with final-e
    dropping and consonant doubling, and works back from an inflected form
    ("sitting" -> "sit", "flowers" -> "flower"), so that a sentence about
    "sit" counts for "sitting". Irregular forms ("ran") are not covered.
    """
    word = word.lower().strip()
    stems = {word}
    for suffix, replacement in (("ies", "y"), ("es", ""), ("s", ""), ("ied", "y"), ("ed", ""), ("ed", "e"),
                                ("ing", ""), ("ing", "e")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            stem = word[: len(word) - len(suffix)] + replacement
            if suffix == "es" and not stem.endswith(("s", "x", "z", "ch", "sh", "o")):
                continue  # "stripes" is stripe + s, not strip + es
            stems.add(stem)
            if len(stem) >= 4 and stem[-1] == stem[-2] and stem[-1] not in "aeiouls":
                stems.add(stem[:-1])  # "sitting" -> "sitt" -> "sit"
    return set().union(*(_inflections(stem) for stem in stems))


def _inflections(stem: str) -> set[str]:
    vowels = "aeiou"
    forms = {stem, stem + "'s"}
    consonant_y = stem.endswith("y") and len(stem) > 2 and stem[-2] not in vowels
    forms.add(stem + "es" if stem.endswith(("s", "x", "z", "ch", "sh", "o")) else
              stem[:-1] + "ies" if consonant_y else stem + "s")
    if stem.endswith("e"):
        forms |= {stem + "d", stem + "r", stem + "st", stem[:-1] + "ing"}
    elif consonant_y:
        forms |= {stem[:-1] + "ied", stem[:-1] + "ier", stem[:-1] + "iest", stem + "ing"}
    elif len(stem) <= 4 and len(stem) >= 3 and stem[-1] not in vowels + "wxy" and stem[-2] in vowels \
            and stem[-3] not in vowels:
        forms |= {stem + stem[-1] + suffix for suffix in ("ed", "ing", "er", "est")}  # sit -> sitting
    else:
        forms |= {stem + suffix for suffix in ("ed", "ing", "er", "est")}
    return forms


def mention_pattern(word: str) -> re.Pattern:
    """A case-insensitive regex matching any of :func:`word_forms` as a whole word."""
    alternatives = sorted(word_forms(word), key=len, reverse=True)
    return re.compile(r"(?<![\w-])(?:" + "|".join(map(re.escape, alternatives)) + r")(?![\w-])", re.IGNORECASE)


def mentions(sentence: str, word: str) -> bool:
    """True if ``sentence`` contains ``word`` or an inflection of it as a whole word."""
    return bool(mention_pattern(word).search(sentence))
