"""Synthetic sequence tasks as pure NumPy generators (specs/tasks.md), shared by train and eval.

Every task is a function of an explicit `numpy.random.Generator` that builds **one** example.
`example_rng(seed, stream, index)` gives each example its own generator, so any example of a
data set can be regenerated from `(seed, stream, index)` alone; train and held-out sets use
disjoint streams (`TRAIN_STREAM`, `VAL_STREAM`), the zoo's form of Zoology's disjoint seed
ranges. `generate(task, seed=..., n=...)` stacks `n` examples.

Token-level tasks return a dict with
  "inputs"    int32 [T]  the model's input tokens,
  "labels"    int32 [T]  the target of the output *at* position t, `IGNORE` (-100) where unscored
                         (inputs and labels are already shifted: no shift in the loss),
  "targets"   int32 [T]  labels with IGNORE replaced by 0 (what the trainer's loss consumes),
  "loss_mask" float32 [T] 1.0 exactly at the scored positions,
plus task metadata (answer positions, keys, values, depth, ...) documented per task.

The text tasks (`passkey_text`, `needle_text`) are tokenizer-agnostic builders: they take
`tokenize(str) -> list[int]` (byte-level by default, `byte_tokenize`) and measure lengths in
that tokenizer. `passkey_sequence` / `needle_sequence` turn them into fixed-length training rows
for byte-level models (vocabulary 256 bytes + BOS + EOS, `BYTE_VOCAB`).
"""
from __future__ import annotations

import importlib.resources
import json
import re
import uuid as _uuid
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np

IGNORE = -100
TRAIN_STREAM = 0
VAL_STREAM = 1

# Byte-level vocabulary for the text tasks: bytes 0..255, then BOS and EOS (EOS also right-pads).
BYTE_BOS = 256
BYTE_EOS = 257
BYTE_VOCAB = 258


def example_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The generator of example `index` of stream `stream` of a data set with seed `seed`."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(stream), int(index)]))


def _finish(inputs: np.ndarray, labels: np.ndarray, **meta) -> dict:
    inputs = np.asarray(inputs, np.int32)
    labels = np.asarray(labels, np.int32)
    scored = labels != IGNORE
    out = {"inputs": inputs, "labels": labels,
           "targets": np.where(scored, labels, 0).astype(np.int32),
           "loss_mask": scored.astype(np.float32)}
    out.update(meta)
    return out


# ------------------------------------------------------------------------------------------------
# 1. MQAR (Zoology)
# ------------------------------------------------------------------------------------------------

def mqar_check(*, seq_len: int, num_kv_pairs: int, vocab_size: int, num_passes: int = 1,
               power_a: float = 0.01) -> str | None:
    """The reason an MQAR setting is impossible, or None. Names match the data config keys."""
    T, D, V, P = seq_len, num_kv_pairs, vocab_size, num_passes
    if D < 1:
        return f"num_kv_pairs={D} must be >= 1"
    if P < 1:
        return f"mqar_num_passes={P} must be >= 1"
    if T % 2:
        return f"seq_len={T} must be even for MQAR"
    if 2 * D * P + 2 * D > T:
        return f"num_kv_pairs={D} does not fit in seq_len={T} (needs 2*D*passes + 2*D <= seq_len)"
    if V <= T:
        return f"vocab_size={V} must be > seq_len={T} for MQAR"
    if V // 2 - 1 < D or V - V // 2 < D:
        return f"vocab_size={V} has too few key/value tokens for num_kv_pairs={D}"
    if not power_a > 0:
        return f"mqar_power_a={power_a} must be > 0"
    return None


@lru_cache(maxsize=64)
def _gap_weights(space: int, a: float) -> np.ndarray:
    i = np.arange(1, space + 1, dtype=np.float64)
    w = a * i ** (a - 1)
    return w / w.sum()


@lru_cache(maxsize=64)
def _log_gap_weights(space: int, a: float) -> np.ndarray:
    return np.log(_gap_weights(space, a))


def weighted_sample_without_replacement(rng: np.random.Generator, log_p: np.ndarray,
                                        k: int) -> np.ndarray:
    """k distinct indices, in draw order, with the distribution of sequential weighted draws
    without replacement (NumPy `choice(n, k, replace=False, p=p)`: each draw proportional to p
    over the items left). Gumbel-top-k (Efraimidis-Spirakis): the indices of the k largest
    `log p + Gumbel` in decreasing order have exactly that distribution, at O(n) cost."""
    g = log_p - np.log(-np.log(rng.random(log_p.shape[0])))
    top = np.argpartition(-g, k - 1)[:k] if k < g.shape[0] else np.arange(g.shape[0])
    return top[np.argsort(-g[top], kind="stable")]


def mqar(rng: np.random.Generator, *, seq_len: int, num_kv_pairs: int, vocab_size: int,
         power_a: float = 0.01, random_non_queries: bool = False, num_passes: int = 1) -> dict:
    """Multi-query associative recall (Zoology `multiquery_ar`; specs/tasks.md §1).

    Setting: `T = seq_len` (even), `D = num_kv_pairs`, `V = vocab_size > T`, `2DP + 2D <= T`.
    Keys are D distinct tokens of {1..V/2-1} (0 is never a key), values D distinct tokens of
    {V/2..V-1}. The context block `k1 v1 ... kD vD` (repeated `num_passes` times, length c) is
    followed by a zero query block where key j sits at offset `2*gap_j`; the D distinct gaps are
    drawn from {0..(T-c)//2-1} sequentially without replacement with power-law weights
    `a*i^(a-1)` (NumPy `choice(replace=False, p=w)` semantics, sampled by Gumbel-top-k). The label
    at the position of each queried key is its value; every other label is IGNORE. With
    `random_non_queries` every 0 of the inputs becomes a uniform token of {0..V-1} drawn from
    `rng` (so the noise is reproducible from the seed, unlike Zoology's torch draw).

    Metadata: "answer_positions" int32 [D] (sorted), "keys" / "values" int32 [D] in context
    order, "query_keys" int32 [D] (the key queried at each answer position).
    """
    T, D, V, P = seq_len, num_kv_pairs, vocab_size, num_passes
    err = mqar_check(seq_len=T, num_kv_pairs=D, vocab_size=V, num_passes=P, power_a=power_a)
    if err:
        raise ValueError(err)
    keys = 1 + rng.choice(V // 2 - 1, size=D, replace=False)
    values = V // 2 + rng.choice(V - V // 2, size=D, replace=False)
    block = np.stack([keys, values], axis=1).reshape(-1)
    context = np.tile(block, P)
    c = context.size
    space = (T - c) // 2
    gaps = weighted_sample_without_replacement(rng, _log_gap_weights(space, float(power_a)), D)
    queries = np.zeros(T - c + 1, np.int64)
    queries[2 * gaps] = keys
    full = np.concatenate([context, queries])
    labels_full = np.full(T + 1, IGNORE, np.int64)
    labels_full[c + 2 * gaps + 1] = values
    inputs, labels = full[:T].copy(), labels_full[1:]
    if random_non_queries:
        zeros = inputs == 0
        inputs[zeros] = rng.integers(0, V, size=int(zeros.sum()))
    pos = np.sort(c + 2 * gaps)
    return _finish(inputs, labels, answer_positions=pos.astype(np.int32),
                   keys=keys.astype(np.int32), values=values.astype(np.int32),
                   query_keys=inputs[pos].astype(np.int32))


# ------------------------------------------------------------------------------------------------
# 2. Selective copying (Mamba)
# ------------------------------------------------------------------------------------------------

def selective_copying_check(*, seq_len: int, num_tokens_to_copy: int, vocab_size: int) -> str | None:
    M, A = num_tokens_to_copy, vocab_size
    if M < 1:
        return f"copy_num_tokens={M} must be >= 1"
    if A < 3:
        return f"vocab_size={A} must be >= 3 for selective copying (blank, data, marker)"
    if 2 * M > seq_len:
        return f"copy_num_tokens={M} does not fit in seq_len={seq_len} (needs 2*M <= seq_len)"
    return None


def selective_copying(rng: np.random.Generator, *, seq_len: int, num_tokens_to_copy: int,
                      vocab_size: int, variable: bool = True) -> dict:
    """Selective copying (S4 `torch_copying_data`, Mamba §4.1.1; specs/tasks.md §2).

    Setting: alphabet `A = vocab_size` with 0 = blank, 1..A-2 = data, A-1 = marker;
    `M = num_tokens_to_copy` data tokens; `L_n = seq_len - 2M` blanks, so the input length is
    exactly `seq_len = L_n + 2M` (the Mamba paper setting is A=16, M=16, L_n=4096, seq_len 4128).
    M i.i.d. data tokens are placed, in order, at M distinct sorted positions of the first
    `L_n + M` slots (positions 0..M-1 when `variable=False`: the classic copying task), followed by
    M markers. The outputs at the M marker positions must be the data tokens in order.

    Metadata: "answer_positions" int32 [M] (the marker positions), "data" int32 [M],
    "data_positions" int32 [M].
    """
    M, A = num_tokens_to_copy, vocab_size
    err = selective_copying_check(seq_len=seq_len, num_tokens_to_copy=M, vocab_size=A)
    if err:
        raise ValueError(err)
    L = seq_len - 2 * M
    data = rng.integers(1, A - 1, size=M)
    if variable:
        positions = np.sort(rng.choice(L + M, size=M, replace=False))
    else:
        positions = np.arange(M)
    inputs = np.zeros(seq_len, np.int64)
    inputs[positions] = data
    inputs[L + M:] = A - 1
    labels = np.full(seq_len, IGNORE, np.int64)
    labels[L + M:] = data
    return _finish(inputs, labels, answer_positions=np.arange(L + M, seq_len, dtype=np.int32),
                   data=data.astype(np.int32), data_positions=positions.astype(np.int32))


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


def passkey_tokens_check(*, seq_len: int, num_digits: int, num_filler_tokens: int) -> str | None:
    if num_digits < 1:
        return f"passkey_digits={num_digits} must be >= 1"
    if num_filler_tokens < 1:
        return f"passkey_filler_tokens={num_filler_tokens} must be >= 1"
    need = 2 * num_digits + 3  # BOS, KEY_START, digits, KEY_END, QUERY, digits-1 + 1 target
    if seq_len < need:
        return f"seq_len={seq_len} is too short for passkey_digits={num_digits} (needs >= {need})"
    return None


def passkey_tokens(rng: np.random.Generator, *, seq_len: int, depth: float | None = None,
                   num_digits: int = 5, num_filler_tokens: int = 16) -> dict:
    """Passkey retrieval with abstract tokens (specs/tasks.md §3.3, the zoo's training format).

    Vocabulary (`passkey_token_vocab`): digits 0..9 = tokens 0..9, F filler tokens 10..9+F, then
    BOS, KEY_START, KEY_END, QUERY (`vocab_size = 14 + F`). The full sequence of length
    `seq_len + 1` is `BOS, filler[:n_p], KEY_START d1..dn KEY_END, filler[:n_f - n_p], QUERY,
    d1..dn`, where filler is the fixed repeating pattern `10, 11, ..., 9+F, 10, ...` (both pieces
    start at its beginning, like Landmark's prefix/suffix), `n_f` fills the length exactly and
    `n_p = round(depth * n_f)` (depth uniform in [0, 1] when None). The key is a fixed-n-digit
    number, uniform in [10^(n-1), 10^n - 1] (the "fixed 5-digit keys" choice of §3.1 for n=5).
    inputs = full[:-1], labels = full[1:] scored only at the n positions QUERY, d1..d(n-1), whose
    targets are d1..dn (teacher forcing). Metric: exact match of all n digits.

    Metadata: "answer_positions" int32 [n], "answer" int32 [n] (the digits), "key" int,
    "needle_position" (index of KEY_START), "prompt_len" (= index of QUERY + 1: the prompt to
    feed before generating n digits), "depth" (realised n_p / n_f).
    """
    err = passkey_tokens_check(seq_len=seq_len, num_digits=num_digits,
                               num_filler_tokens=num_filler_tokens)
    if err:
        raise ValueError(err)
    voc = passkey_token_vocab(num_filler_tokens)
    n = num_digits
    key = int(rng.integers(10 ** (n - 1), 10 ** n))
    digits = np.array([int(c) for c in str(key)], np.int64)
    n_f = seq_len + 1 - (1 + (n + 2) + 1 + n)
    d = _draw_depth(rng, depth)
    n_p = int(round(d * n_f))
    pattern = voc["filler"] + np.arange(max(n_f, 1)) % num_filler_tokens
    full = np.concatenate([[voc["bos"]], pattern[:n_p], [voc["key_start"]], digits,
                           [voc["key_end"]], pattern[:n_f - n_p], [voc["query"]], digits])
    assert full.size == seq_len + 1
    q = seq_len - n  # index of QUERY in full (and in inputs)
    labels = np.full(seq_len, IGNORE, np.int64)
    labels[q:] = digits
    return _finish(full[:-1], labels, answer_positions=np.arange(q, seq_len, dtype=np.int32),
                   answer=digits.astype(np.int32), key=key, needle_position=1 + n_p,
                   prompt_len=q + 1, depth=n_p / n_f if n_f else 0.0)


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
    text = importlib.resources.files(__package__).joinpath(WORDLISTS).read_text(encoding="utf-8")
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


# ------------------------------------------------------------------------------------------------
# Fixed-length byte-level training rows for the text tasks
# ------------------------------------------------------------------------------------------------

def _byte_row(seq_len: int, prompt_ids: np.ndarray, answer_text: str,
              scored: Callable[[str], bool], **meta) -> dict:
    """[BOS] prompt " " answer [EOS], right-padded with EOS to seq_len + 1, shifted into
    inputs/labels; scored at the answer characters for which scored(char) holds."""
    ans = list((" " + answer_text).encode())
    full = np.concatenate([[BYTE_BOS], prompt_ids, ans, [BYTE_EOS]]).astype(np.int64)
    if full.size > seq_len + 1:
        raise ValueError(f"example of {full.size} tokens does not fit seq_len={seq_len}")
    start = 1 + prompt_ids.size  # index of the space in full
    full = np.concatenate([full, np.full(seq_len + 1 - full.size, BYTE_EOS)])
    labels = np.full(seq_len, IGNORE, np.int64)
    pos = [start + 1 + i - 1 for i, ch in enumerate(answer_text) if scored(ch)]  # input index
    pos = np.asarray(pos, np.int64)
    labels[pos] = full[pos + 1]
    return _finish(full[:-1], labels, answer_positions=pos.astype(np.int32),
                   prompt_len=int(start + 1), **meta)


def passkey_sequence(rng: np.random.Generator, *, seq_len: int, depth: float | None = None,
                     key_range: tuple[int, int] = (1, 50000)) -> dict:
    """A byte-level passkey training row (§3.3 "byte-level"): `[BOS] prompt " K" [EOS]` with the
    Landmark text prompt of `passkey_text` filling the row (right-padded with EOS when the key is
    short); the loss is on the digit bytes of K only. "prompt_len" is the length of
    `[BOS] prompt " "`; eval prompts with `[BOS] + prompt_ids` and reads the first integer."""
    budget = seq_len - 2 - len(str(key_range[1]))  # BOS, space, EOS, the longest key
    ex = passkey_text(rng, length=budget, depth=depth, key_range=key_range)
    return _byte_row(seq_len, ex["prompt_ids"], ex["answer"], str.isdigit, key=ex["key"],
                     depth=ex["depth"], answer=ex["answer"])


def needle_sequence(rng: np.random.Generator, *, seq_len: int, variant: str,
                    haystack_text: str | None = None, depth: float | None = None) -> dict:
    """A byte-level S-NIAH training row: `[BOS] input+answer_prefix " value" [EOS]`, the haystack
    sized by `needle_text` to leave room for the answer; the loss is on every byte of the value.
    """
    room = 3 + (36 if variant == "niah_single_3" else 7)  # BOS, space, EOS and the value
    ex = needle_text(rng, variant=variant, length=seq_len + 1, haystack_text=haystack_text,
                     depth=depth, answer_room=room)
    return _byte_row(seq_len, ex["prompt_ids"], ex["answer"], lambda ch: True, key=ex["key"],
                     depth=ex["depth"], answer=ex["answer"])


# ------------------------------------------------------------------------------------------------
# Data sets
# ------------------------------------------------------------------------------------------------

ARRAY_KEYS = ("inputs", "labels", "targets", "loss_mask")


def generate(task: Callable[..., dict], *, seed: int, n: int, stream: int = VAL_STREAM,
             start: int = 0, **params) -> dict:
    """Examples `start .. start+n-1` of stream `stream` of `task(**params)` with seed `seed`,
    stacked: the ARRAY_KEYS as [n, T] arrays and every metadata key as a list of n values."""
    exs = [task(example_rng(seed, stream, start + i), **params) for i in range(n)]
    out = {}
    for k in exs[0]:
        vals = [e[k] for e in exs]
        out[k] = np.stack(vals) if k in ARRAY_KEYS else vals
    return out
