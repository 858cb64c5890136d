"""The recall tasks: MQAR (Zoology, specs/tasks.md §1) and selective copying (Mamba, §2)."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from train.data.synthetic.common import IGNORE, _finish

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
