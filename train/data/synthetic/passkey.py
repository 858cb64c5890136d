"""Passkey retrieval (specs/tasks.md §3): the Landmark-style text prompt (tokenizer-agnostic)
and the abstract-token form (§3.3)."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from train.data.synthetic.common import IGNORE, _finish

# ------------------------------------------------------------------------------------------------
# 3. Passkey retrieval
# ------------------------------------------------------------------------------------------------

PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                "memorize them. I will quiz you about the important information there.")
PASSKEY_FILLER_UNIT = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                       "There and back again.")
PASSKEY_QUESTION = "What is the pass key? The pass key is"


def passkey_needle(key: int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def byte_tokenize(text: str) -> np.ndarray:
    """The zoo's offline tokenizer: UTF-8 bytes (ids 0..255), as an int32 array."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def _filler_string(n_chars: int) -> str:
    reps = n_chars // (len(PASSKEY_FILLER_UNIT) + 1) + 1
    return " ".join([PASSKEY_FILLER_UNIT] * reps)[:n_chars]


def _draw_depth(rng, depth):
    return float(rng.uniform()) if depth is None else float(depth)


def passkey_prompt(key: int, n_chars: int, n_prefix: int) -> str:
    """Landmark's character-budget prompt: task, filler[:n_prefix], needle, filler[:n-n_prefix],
    question, joined with newlines (slicing may cut mid-word, as in the original)."""
    filler = _filler_string(n_chars)
    return "\n".join([PASSKEY_TASK, filler[:n_prefix], passkey_needle(key),
                      filler[:n_chars - n_prefix], PASSKEY_QUESTION])


def _largest(fits: Callable[[int], bool], hi: int) -> int:
    """Largest n in [0, hi] with fits(n) (fits monotone decreasing); -1 if none."""
    if not fits(0):
        return -1
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def passkey_text(rng: np.random.Generator, *, length: int, depth: float | None = None,
                 key_range: tuple[int, int] = (1, 50000),
                 tokenize: Callable[[str], Sequence[int]] = byte_tokenize) -> dict:
    """Passkey retrieval, text version (Landmark Attention; specs/tasks.md §3.1, character budget).

    The passkey K is uniform in `key_range` (inclusive; Landmark's [1, 50000] by default). The
    filler size n (characters) is the largest with `len(tokenize(prompt)) <= length`; the prefix
    has `round(depth * n)` characters (depth uniform in [0, 1] when None, i.e. Landmark's
    `n_p ~ U`). The prompt ends with the question "... The pass key is"; the expected
    continuation is " K". Metric (§3.2): greedy-generate ~10 tokens, the first `\\d+` must equal K.

    Returns {"prompt": str, "prompt_ids": int32 [n], "answer": str(K), "key": K,
    "depth": n_prefix / n (the realised depth), "n_filler": n}.
    """
    key = int(rng.integers(key_range[0], key_range[1] + 1))
    d = _draw_depth(rng, depth)

    def build(n):
        return passkey_prompt(key, n, int(round(d * n)))

    n = _largest(lambda n: len(tokenize(build(n))) <= length, max(length * 8, 64))
    if n < 0:
        raise ValueError(f"passkey length {length} is too short for the prompt without filler")
    prompt = build(n)
    n_prefix = int(round(d * n))
    return {"prompt": prompt, "prompt_ids": np.asarray(tokenize(prompt), np.int32),
            "answer": str(key), "key": key, "depth": n_prefix / n if n else 0.0, "n_filler": n}


# Abstract-token passkey (§3.3): digits 0..9 are tokens 0..9, then F filler tokens, then specials.
def passkey_token_vocab(num_filler_tokens: int) -> dict:
    F = num_filler_tokens
    return {"filler": 10, "bos": 10 + F, "key_start": 11 + F, "key_end": 12 + F,
            "query": 13 + F, "vocab_size": 14 + F}


PASSKEY_FILLERS = ("pattern", "random")


def passkey_tokens_check(*, seq_len: int, num_digits: int, num_filler_tokens: int,
                         filler: str = "pattern", distinct: bool = False) -> str | None:
    if distinct and not 1 <= num_digits <= 10:
        return f"passkey_digits={num_digits} must be <= 10 with passkey_distinct (distinct digits)"
    if filler not in PASSKEY_FILLERS:
        return f"passkey_filler={filler!r} is not one of {', '.join(PASSKEY_FILLERS)}"
    if num_digits < 1:
        return f"passkey_digits={num_digits} must be >= 1"
    if num_filler_tokens < 1:
        return f"passkey_filler_tokens={num_filler_tokens} must be >= 1"
    need = 2 * num_digits + 3  # BOS, KEY_START, digits, KEY_END, QUERY, digits-1 + 1 target
    if seq_len < need:
        return f"seq_len={seq_len} is too short for passkey_digits={num_digits} (needs >= {need})"
    return None


def passkey_tokens(rng: np.random.Generator, *, seq_len: int, depth: float | None = None,
                   num_digits: int = 5, num_filler_tokens: int = 16,
                   filler: str = "pattern", distinct: bool = False) -> dict:
    """Passkey retrieval with abstract tokens (specs/tasks.md §3.3, the zoo's training format).

    Vocabulary (`passkey_token_vocab`): digits 0..9 = tokens 0..9, F filler tokens 10..9+F, then
    BOS, KEY_START, KEY_END, QUERY (`vocab_size = 14 + F`). The full sequence of length
    `seq_len + 1` is `BOS, filler[:n_p], KEY_START d1..dn KEY_END, filler[:n_f - n_p], QUERY,
    d1..dn`, where filler is (`filler="pattern"`, §3.3 as written) the fixed repeating pattern
    `10, 11, ..., 9+F, 10, ...` (both pieces start at its beginning, like Landmark's
    prefix/suffix) or (`filler="random"`) i.i.d. uniform filler tokens drawn after the key and the
    depth, which leaves no phase of the pattern to locate the key by (§3.4's filler knob; the
    results protocol's choice: configs/results.py), `n_f` fills the length exactly and
    `n_p = round(depth * n_f)` (depth uniform in [0, 1] when None). The key is a fixed-n-digit
    number, uniform in [10^(n-1), 10^n - 1] (the "fixed 5-digit keys" choice of §3.1 for n=5).
    inputs = full[:-1], labels = full[1:] scored only at the n positions QUERY, d1..d(n-1), whose
    targets are d1..dn (teacher forcing). Metric: exact match of all n digits. With
    `distinct=True` the key's digits are distinct (first digit 1..9, then n - 1 of the other nine
    without replacement): a key with a repeated digit cannot be copied by an induction head that
    matches the current digit alone (the 2-layer Transformer's errors were exactly those keys:
    configs/results.py), so `distinct` separates retrieval from that copy ambiguity.

    Metadata: "answer_positions" int32 [n], "answer" int32 [n] (the digits), "key" int,
    "needle_position" (index of KEY_START), "prompt_len" (= index of QUERY + 1: the prompt to
    feed before generating n digits), "depth" (realised n_p / n_f).
    """
    err = passkey_tokens_check(seq_len=seq_len, num_digits=num_digits,
                               num_filler_tokens=num_filler_tokens, filler=filler,
                               distinct=distinct)
    if err:
        raise ValueError(err)
    voc = passkey_token_vocab(num_filler_tokens)
    n = num_digits
    if distinct:
        first = int(rng.integers(1, 10))
        rest = rng.permutation(np.delete(np.arange(10), first))[:n - 1]
        digits = np.concatenate([[first], rest]).astype(np.int64)
        key = int("".join(map(str, digits)))
    else:
        key = int(rng.integers(10 ** (n - 1), 10 ** n))
        digits = np.array([int(c) for c in str(key)], np.int64)
    n_f = seq_len + 1 - (1 + (n + 2) + 1 + n)
    d = _draw_depth(rng, depth)
    n_p = int(round(d * n_f))
    if filler == "random":
        fill = voc["filler"] + rng.integers(0, num_filler_tokens, size=n_f)
        pre, post = fill[:n_p], fill[n_p:]
    else:
        pattern = voc["filler"] + np.arange(max(n_f, 1)) % num_filler_tokens
        pre, post = pattern[:n_p], pattern[:n_f - n_p]
    full = np.concatenate([[voc["bos"]], pre, [voc["key_start"]], digits,
                           [voc["key_end"]], post, [voc["query"]], digits])
    assert full.size == seq_len + 1
    q = seq_len - n  # index of QUERY in full (and in inputs)
    labels = np.full(seq_len, IGNORE, np.int64)
    labels[q:] = digits
    return _finish(full[:-1], labels, answer_positions=np.arange(q, seq_len, dtype=np.int32),
                   answer=digits.astype(np.int32), key=key, needle_position=1 + n_p,
                   prompt_len=q + 1, depth=n_p / n_f if n_f else 0.0)
