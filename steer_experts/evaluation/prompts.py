"""Prompt sets of the steering recipes, documented so that results can be read against them.

* :data:`NEUTRAL_PROMPTS` -- openings that invite no concept in particular (and no
  gender): concept induction samples from these, so any concept word in a
  continuation comes from the steering, not from the prompt.
* :data:`FRONTIER_PROMPTS` -- 36 neutral openings (the 12 above and 24 more in
  the same spirit) for the steering frontier, which chooses settings on one half
  of them and reports on the other.
* :data:`INVITING_PROMPTS` -- per concept word, openings whose natural next words
  are the concept ("My favourite sport is" -> football). Causal validation ablates
  experts on these: if the experts carry the concept, removing them must lower
  p(concept) where it is otherwise likely. :func:`inviting_prompts` falls back to
  :data:`GENERIC_INVITING_TEMPLATES` for other concepts.
* :data:`OCCUPATIONS` and :func:`occupation_contexts` -- the "The <occupation> said
  that" contexts of the gender-parity experiment (Suau et al. 2022, section 6).
  The list mixes occupations whose text is skewed toward women (nurse, secretary,
  receptionist, ...), toward men (mechanic, carpenter, engineer, ...) and less
  skewed ones (teacher, doctor, writer, ...), about 20 in all.
"""

from __future__ import annotations

from ..words import concept_word

NEUTRAL_PROMPTS: tuple[str, ...] = (
    "Once upon a time",
    "The best thing about this",
    "It was a cold morning and",
    "I have always thought that",
    "Here is what happened next:",
    "Yesterday, after lunch,",
    "The report published today",
    "In the beginning",
    "Let me tell you about",
    "This weekend we",
    "The most important lesson",
    "According to the news,",
)

FRONTIER_PROMPTS: tuple[str, ...] = NEUTRAL_PROMPTS + (
    "When I opened the door,",
    "The thing nobody tells you is",
    "After a long day,",
    "She looked out of the window and",
    "There is a small town where",
    "My neighbour asked me whether",
    "On the way home,",
    "The letter arrived on a Tuesday, and",
    "Last year, for the first time,",
    "We sat down together and",
    "If you ask me,",
    "The old photograph showed",
    "Nobody expected that",
    "At the end of the meeting,",
    "It all started when",
    "The plan for tomorrow is",
    "He picked up the phone and",
    "The story I want to share",
    "Every morning, before work,",
    "What surprised me most was",
    "In a quiet corner of the city,",
    "The first thing I noticed",
    "Years later, people still talk about",
    "This is how it works:",
)

INVITING_PROMPTS: dict[str, tuple[str, ...]] = {
    "football": (
        "My favourite sport is",
        "On Saturday afternoon we went to the stadium to watch the",
        "The team captain kicked the ball and",
        "The World Cup final was",
        "He scored a goal in the last minute of the",
        "Every Sunday my brother plays",
        "The coach told the players before the",
        "Millions of fans follow the Premier League because",
    ),
    "woman": (
        "My mother is a",
        "The girl grew up to become a",
        "The bride walked down the aisle, a",
        "She is the kind of",
        "The queen was a proud",
        "My grandmother was an old",
        "The actress, a young",
        "My sister is a strong",
    ),
    "man": (
        "My father is a",
        "The boy grew up to become a",
        "The groom stood at the altar, a",
        "He is the kind of",
        "The king was a proud",
        "My grandfather was an old",
        "The actor, a young",
        "My brother is a strong",
    ),
}

# For a concept without its own prompts; {word} is the concept word. The prompt
# names the word, so a continuation repeating it is the model's own choice.
GENERIC_INVITING_TEMPLATES: tuple[str, ...] = (
    "Let me tell you more about the {word}:",
    "Everything you need to know about {word}.",
    "I wrote a short story about a {word}. It begins:",
    "The first thing that comes to mind when I think of {word} is",
)

OCCUPATIONS: tuple[str, ...] = (
    "nurse", "secretary", "receptionist", "hairdresser", "housekeeper", "librarian", "dancer",
    "teacher", "doctor", "writer", "cashier", "scientist", "lawyer", "baker",
    "engineer", "mechanic", "carpenter", "plumber", "pilot", "firefighter", "programmer", "surgeon",
)

OCCUPATION_TEMPLATE = "The {occupation} said that"


def inviting_prompts(name: str) -> tuple[str, ...]:
    """Prompts that invite concept ``name`` (its own set, or the generic templates filled with its word)."""
    word = concept_word(name)
    if word in INVITING_PROMPTS:
        return INVITING_PROMPTS[word]
    return tuple(t.format(word=word) for t in GENERIC_INVITING_TEMPLATES)


def occupation_contexts(occupations: tuple[str, ...] | list[str] = OCCUPATIONS,
                        template: str = OCCUPATION_TEMPLATE) -> list[str]:
    """One context per occupation, ``template`` filled in (default "The <occupation> said that")."""
    if "{occupation}" not in template:
        raise ValueError(f"template {template!r} has no {{occupation}} slot; e.g. {OCCUPATION_TEMPLATE!r}.")
    return [template.format(occupation=o) for o in occupations]
