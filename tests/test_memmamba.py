"""MemMamba (specs/memmamba.md §7's invariants; the contract equalities are in
tests/test_conformance.py): the FIFO pool against a token loop with carried pools and document
starts, causality (and a leaky whole-sequence pool caught by the same check), decode == parallel
with the pool wrapping, the reduction to Mamba, empty pools, the unbounded pool against masked
attention, the cross-layer schedule, the scorer's gradient, the conformance runs clear of tau1,
and the fidelity metrics on constructed inputs."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from asserts import assert_close
from conformance_inputs import conformance_rows
from flax import nnx

import layers.memmamba as LM
import zoo
from eval.fidelity import eclmf, etmf, hidden_states
from layers.memmamba import MemMambaMixer, pool_windows
from zoo.memmamba import MARGIN, memmamba_preset, score_margins

SPEC = zoo.get("memmamba").conformance


def _fifo_loop(notes0, count0, new, insert, starts, K):
    """specs/memmamba.md §4.2's per-token pool, a Python list per row: read the last K notes of
    the current document, then insert."""
    B, T, F = new.shape
    win = np.zeros((B, T, K, F))
    val = np.zeros((B, T, K), bool)
    out_notes, out_count = np.zeros((B, K, F)), np.zeros(B, int)
    for b in range(B):
        c0 = min(int(count0[b]), K)
        pool, cnt = list(notes0[b, K - c0:]), int(count0[b])
        for t in range(T):
            if starts[b, t]:
                pool, cnt = [], 0
            ent = pool[-K:]
            if ent:
                win[b, t, K - len(ent):] = ent
                val[b, t, K - len(ent):] = True
            if insert[b, t]:
                pool.append(new[b, t])
                cnt += 1
        ent = pool[-K:]
        if ent:
            out_notes[b, K - len(ent):] = ent
        out_count[b] = cnt
    return win, val, out_notes, out_count


def test_pool_windows_equal_the_token_loop():
    """The parallel gather (§4.1 + the carried-pool contract note) == the per-token FIFO, with
    carried pools of 0, 3 and 9 (> K) notes, document starts and a wrapping pool."""
    rng = np.random.default_rng(0)
    B, T, K, F = 3, 40, 5, 2
    new = rng.normal(size=(B, T, F))
    insert = rng.random((B, T)) < 0.5
    starts = np.zeros((B, T), bool)
    starts[1, 17] = starts[2, 5] = starts[2, 30] = True
    count0 = np.array([0, 3, 9])
    notes0 = rng.normal(size=(B, K, F))
    for b in range(B):
        notes0[b, :K - min(count0[b], K)] = 0.0
    win, val, notes, count = jax.jit(pool_windows)(jnp.asarray(notes0), jnp.asarray(count0),
                                                   jnp.asarray(new), jnp.asarray(insert),
                                                   jnp.asarray(starts))
    rw, rv, rn, rc = _fifo_loop(notes0, count0, new, insert, starts, K)
    np.testing.assert_array_equal(np.asarray(val), rv)
    np.testing.assert_allclose(np.where(rv[..., None], np.asarray(win), 0.0), rw, atol=1e-6)
    np.testing.assert_allclose(np.asarray(notes), rn, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(count), rc)


def _mixer(**kw):
    args = dict(n_layers=1, d_summary=8, pool_size=50, n_heads=2, tau1=0.46, attn_std=0.5,
                alpha_init=1.0, d_inner=32, d_state=4, impl="reference")
    args.update(kw)
    return MemMambaMixer(16, rngs=nnx.Rngs(params=0), **args)


def _inputs(B, T, seed=0):
    return jax.random.normal(jax.random.key(seed), (B, T, 16), jnp.float32)


def test_decode_equals_parallel_with_a_wrapping_pool():
    """§7.2: token-by-token decode == the parallel call at L = 150 > K = 50 (the pool wraps),
    outputs and every part of the state, scores clear of tau1."""
    mx = _mixer()
    gd, st = nnx.split(mx)
    a = _inputs(2, 150)
    iota = mx.scores(a)
    assert float(jnp.min(jnp.abs(iota - mx.tau1))) > MARGIN
    assert int(jnp.min(jnp.sum(iota > mx.tau1, axis=1))) > 60       # > K notes: the pool wraps

    @jax.jit
    def both(st, a):
        m = nnx.merge(gd, st)
        full, s_full, _ = m(a)

        def step(s, x):
            y, s, _ = nnx.merge(gd, st)(x[:, None], s)
            return s, y[:, 0]
        s_dec, ys = jax.lax.scan(step, m.init_state(a.shape[0]), jnp.moveaxis(a, 1, 0))
        return full, s_full, jnp.moveaxis(ys, 0, 1), s_dec

    full, s_full, dec, s_dec = both(st, a)
    assert_close(dec, full, atol=1e-5, rtol=1e-5, what="decode vs parallel")
    assert_close(s_dec, s_full, atol=1e-5, rtol=1e-5, what="final state")


def _causal_gap(model, x, cut):
    """max |logits[:, :cut]| change when every token from `cut` on is replaced."""
    y = model(x)[0]
    x2 = x.at[:, cut:].set((x[:, cut:] + 11) % model.vocab_size)
    return float(jnp.max(jnp.abs(model(x2)[0][:, :cut] - y[:, :cut])))


def _leaky_pool(notes, count, new, insert, starts):
    """The third-party design (specs/memmamba.md §1): every query reads the last K notes of the
    whole sequence, its future included."""
    win, valid, nn_, nc = pool_windows(notes, count, new, insert, starts)
    T = new.shape[1]
    last = jax.tree.map(lambda v: jnp.repeat(v[:, -1:], T, axis=1), (win, valid))
    return last[0], last[1], nn_, nc


def test_causal_and_the_leaky_pool_is_caught(monkeypatch):
    """§7.1: perturbing tokens from t on leaves logits before t unchanged; the same check fails
    on the whole-sequence pool (the regression the spec asks for)."""
    model = zoo.build("memmamba", SPEC.config, rngs=0)
    x = jax.random.randint(jax.random.key(3), (2, 24), 0, SPEC.config.vocab_size)
    assert _causal_gap(model, x, 9) == 0.0
    monkeypatch.setattr(LM, "pool_windows", _leaky_pool)
    assert _causal_gap(model, x, 9) > 1e-3


def test_alpha_zero_is_the_mamba_stack_bit_for_bit():
    """§7.3: alpha_tok = alpha_lay = 0 gives the plain Mamba stack with the same mixer weights."""
    cfg = dataclasses.replace(SPEC.config, alpha_init=0.0)
    model = zoo.build("memmamba", cfg, rngs=0)
    x = jax.random.randint(jax.random.key(1), (2, 13), 0, cfg.vocab_size)
    h = model.embed_tokens(x, jnp.zeros(x.shape, jnp.int32))
    for blk in model.blocks:
        h = h + blk.mixer.mamba(blk.norm1(h))[0]
    np.testing.assert_array_equal(np.asarray(model(x)[0]), np.asarray(model.logits(h)))
    assert float(jnp.max(jnp.abs(zoo.build("memmamba", SPEC.config, rngs=0)(x)[0]
                                 - model(x)[0]))) > 0.1      # the memory reads do matter


def test_empty_pool_reads_nothing():
    """§7.4: tau1 = 1 (no note ever inserted) -> c_tok = 0, no NaN; at t = 0 the pool is empty
    for any tau1."""
    a = _inputs(2, 20)
    for tau1, upto in ((1.0, 20), (0.45, 1)):
        mx = _mixer(tau1=tau1)
        out = mx(a)[0]
        y = mx.mamba(a)[0]
        assert np.all(np.isfinite(np.asarray(out)))
        np.testing.assert_array_equal(np.asarray(out[:, :upto]), np.asarray(y[:, :upto]))
    assert float(jnp.max(jnp.abs(out - y))) > 1e-3


def test_unbounded_pool_is_masked_attention_over_earlier_notes():
    """§7.5: with K >= L the read at t is attention over {ŝ_j : m_j = 1, j < t} (an O(L^2)
    masked attention written here); gamma = sigmoid(0) at init."""
    mx = _mixer(pool_size=32)
    a = _inputs(2, 24, seed=4)
    out = mx(a)[0]
    y = mx.mamba(a)[0]
    iota = mx.scores(a)
    m = np.asarray(iota > mx.tau1)
    note = iota[..., None] * mx.summary(a)
    q, k, v = mx.tok.wq(a), mx.tok.wk(note), mx.tok.wv(note)
    H, dh = 2, 4
    qh, kh, vh = (z.reshape(2, 24, H, dh) for z in (q, k, v))
    s = jnp.einsum("bthd,bjhd->bhtj", qh, kh) / np.sqrt(dh)
    allowed = (np.arange(24)[None, :] < np.arange(24)[:, None])[None] & m[:, None, :]
    s = jnp.where(allowed[:, None], s, -jnp.inf)
    p = jnp.nan_to_num(jax.nn.softmax(s, axis=-1))
    o = jnp.einsum("bhtj,bjhd->bthd", p, vh).reshape(2, 24, 8)
    want = y + mx.alpha_tok[...] * 0.5 * mx.tok.wo(o)
    assert_close(out, want, atol=1e-5, rtol=1e-5, what="unbounded pool read")


def test_cross_layer_schedule():
    """§7.6: p > n_layers gives no cross-layer attention; p = g = 1: layer l reads one entry
    (softmax weight 1), c_lay = W_o W_v s^{l-1}."""
    none = zoo.build("memmamba", dataclasses.replace(SPEC.config, cross_every=4), rngs=0)
    assert not any(b.mixer.cross_layer for b in none.blocks)
    cfg = dataclasses.replace(SPEC.config, cross_every=1, cross_layers=1)
    model = zoo.build("memmamba", cfg, rngs=0)
    assert [b.mixer.cross_layer for b in model.blocks] == [False, True, True]
    a = _inputs(2, 9)
    s = jax.random.normal(jax.random.key(5), (2, 9, 1, cfg.d_summary))
    lay = model.blocks[1].mixer.lay
    got = lay(a, lay.keys_values(s), jnp.ones((2, 9, 1), bool))
    assert_close(got, lay.wo(lay.wv(s[:, :, 0])), atol=1e-5, rtol=1e-5, what="one-entry read")


def test_scorer_gradient_flows_only_through_selected_notes():
    """§7.7: d loss / d scorer != 0 when some token is selected, == 0 when none is."""
    a = _inputs(2, 12, seed=6)
    for tau1, nonzero in ((0.45, True), (1.0, False)):
        gd, st = nnx.split(_mixer(tau1=tau1))
        g = jax.grad(lambda st: jnp.sum(nnx.merge(gd, st)(a)[0] ** 2))(st)
        total = sum(float(jnp.sum(jnp.abs(v))) for v in jax.tree.leaves(
            (g["score1"], g["score2"])))
        assert (total > 0) == nonzero, (tau1, total)


def test_conformance_runs_are_clear_of_tau1():
    """The conformance suite's token sets (its seeds and batch sizes, the causality
    perturbations, the shifted and the packed document-reset runs) score every real token at
    least MARGIN away from tau1 at every layer (the contract notes' thresholds)."""
    cfg = SPEC.config
    x, mask, (x6, seg) = conformance_rows(SPEC)
    model = zoo.build("memmamba", cfg, rngs=0)
    gd, st = nnx.split(model)
    low = jax.jit(lambda st, x, m, seg: jnp.min(jnp.stack([
        jnp.min(jnp.where(m, g, jnp.inf))
        for g in score_margins(nnx.merge(gd, st), x, m, seg)])))
    assert float(low(st, x, mask, None)) > MARGIN
    assert float(low(st, x6, jnp.ones(x6.shape, bool), seg)) > MARGIN
    assert SPEC.check_margins is zoo.memmamba.check_margins


def test_config_errors_name_the_key():
    for over, key in (({"note_heads": 3}, "model.note_heads"), ({"tau1": 1.5}, "model.tau1"),
                      ({"pool_size": 0}, "model.pool_size"), ({"cross_every": 0},
                                                              "model.cross_every")):
        with pytest.raises(ValueError, match=key):
            zoo.make_config("memmamba", over)


def test_200m_layout():
    """§3.2: the 24-layer width-1024 backbone is the spec's ≈ 211.5 M; the memory modules add
    12.1 M here (the scorer, W_N and the cross-token attention at every layer, the cross-layer
    attention at the 6 layers 4, 8, ..., 24; the spec's rough ≈ 15 M counts W_q', W_o' at
    every layer)."""
    cfg = memmamba_preset()
    backbone = zoo.get("mamba").param_count(zoo.mamba.MambaConfig(
        vocab_size=50280, dim=1024, n_layers=24, d_state=16, dt_rank=64))
    assert abs(backbone / 211.5e6 - 1) < 0.005
    extra = zoo.get("memmamba").param_count(cfg) - backbone
    assert 11.5e6 < extra < 12.5e6
    assert sum(cfg.cross(i) for i in range(24)) == 6
    assert [cfg.n_context(i) for i in (3, 7)] == [3, 4]


def test_etmf_on_constructed_logits():
    """§7.8: logits a large multiple of the current token's one-hot give ETMF(0) -> 1; uniform
    logits give the mean cos(E[x_j], mean embedding)."""
    rng = np.random.default_rng(0)
    E = rng.normal(size=(11, 6)).astype(np.float32)
    x = rng.integers(0, 11, (2, 9))
    assert etmf(1e4 * np.eye(11)[x], x, E) == pytest.approx(1.0, abs=1e-6)
    mean = E.mean(0)
    want = np.mean([E[t] @ mean / np.linalg.norm(E[t]) / np.linalg.norm(mean) for t in x.ravel()])
    assert etmf(np.zeros((2, 9, 11)), x, E) == pytest.approx(float(want), abs=1e-5)
    assert etmf(1e4 * np.eye(11)[x], x, E, shift=1) < 0.9     # compares with the next token


def test_eclmf_on_constructed_hidden_states():
    """§7.9: an exact linear map between layers gives ECLMF ≈ 1; independent noise of the same
    norm gives ≈ 0 or below."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(4, 64, 8))
    W = rng.normal(size=(8, 8))
    assert eclmf([X, X @ W], 1) == pytest.approx(1.0, abs=1e-3)
    noise = rng.normal(size=X.shape)
    assert eclmf([X, noise], 1) < 0.15
    assert eclmf([X, X @ W, X], 2) == pytest.approx(1.0, abs=1e-3)


def test_hidden_states_follow_the_forward():
    model = zoo.build("memmamba", SPEC.config, rngs=0)
    x = jax.random.randint(jax.random.key(2), (2, 13), 0, SPEC.config.vocab_size)
    hs = hidden_states(model, x)
    assert len(hs) == 3
    assert_close(model.logits(hs[-1]), model(x)[0], atol=1e-6, rtol=1e-6, what="last layer")
