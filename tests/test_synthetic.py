"""Invariants of the synthetic task generators (train/data/synthetic/, specs/tasks.md)."""
import itertools
import re
import uuid

import numpy as np
import pytest

from train.data import synthetic as S

ADJECTIVES, NOUNS = S.word_lists()


def rngs(n, seed=0, stream=S.TRAIN_STREAM):
    return [S.example_rng(seed, stream, i) for i in range(n)]


def check_common(ex, T):
    assert ex["inputs"].shape == ex["labels"].shape == ex["targets"].shape == (T,)
    assert ex["inputs"].dtype == ex["labels"].dtype == ex["targets"].dtype == np.int32
    assert ex["loss_mask"].dtype == np.float32
    scored = ex["labels"] != S.IGNORE
    np.testing.assert_array_equal(ex["loss_mask"], scored.astype(np.float32))
    np.testing.assert_array_equal(ex["targets"], np.where(scored, ex["labels"], 0))


# ------------------------------------------------------------------ MQAR

@pytest.mark.parametrize("T,D,V,P", [(64, 8, 100, 1), (16, 3, 20, 1), (128, 16, 8192, 1),
                                     (64, 8, 96, 2), (30, 7, 31, 1)])
def test_mqar_invariants(T, D, V, P):
    for rng in rngs(25, seed=T + D):
        ex = S.mqar(rng, seq_len=T, num_kv_pairs=D, vocab_size=V, num_passes=P)
        check_common(ex, T)
        x, y = ex["inputs"], ex["labels"]
        c = 2 * D * P
        keys, values = x[0:2 * D:2], x[1:2 * D:2]
        np.testing.assert_array_equal(keys, ex["keys"])
        np.testing.assert_array_equal(values, ex["values"])
        # keys distinct in {1..V/2-1}, values distinct in {V/2..V-1}
        assert len(set(keys.tolist())) == D and len(set(values.tolist())) == D
        assert keys.min() >= 1 and keys.max() <= V // 2 - 1
        assert values.min() >= V // 2 and values.max() <= V - 1
        # the context block is repeated P times
        np.testing.assert_array_equal(x[:c], np.tile(x[:2 * D], P))
        # exactly D labels, at even offsets of the query block, each key queried exactly once
        pos = np.flatnonzero(y != S.IGNORE)
        np.testing.assert_array_equal(pos, ex["answer_positions"])
        assert pos.size == D and np.all(pos >= c) and np.all((pos - c) % 2 == 0)
        assert sorted(x[pos].tolist()) == sorted(keys.tolist())
        # the label at a query is the value that follows that key in the context
        kv = dict(zip(keys.tolist(), values.tolist()))
        for p in pos:
            assert y[p] == kv[int(x[p])]
        # noise off: every other slot of the query block is 0 (the value never follows a query)
        rest = np.setdiff1d(np.arange(c, T), pos)
        assert np.all(x[rest] == 0)


def test_mqar_worked_example_shape():
    # specs/tasks.md §1.2 worked example: V=20, T=16, D=3 -> keys in 1..9, values in 10..19
    ex = S.mqar(np.random.default_rng(7), seq_len=16, num_kv_pairs=3, vocab_size=20)
    x = ex["inputs"]
    assert set(x[0:6:2]) <= set(range(1, 10)) and set(x[1:6:2]) <= set(range(10, 20))
    assert np.count_nonzero(x[6:]) == 3


def test_mqar_noise_is_seeded_and_fills_zeros():
    a = S.mqar(S.example_rng(3, 0, 5), seq_len=64, num_kv_pairs=8, vocab_size=100,
               random_non_queries=True)
    b = S.mqar(S.example_rng(3, 0, 5), seq_len=64, num_kv_pairs=8, vocab_size=100,
               random_non_queries=True)
    clean = S.mqar(S.example_rng(3, 0, 5), seq_len=64, num_kv_pairs=8, vocab_size=100)
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    np.testing.assert_array_equal(a["labels"], clean["labels"])
    zeros = clean["inputs"] == 0
    np.testing.assert_array_equal(a["inputs"][~zeros], clean["inputs"][~zeros])
    assert (a["inputs"][zeros] != 0).mean() > 0.9  # 1 - 1/V expected
    assert a["inputs"].max() < 100


def test_mqar_gaps_follow_power_law():
    # a = 0.01: weights ~ 1/i, so gap 0 (query right after the context) is drawn far more often
    # than gaps in the last quarter of the range
    T, D = 256, 4
    space = (T - 2 * D) // 2
    first, last = 0, 0
    for rng in rngs(400, seed=11):
        ex = S.mqar(rng, seq_len=T, num_kv_pairs=D, vocab_size=300)
        gaps = (ex["answer_positions"] - 2 * D) // 2
        first += int(np.sum(gaps == 0))
        last += int(np.sum(gaps >= 3 * space // 4))
    w = S.recall._gap_weights(space, 0.01)
    assert w[0] / w[-1] == pytest.approx(space ** 0.99, rel=1e-6)
    assert first > 2 * last


def test_weighted_sampling_matches_sequential_draws():
    # ordered pairs drawn without replacement: P(i, j) = p_i * p_j / (1 - p_i)
    p = np.array([0.4, 0.3, 0.2, 0.1])
    rng = np.random.default_rng(0)
    n = 20000
    counts = np.zeros((4, 4))
    for _ in range(n):
        i, j = S.weighted_sample_without_replacement(rng, np.log(p), 2)
        counts[i, j] += 1
    exact = p[:, None] * p[None, :] / (1 - p[:, None])
    np.fill_diagonal(exact, 0.0)
    assert np.abs(counts / n - exact).max() < 0.012
    assert np.all(np.diag(counts) == 0)
    full = S.weighted_sample_without_replacement(rng, np.log(p), 4)
    assert sorted(full.tolist()) == [0, 1, 2, 3]


def test_mqar_determinism_and_streams():
    kw = dict(seq_len=64, num_kv_pairs=8, vocab_size=128)
    a = S.generate(S.mqar, seed=5, n=6, stream=S.TRAIN_STREAM, **kw)
    b = S.generate(S.mqar, seed=5, n=6, stream=S.TRAIN_STREAM, **kw)
    c = S.generate(S.mqar, seed=5, n=6, stream=S.VAL_STREAM, **kw)
    d = S.generate(S.mqar, seed=6, n=6, stream=S.TRAIN_STREAM, **kw)
    tail = S.generate(S.mqar, seed=5, n=2, stream=S.TRAIN_STREAM, start=4, **kw)
    assert a["inputs"].shape == (6, 64) and len(a["keys"]) == 6
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    np.testing.assert_array_equal(a["inputs"][4:], tail["inputs"])  # any index regenerates
    assert not np.array_equal(a["inputs"], c["inputs"])
    assert not np.array_equal(a["inputs"], d["inputs"])
    assert len({r.tobytes() for r in a["inputs"]}) == 6


@pytest.mark.parametrize("kw,needle", [
    (dict(seq_len=64, num_kv_pairs=40, vocab_size=100), "does not fit"),
    (dict(seq_len=64, num_kv_pairs=8, vocab_size=64), "must be > seq_len"),
    (dict(seq_len=63, num_kv_pairs=4, vocab_size=100), "even"),
    (dict(seq_len=64, num_kv_pairs=0, vocab_size=100), ">= 1"),
])
def test_mqar_rejects_impossible_settings(kw, needle):
    with pytest.raises(ValueError, match=needle):
        S.mqar(np.random.default_rng(0), **kw)


# ------------------------------------------------------------------ selective copying

@pytest.mark.parametrize("T,M,A,variable", [(64, 4, 16, True), (48, 16, 16, True),
                                            (40, 8, 10, False), (4128, 16, 16, True)])
def test_selective_copying_invariants(T, M, A, variable):
    for rng in rngs(10, seed=M):
        ex = S.selective_copying(rng, seq_len=T, num_tokens_to_copy=M, vocab_size=A,
                                 variable=variable)
        check_common(ex, T)
        x, y = ex["inputs"], ex["labels"]
        L = T - 2 * M
        assert np.all(x[L + M:] == A - 1)                   # M markers at the end
        head = x[:L + M]
        assert np.all((head >= 0) & (head <= A - 2))        # no marker before the markers
        data = head[head != 0]
        assert data.size == M                               # data tokens are never blank
        pos = np.flatnonzero(y != S.IGNORE)
        np.testing.assert_array_equal(pos, np.arange(L + M, T))
        np.testing.assert_array_equal(y[pos], data)         # labels = data tokens in order
        np.testing.assert_array_equal(ex["data"], data)
        if not variable:
            np.testing.assert_array_equal(ex["data_positions"], np.arange(M))


def test_selective_copying_positions_vary():
    starts = {int(S.selective_copying(r, seq_len=64, num_tokens_to_copy=4,
                                      vocab_size=16)["data_positions"][0]) for r in rngs(30)}
    assert len(starts) > 5
    with pytest.raises(ValueError, match="does not fit"):
        S.selective_copying(np.random.default_rng(0), seq_len=10, num_tokens_to_copy=6,
                            vocab_size=16)


# ------------------------------------------------------------------ passkey

def test_passkey_tokens_layout():
    F, n, T = 4, 5, 40
    voc = S.passkey_token_vocab(F)
    for depth in (0.0, 0.5, 1.0, None):
        for rng in rngs(5):
            ex = S.passkey_tokens(rng, seq_len=T, depth=depth, num_digits=n, num_filler_tokens=F)
            check_common(ex, T)
            x = ex["inputs"]
            assert x.max() < voc["vocab_size"] and x.min() >= 0
            assert x[0] == voc["bos"]
            ks = int(np.flatnonzero(x == voc["key_start"])[0])
            assert ks == ex["needle_position"]
            digits = x[ks + 1:ks + 1 + n]
            assert x[ks + 1 + n] == voc["key_end"]
            np.testing.assert_array_equal(digits, ex["answer"])
            assert int("".join(map(str, digits))) == ex["key"]
            assert 10 ** (n - 1) <= ex["key"] < 10 ** n
            q = ex["prompt_len"] - 1
            assert x[q] == voc["query"] and q == T - n
            pos = np.flatnonzero(ex["loss_mask"])
            np.testing.assert_array_equal(pos, np.arange(q, T))
            np.testing.assert_array_equal(ex["targets"][pos], digits)   # teacher forcing
            np.testing.assert_array_equal(x[q + 1:], digits[:-1])
            # filler: the fixed repeating pattern, restarted after the needle
            pre, post = x[1:ks], x[ks + n + 2:q]
            np.testing.assert_array_equal(pre, 10 + np.arange(pre.size) % F)
            np.testing.assert_array_equal(post, 10 + np.arange(post.size) % F)
            n_f = pre.size + post.size
            assert n_f == T + 1 - (2 * n + 4)
            if depth is not None:
                assert abs(ex["depth"] - depth) <= 0.5 / n_f + 1e-9


def test_passkey_tokens_random_filler():
    """filler="random": the same layout and key as the pattern form (the key and depth are drawn
    first), the filler i.i.d. over the F filler tokens: no fixed phase to locate the key by."""
    F, n, T = 4, 5, 200
    voc = S.passkey_token_vocab(F)
    fills = []
    for seed in range(6):
        a = S.passkey_tokens(np.random.default_rng(seed), seq_len=T, depth=None, num_digits=n,
                             num_filler_tokens=F, filler="random")
        b = S.passkey_tokens(np.random.default_rng(seed), seq_len=T, depth=None, num_digits=n,
                             num_filler_tokens=F)
        check_common(a, T)
        assert a["key"] == b["key"] and a["needle_position"] == b["needle_position"]
        for k in ("targets", "loss_mask"):
            np.testing.assert_array_equal(a[k], b[k])
        x, ks, q = a["inputs"], a["needle_position"], a["prompt_len"] - 1
        special = np.zeros(T, bool)
        special[[0, q, *range(ks, ks + n + 2), *range(q + 1, T)]] = True
        np.testing.assert_array_equal(x[special], b["inputs"][special])
        fill = x[~special]
        assert fill.min() >= voc["filler"] and fill.max() < voc["filler"] + F
        fills.append(fill[:150])
    counts = np.bincount(np.concatenate(fills) - voc["filler"], minlength=F)
    assert counts.min() > 0.15 * counts.sum()          # all F tokens used, roughly uniformly
    # not the repeating pattern (its successor rule holds for every pair), not one sequence
    f0 = fills[0]
    assert np.mean(f0[1:] == voc["filler"] + (f0[:-1] - voc["filler"] + 1) % F) < 0.5
    assert not np.array_equal(fills[0], fills[1])
    with pytest.raises(ValueError, match="passkey_filler='noise'"):
        S.passkey_tokens(np.random.default_rng(0), seq_len=T, filler="noise")


def test_passkey_tokens_distinct_keys():
    """distinct=True: n distinct digits, the first non-zero; every digit appears in each position
    over many draws (not a fixed subset); the layout is the usual one."""
    n, T = 5, 40
    seen = np.zeros((n, 10), int)
    for seed in range(400):
        ex = S.passkey_tokens(np.random.default_rng(seed), seq_len=T, num_digits=n,
                              num_filler_tokens=4, filler="random", distinct=True)
        check_common(ex, T)
        d = ex["answer"]
        assert len(set(d.tolist())) == n and d[0] != 0
        assert int("".join(map(str, d))) == ex["key"]
        ks = ex["needle_position"]
        np.testing.assert_array_equal(ex["inputs"][ks + 1:ks + 1 + n], d)
        seen[np.arange(n), d] += 1
    assert (seen[0, 1:] > 0).all() and seen[0, 0] == 0 and (seen[1:] > 0).all()
    with pytest.raises(ValueError, match="passkey_digits=11 must be <= 10"):
        S.passkey_tokens(np.random.default_rng(0), seq_len=60, num_digits=11, distinct=True)


def test_passkey_text_format_and_length():
    for length, depth in [(300, 0.0), (500, 0.5), (1000, 1.0), (777, None)]:
        ex = S.passkey_text(np.random.default_rng(length), length=length, depth=depth)
        p = ex["prompt"]
        assert len(ex["prompt_ids"]) == length  # byte tokens: the character budget fits exactly
        assert bytes(ex["prompt_ids"].astype(np.uint8)).decode() == p
        parts = p.split("\n")
        assert len(parts) == 5
        assert parts[0] == S.PASSKEY_TASK and parts[4] == S.PASSKEY_QUESTION
        assert parts[2] == f"The pass key is {ex['key']}. Remember it. {ex['key']} is the pass key."
        assert 1 <= ex["key"] <= 50000 and ex["answer"] == str(ex["key"])
        filler = " ".join([S.PASSKEY_FILLER_UNIT] * 100)
        assert filler.startswith(parts[1]) and filler.startswith(parts[3])
        assert len(parts[1]) + len(parts[3]) == ex["n_filler"]
        if depth is not None:
            assert len(parts[1]) == round(depth * ex["n_filler"])


def test_passkey_sequence_scores_only_the_digits():
    for rng in rngs(5):
        ex = S.passkey_sequence(rng, seq_len=300)
        check_common(ex, 300)
        x = ex["inputs"]
        assert x[0] == S.BYTE_BOS and x.max() < S.BYTE_VOCAB
        pos = np.flatnonzero(ex["loss_mask"])
        assert pos.size == len(ex["answer"])
        assert bytes(ex["targets"][pos].astype(np.uint8)).decode() == ex["answer"]
        prompt = bytes(x[1:ex["prompt_len"]].astype(np.uint8)).decode()
        assert prompt.endswith(S.PASSKEY_QUESTION + " ")
        assert f"The pass key is {ex['answer']}." in prompt


# ------------------------------------------------------------------ RULER S-NIAH

HAYSTACK = " ".join(f"Sentence number {i} talks about item {i * 7 % 13}. It ends here!"
                    for i in range(300))


def test_niah_key_multiplicities_match_brute_force():
    adjs = ["big", "big-red", "red", "old"]
    nouns = ["red-car", "car", "car-park", "park", "red-car-park"]
    pairs = [f"{a}-{n}" for a, n in itertools.product(adjs, nouns)]
    brute = {s: pairs.count(s) for s in set(pairs) if pairs.count(s) > 1}
    assert S.key_multiplicities(adjs, nouns) == brute and brute
    # the vendored lists: 910 distinct adjectives, 6782 nouns (wonderwords 3.0.1)
    adjs, nouns, _ = S.needle._niah_words()
    assert (len(adjs), len(nouns)) == (len(set(ADJECTIVES)), len(set(NOUNS))) == (910, 6782)


def test_word_lists_are_package_data():
    """The lists are read from train/data/wordlists.json, which pyproject.toml installs with the
    package (`[tool.setuptools.package-data]`)."""
    import importlib.resources
    import json
    import os

    res = importlib.resources.files("train.data").joinpath(S.WORDLISTS)
    assert res.is_file() and os.path.dirname(str(res)) == os.path.dirname(os.path.dirname(S.__file__))
    d = json.loads(res.read_text(encoding="utf-8"))
    assert "MIT License" in d["license"] and (len(d["adjectives"]), len(d["nouns"])) == (912, 6782)
    assert S.word_lists() == (tuple(d["adjectives"]), tuple(d["nouns"]))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml")) as f:
        assert S.WORDLISTS in f.read().split("[tool.setuptools.package-data]", 1)[1]


@pytest.mark.parametrize("variant", S.NIAH_VARIANTS)
def test_needle_text(variant):
    adjs, nouns, _ = S.needle._niah_words()
    kind = "uuid" if variant == "niah_single_3" else "number"
    depths = set()
    for i, rng in enumerate(rngs(8, seed=3)):
        length = 600 + 200 * i
        ex = S.needle_text(rng, variant=variant, length=length, haystack_text=HAYSTACK,
                           answer_room=128)
        n_tok = len(ex["prompt_ids"])
        assert n_tok + 128 <= length
        assert ex["prompt"] == ex["input"] + ex["answer_prefix"]
        key, value = ex["key"], ex["answer"]
        a, n = next((a, key[len(a) + 1:]) for a in adjs if key.startswith(a + "-")
                    and key[len(a) + 1:] in nouns)
        assert f"{a}-{n}" == key
        if kind == "uuid":
            assert uuid.UUID(value).version == 4 and len(value) == 36
        else:
            assert re.fullmatch(r"[1-9]\d{6}", value)
        needle = f"One of the special magic {kind}s for {key} is: {value}."
        assert ex["input"].count(needle) == 1
        assert ex["input"].startswith(
            f"A special magic {kind} is hidden within the following text. Make sure to memorize "
            f"it. I will quiz you about the {kind} afterwards.\n")
        assert ex["input"].endswith(
            f"\nWhat is the special magic {kind} for {key} mentioned in the provided text?")
        assert ex["answer_prefix"] == (f" The special magic {kind} for {key} mentioned in the "
                                       "provided text is")
        # the haystack is as large as fits: one more unit would overflow
        unit = len(S.PASSKEY_FILLER_UNIT) + 1 if variant == "niah_single_1" else 20
        assert length - (n_tok + 128) < unit
        if variant == "niah_single_1":
            ctx = ex["input"].split("\n")[1:-1]
            assert len(ctx) == ex["n_haystack"] + 1
            assert all(line == S.PASSKEY_FILLER_UNIT for line in ctx if line != needle)
        depths.add(round(ex["depth"], 3))
    assert len(depths) > 2


def test_needle_essay_depth_is_controlled():
    for d in (0.0, 0.5, 1.0):
        ex = S.needle_text(np.random.default_rng(0), variant="niah_single_2", length=3000,
                           haystack_text=HAYSTACK, depth=d)
        assert abs(ex["depth"] - d) < 0.05
    with pytest.raises(ValueError, match="haystack"):
        S.needle_text(np.random.default_rng(0), variant="niah_single_2", length=3000)


def test_needle_sequence_scores_the_value():
    for variant in S.NIAH_VARIANTS:
        ex = S.needle_sequence(np.random.default_rng(1), seq_len=700, variant=variant,
                               haystack_text=HAYSTACK)
        check_common(ex, 700)
        pos = np.flatnonzero(ex["loss_mask"])
        assert bytes(ex["targets"][pos].astype(np.uint8)).decode() == ex["answer"]
        np.testing.assert_array_equal(pos, np.arange(pos[0], pos[0] + len(ex["answer"])))
        prompt = bytes(ex["inputs"][1:ex["prompt_len"]].astype(np.uint8)).decode()
        assert prompt.endswith("mentioned in the provided text is ")
