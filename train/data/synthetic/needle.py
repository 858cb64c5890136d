"""RULER's single needle in a haystack (S-NIAH, specs/tasks.md §4): the three variants, the
wonderwords keys, the essay haystack."""
from __future__ import annotations

import importlib.resources
import json
import re
import uuid as _uuid
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np

from train.data.synthetic.passkey import PASSKEY_FILLER_UNIT, _largest, byte_tokenize

# ------------------------------------------------------------------------------------------------
# 4. RULER single needle in a haystack (S-NIAH)
# ------------------------------------------------------------------------------------------------

NIAH_VARIANTS = ("niah_single_1", "niah_single_2", "niah_single_3")
NIAH_DEPTHS = tuple(int(round(x)) for x in np.linspace(0, 100, 40))  # essay depths, in percent
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+")


def key_multiplicities(adjs: Sequence[str], nouns: Sequence[str]) -> dict[str, int]:
    """The strings `adj-noun` produced by more than one (adj, noun) pair of the (de-duplicated)
    lists, with their number of pairs. "a1-n1" == "a2-n2" with a1 != a2 needs a2 = a1-x and
    n1 = x-n2 (hyphenated words), so only those are searched, not the full product."""
    adj_set, noun_set = set(adjs), set(nouns)
    counts: dict[str, int] = {}
    for a2 in adjs:
        for i, ch in enumerate(a2):
            if ch == "-" and a2[:i] in adj_set:
                x = a2[i + 1:]
                for n1 in nouns:
                    if n1.startswith(x + "-") and n1[len(x) + 1:] in noun_set:
                        s = f"{a2}-{n1[len(x) + 1:]}"
                        counts[s] = counts.get(s, 1) + 1
    return counts


WORDLISTS = "wordlists.json"   # package data of train.data (see its "about" and "license")


@lru_cache(maxsize=1)
def word_lists() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The adjective and noun lists of the `wonderwords` package (3.0.1), as vendored in
    train/data/wordlists.json (MIT license, in the file), read on first use."""
    text = importlib.resources.files("train.data").joinpath(WORDLISTS).read_text(encoding="utf-8")
    d = json.loads(text)
    return tuple(d["adjectives"]), tuple(d["nouns"])


@lru_cache(maxsize=1)
def _niah_words():
    """The de-duplicated adjective and noun lists (wonderwords) and the key multiplicities."""
    adjectives, nouns = word_lists()
    adjs, nouns = tuple(dict.fromkeys(adjectives)), tuple(dict.fromkeys(nouns))
    return adjs, nouns, key_multiplicities(adjs, nouns)


def niah_key(rng: np.random.Generator) -> str:
    """A key `{adjective}-{noun}` uniform over the de-duplicated cross product (§4.2)."""
    adjs, nouns, multi = _niah_words()
    while True:
        s = f"{adjs[rng.integers(len(adjs))]}-{nouns[rng.integers(len(nouns))]}"
        m = multi.get(s, 1)
        if m == 1 or rng.uniform() < 1.0 / m:
            return s


def niah_value(rng: np.random.Generator, variant: str) -> str:
    """A 7-digit number in [1000000, 9999999] (single_1/2) or a UUID4 string (single_3)."""
    if variant == "niah_single_3":
        return str(_uuid.UUID(bytes=rng.bytes(16), version=4))
    return str(int(rng.integers(1_000_000, 10_000_000)))


def _niah_parts(variant: str, key: str):
    kind = "uuid" if variant == "niah_single_3" else "number"
    needle = f"One of the special magic {kind}s for {key} is: {{value}}."
    head = (f"A special magic {kind} is hidden within the following text. Make sure to memorize "
            f"it. I will quiz you about the {kind} afterwards.\n")
    question = f"\nWhat is the special magic {kind} for {key} mentioned in the provided text?"
    answer_prefix = f" The special magic {kind} for {key} mentioned in the provided text is"
    return needle, head, question, answer_prefix


@lru_cache(maxsize=4)
def _words_of(text: str) -> tuple[str, ...]:
    return tuple(text.split())


def _essay_words(haystack_text: str, n: int) -> list[str]:
    words = _words_of(haystack_text)
    if not words:
        raise ValueError("needle haystack text is empty")
    reps = -(-n // len(words))
    return list((words * reps)[:n]) if reps > 1 else list(words[:n])


def needle_text(rng: np.random.Generator, *, variant: str, length: int,
                haystack_text: str | None = None, depth: float | None = None,
                answer_room: int = 128,
                tokenize: Callable[[str], Sequence[int]] = byte_tokenize) -> dict:
    """RULER single-needle-in-a-haystack, offline (specs/tasks.md §4), one sample.

    variant: "niah_single_1" (noise haystack: the passkey filler sentence as lines, key word,
    7-digit value), "niah_single_2" (essay haystack, 7-digit value) or "niah_single_3" (essay,
    UUID value). Essay variants need `haystack_text`, any local long text (label such runs
    "essay-substituted"); its whitespace is collapsed, the first n words are taken (repeating the
    text if needed), split into sentences with a regex splitter (`(?<=[.!?])\\s+`, standing in for
    NLTK punkt) and the needle goes before sentence floor(#sents * depth); depth is drawn from
    RULER's 40 percentages round(linspace(0, 100, 40)) when None. The noise variant inserts the
    needle line at a uniform index of 0..n-1 (depth given: index round(depth * (n - 1))).
    n is the largest haystack size (lines or words, exact binary search rather than RULER's
    steps of 25/500) with `len(tokenize(input + answer_prefix)) + answer_room <= length`.
    The model is prompted with `input + answer_prefix`; metric (§4.5) `string_match_all`: the
    value must occur, case-insensitively, in the continuation.

    Returns {"input", "answer_prefix", "prompt" (= input + answer_prefix), "prompt_ids",
    "answer" (the value string), "key", "depth" (fraction in [0, 1]), "n_haystack"}.
    """
    if variant not in NIAH_VARIANTS:
        raise ValueError(f"unknown needle variant {variant!r}; expected one of {NIAH_VARIANTS}")
    essay = variant != "niah_single_1"
    if essay and not haystack_text:
        raise ValueError(f"needle variant {variant} needs a haystack text (essay-substituted)")
    key = niah_key(rng)
    value = niah_value(rng, variant)
    needle_t, head, question, answer_prefix = _niah_parts(variant, key)
    needle = needle_t.format(value=value)
    if essay:
        pct = float(NIAH_DEPTHS[rng.integers(len(NIAH_DEPTHS))]) if depth is None else 100.0 * depth
    else:
        u = float(rng.uniform())  # drawn once; the index scales with n

    def build(n):
        if essay:
            sents = _SENT_SPLIT.split(" ".join(_essay_words(haystack_text, n))) if n else []
            at = int(len(sents) * pct / 100.0)
            ctx = " ".join(sents[:at] + [needle] + sents[at:])
            return ctx, (at / len(sents) if sents else 0.0)
        lines = [PASSKEY_FILLER_UNIT] * n
        at = (int(u * n) if depth is None else int(round(depth * max(n - 1, 0)))) if n else 0
        lines.insert(at, needle)
        return "\n".join(lines), (at / n if n else 0.0)

    def text(n):
        return head + build(n)[0] + question

    def fits(n):
        return len(tokenize(text(n) + answer_prefix)) + answer_room <= length

    n = _largest(fits, max(length, 16))
    if n < 0:
        raise ValueError(f"needle length {length} is too short for the prompt without haystack")
    inp = text(n)
    prompt = inp + answer_prefix
    return {"input": inp, "answer_prefix": answer_prefix, "prompt": prompt,
            "prompt_ids": np.asarray(tokenize(prompt), np.int32), "answer": value, "key": key,
            "depth": build(n)[1], "n_haystack": n}
