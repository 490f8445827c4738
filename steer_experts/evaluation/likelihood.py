"""Likelihoods of texts under a causal LM: perplexity of continuations, and the exact probability
that a continuation begins with a word (next-word probability), for plain and steered models alike."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .diversity import nonempty_texts

if TYPE_CHECKING:
    from ..steering import SteeredModel


def _start_token_id(tokenizer) -> int:
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError(
        "the tokenizer has neither a BOS nor an EOS token to start each sequence with; "
        "pass add_start_token=False (the first token of each text is then context, not scored)."
    )


def perplexity(
    texts: Sequence[str],
    model: torch.nn.Module,
    tokenizer,
    *,
    prompts: Sequence[str] | None = None,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    add_start_token: bool = True,
    progress: bool = True,
) -> np.ndarray:
    """Per-text perplexity of ``texts`` under a causal LM: exp(mean token NLL in nats).

    Each sequence is ``[start] + prompt tokens + text tokens``; only the text
    tokens are scored, so with ``prompts`` (one per text) this is the perplexity
    of a continuation given its prompt. Prompt and text are tokenised apart, as
    generated continuations are. The start token is the tokenizer's BOS (EOS if
    it has none, as for GPT-2) and lets the first text token be scored; with
    ``add_start_token=False`` and no prompt, the first text token is context only.

    ``model`` is any module whose call ``model(input_ids=..., attention_mask=...)``
    returns an object with ``.logits`` (a Hugging Face causal LM, with hooks if
    steered). Batches are right-padded with attention masks and sorted by
    length; no gradients are kept and the model is put in eval mode for the
    call. Returns a float64 array in the order of ``texts``; a text with no
    scored token (empty) gets NaN.
    """
    texts = nonempty_texts(texts, "perplexity")
    if prompts is not None:
        prompts = list(prompts)
        if len(prompts) != len(texts):
            raise ValueError(f"perplexity got {len(prompts)} prompts for {len(texts)} texts; pass one prompt per text.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    device = torch.device(device) if device is not None else next(model.parameters()).device

    start = [_start_token_id(tokenizer)] if add_start_token else []
    text_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else [[] for _ in texts]
    sequences = [start + list(p) + list(t) for p, t in zip(prompt_ids, text_ids)]
    # Position of the first scored token: it needs at least one token before it.
    first_scored = [max(1, len(start) + len(p)) for p in prompt_ids]

    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest = max(len(s) for s in sequences)
    if max_positions is not None and longest > max_positions:
        raise ValueError(
            f"a prompt + text is {longest} tokens, more than the model's {max_positions} positions; shorten the texts."
        )
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)

    result = np.full(len(texts), np.nan, dtype=np.float64)
    order = sorted(range(len(texts)), key=lambda i: -len(sequences[i]))
    batches = [order[b : b + batch_size] for b in range(0, len(order), batch_size)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="perplexity", disable=not progress, leave=False):
                _score_batch(model, [sequences[i] for i in batch], [first_scored[i] for i in batch],
                             pad_id, device, result, batch)
    finally:
        model.train(was_training)
    return result


def _score_batch(
    model: torch.nn.Module,
    sequences: list[list[int]],
    first_scored: list[int],
    pad_id: int,
    device: torch.device,
    result: np.ndarray,
    positions: list[int],
) -> None:
    """Write the perplexity of each sequence of one batch into ``result[positions]``."""
    width = max(len(s) for s in sequences)
    if width < 2:  # nothing to predict in this batch
        return
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    scored = torch.zeros((len(sequences), width - 1), dtype=torch.bool)  # scored[:, t] <=> token t+1 is scored
    for row, (seq, first) in enumerate(zip(sequences, first_scored)):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
        scored[row, first - 1 : len(seq) - 1] = True
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:].to(device), reduction="none"
    ).to(torch.float64).cpu()
    n_scored = scored.sum(dim=1)
    mean_nll = (nll * scored).sum(dim=1) / n_scored.clamp(min=1)
    for row, pos in enumerate(positions):
        if n_scored[row] > 0:
            result[pos] = math.exp(float(mean_nll[row]))


# --------------------------------------------------------------------------- steered models, next words


class SteeredScorer(torch.nn.Module):
    """A steered model seen as a plain module, so ``evaluation.perplexity`` can score with it.

    The forward runs :meth:`SteeredModel.__call__` (steered at every position), so the
    perplexity it gives is that of the steered model itself. The base model is a
    submodule only so that ``parameters()``, ``eval()`` and ``.config`` reach it.
    """

    def __init__(self, steered: SteeredModel):
        super().__init__()
        self.steered = steered
        self.base = steered.base.model
        self.config = self.base.config

    def forward(self, input_ids, attention_mask):
        return self.steered(input_ids=input_ids, attention_mask=attention_mask)


def word_token_ids(tokenizer, context: str, word: str) -> list[int]:
    """Token ids of `` word`` as it follows ``context``: the tail of tokenize(context + " " + word)
    when the context's own tokens are its head (the natural split), else `` word`` tokenised alone."""
    head = tokenizer(context)["input_ids"]
    full = tokenizer(context + " " + word)["input_ids"]
    if full[: len(head)] == head and len(full) > len(head):
        return full[len(head):]
    return tokenizer(" " + word, add_special_tokens=False)["input_ids"]


def next_word_probability(scorer: torch.nn.Module, tokenizer, contexts: Sequence[str], words: Sequence[str],
                          batch_size: int = 64) -> np.ndarray:
    """Probability that the continuation of each context begins with each word, shape (contexts, words).

    Exact under ``scorer`` (a causal LM module, e.g. a :class:`SteeredScorer`): the product
    of the probabilities of the word's tokens (chain rule), so one forward pass per
    (context, word) and no sampling. It counts the continuation's first tokens, so a
    derived word that starts with the same tokens ("footballer" after " football") counts too.
    Rows of words that share a token prefix overlap; see :func:`distinct_forms`.
    """
    contexts, words = list(contexts), list(words)
    items = []
    for c in contexts:
        head = tokenizer(c)["input_ids"]
        for w in words:
            items.append((head, word_token_ids(tokenizer, c, w)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(scorer.parameters()).device
    log_p = np.empty(len(items))
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            width = max(len(h) + len(w) for h, w in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (h, w) in enumerate(batch):  # right padding: positions stay those of generation
                ids[row, : len(h) + len(w)] = torch.tensor(h + w)
                mask[row, : len(h) + len(w)] = 1
            logits = scorer(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            log_probs = torch.log_softmax(logits, dim=-1).cpu()
            for row, (h, w) in enumerate(batch):
                positions = torch.arange(len(h) - 1, len(h) + len(w) - 1)
                log_p[start + row] = float(log_probs[row, positions, torch.tensor(w)].sum())
    return np.exp(log_p).reshape(len(contexts), len(words))


def distinct_forms(tokenizer, context: str, forms: Sequence[str]) -> list[str]:
    """The forms whose tokens after ``context`` do not start with another kept form's tokens,
    so that summing their :func:`next_word_probability` counts no continuation twice."""
    ids = {f: word_token_ids(tokenizer, context, f) for f in dict.fromkeys(forms)}
    kept: list[str] = []
    for form in sorted(ids, key=lambda f: (len(ids[f]), f)):
        if not any(ids[form][: len(ids[k])] == ids[k] for k in kept):
            kept.append(form)
    return kept
