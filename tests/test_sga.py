"""Hydra's sparse global attention (layers/sga.py; specs/hydra.md §2.3, §7.4, contract notes):
the dense form == a token loop written here with the spec's FIFO (a token leaves the window at
t = j + W + 1 and, if r_j > 0, enters a FIFO of at most G globals), with document starts and
pads; decode and prefill + continue == the full call; causality; with W >= T and no globals it
is dense causal attention; workspace slots are always-visible unrotated keys."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from asserts import assert_close
from flax import nnx

from layers.rope import apply_rope
from layers.sga import SparseGlobalAttention

D, H, W, G, T = 8, 2, 3, 2, 17


def _sga(**kw):
    m = SparseGlobalAttention(D, H, rngs=nnx.Rngs(params=0), **{**dict(window=W, n_global=G,
                                                                     init_std=0.5), **kw})
    m.w_r[...] = m.w_r[...] * 4.0        # scores well away from 0 (the r_j > 0 decisions)
    return m


def _x(B=2):
    return jax.random.normal(jax.random.key(1), (B, T, D))


def _loop(m, a, starts, mask, slots=None):
    """The spec's SGA token by token for one row: window list, FIFO of globals."""
    d = D // H
    doc = np.cumsum(starts)
    pos = np.zeros(T, int)
    for t in range(1, T):
        pos[t] = 0 if starts[t] else pos[t - 1] + 1
    q = apply_rope(m.wq(a).reshape(1, T, H, d), jnp.asarray(pos)[None], base=m.rope_base)[0]
    k = apply_rope(m.wk(a).reshape(1, T, H, d), jnp.asarray(pos)[None], base=m.rope_base)[0]
    v = m.wv(a).reshape(T, H, d)
    r = np.asarray(m.scores(a))[0]
    fifo, out = [], []
    for t in range(T):
        if not mask[t]:
            out.append(np.zeros(D))
            continue
        if starts[t]:
            fifo = []
        keys = [j for j in range(t + 1) if doc[j] == doc[t] and pos[t] - pos[j] <= W]
        glob = list(fifo)
        js = glob + keys
        bias = np.array([np.log(1 / (1 + np.exp(-r[j]))) for j in glob] + [0.0] * len(keys))
        s = np.einsum("hd,jhd->hj", np.asarray(q[t]), np.asarray(k)[js]) / np.sqrt(d) + bias
        vals = np.asarray(v)[js]
        if slots is not None:
            ks = np.asarray(m.wk(slots).reshape(-1, H, d))
            s = np.concatenate([s, np.einsum("hd,shd->hs", np.asarray(q[t]), ks) / np.sqrt(d)], 1)
            vals = np.concatenate([vals, np.asarray(m.wv(slots).reshape(-1, H, d))], 0)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out.append(np.asarray(m.wo(jnp.asarray(np.einsum("hj,jhd->hd", p, vals).reshape(-1)))))
        leaving = [j for j in range(t + 1) if doc[j] == doc[t] and pos[t] + 1 - pos[j] == W + 1]
        for j in leaving:
            if r[j] > 0:
                fifo = (fifo + [j])[-G:]
    return np.stack(out)


def test_dense_form_equals_the_token_loop_with_documents_pads_and_slots():
    m = _sga()
    a = _x()
    r = np.asarray(m.scores(a))[0]
    assert np.min(np.abs(r)) > 1e-4 and 0.2 < np.mean(r > 0) < 0.8
    seg = jnp.asarray(np.where(np.arange(T) < 9, 0, 1)[None].repeat(2, 0), jnp.int32)
    mask = np.arange(T)[None] < np.array([[T], [14]])
    slots = jax.random.normal(jax.random.key(3), (2, 3, D))
    f = nnx.jit(lambda m, a, s, mk, c: m(a, segment_ids=s, mask=mk, context=c)[0])
    starts = np.zeros(T, bool)
    starts[9] = True
    for ctx in (None, slots):
        got = f(m, a, seg, jnp.asarray(mask), ctx)
        for b in range(2):
            want = _loop(m, a[b:b + 1], starts, mask[b], None if ctx is None else ctx[b])
            np.testing.assert_allclose(np.asarray(got[b])[mask[b]], want[mask[b]], rtol=1e-5,
                                       atol=1e-5)


def test_decode_and_prefill_continue_equal_the_full_call():
    m = _sga()
    gd, st = nnx.split(m)
    a = _x()

    @jax.jit
    def run(st, a):
        mod = nnx.merge(gd, st)
        full, s_full, _ = mod(a)
        splits = []
        for cut in (2, 4, 9):
            y1, s, _ = mod(a[:, :cut])
            y2, _, _ = mod(a[:, cut:], s)
            splits.append(jnp.concatenate([y1, y2], 1))

        def step(s, x):
            y, s, _ = nnx.merge(gd, st)(x[:, None], s)
            return s, y[:, 0]
        s_dec, ys = jax.lax.scan(step, mod.init_state(2), jnp.moveaxis(a, 1, 0))
        return full, s_full, splits, jnp.moveaxis(ys, 0, 1), s_dec

    full, s_full, splits, dec, s_dec = run(st, a)
    for y in splits:
        assert_close(y, full, atol=1e-5, rtol=1e-5, what="prefill + continue")
    assert_close(dec, full, atol=1e-5, rtol=1e-5, what="decode")
    assert_close(s_dec, s_full, atol=1e-5, rtol=1e-5, what="state")
    a2 = a.at[:, 11:].set(0.0)
    np.testing.assert_array_equal(np.asarray(m(a2)[0][:, :11]), np.asarray(full[:, :11]))


@pytest.mark.parametrize("n_global", [0, 2])
def test_a_window_covering_the_sequence_is_causal_attention(n_global):
    """§7.4: with W >= T (and then no token ever leaves the window) it is dense causal
    attention with RoPE."""
    m = _sga(window=T, n_global=n_global)
    a = _x()
    d = D // H
    pos = jnp.broadcast_to(jnp.arange(T), (2, T))
    q = apply_rope(m.wq(a).reshape(2, T, H, d), pos, base=m.rope_base)
    k = apply_rope(m.wk(a).reshape(2, T, H, d), pos, base=m.rope_base)
    v = m.wv(a).reshape(2, T, H, d)
    s = jnp.einsum("bthd,bjhd->bhtj", q, k) / np.sqrt(d)
    s = jnp.where(np.tril(np.ones((T, T), bool)), s, -jnp.inf)
    o = jnp.einsum("bhtj,bjhd->bthd", jax.nn.softmax(s, -1), v).reshape(2, T, D)
    assert_close(m(a)[0], m.wo(o), atol=1e-5, rtol=1e-5, what="W >= T")
