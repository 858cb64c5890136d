"""RAT invariants of specs/rat.md §10 (the shared equalities -- causal, prefill + continue at cuts
inside and at chunk edges, decode, resets, fast == reference at the model level, sharding -- run
in test_conformance.py for "rat" and "rat_hybrid")."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from asserts import assert_close
from flax import nnx

import zoo
from layers.attention import Attention
from layers.common import doc_starts, token_positions
from layers.rat import RATMixer, gate_bias_init, rat_mixer_count, tile_groups
from layers.rope import apply_rope
from pallas_kernels.attention import reference as attn_ref
from pallas_kernels.rat import chunked as rat_chunked
from pallas_kernels.rat import reference as rat_ref
from zoo.rat import _TINY, PRESETS, RATConfig, cache_size

D, H, G, T = 16, 4, 2, 13


def mixer(chunk, impl="auto", seed=0, **kw):
    return RATMixer(D, H, G, chunk, rngs=nnx.Rngs(params=seed), std=0.3, max_len=16,
                    impl=impl, **kw)


def forward(m: RATMixer, u, state=None):
    """The mixer's call, jitted (eager op-by-op dispatch is slower than one compile)."""
    graphdef, params = nnx.split(m)
    return jax.jit(lambda p, x, s: nnx.merge(graphdef, p)(x, s)[:2])(params, u, state)


def inputs(seed=1, B=2, length=T):
    return jax.random.normal(jax.random.key(seed), (B, length, D), jnp.float32)


def gated_rnn(m: RATMixer, u, chunk):
    """Test-only §3 with no attention (§4.3's RNN; RAT's chunk 0): v_t = f v_{t-1} + (1-f) x_t,
    reset every `chunk` tokens; out = (sigmoid(z) v) W_out."""
    w = np.asarray(m.w_in.weight[...], np.float64)
    h = np.asarray(u, np.float64) @ w
    z, x, g = h[..., :D], h[..., D:2 * D], h[..., 2 * D:3 * D]
    f = 1 / (1 + np.exp(-(g + np.asarray(m.b_f[...], np.float64))))
    v = np.zeros_like(x)
    for t in range(u.shape[1]):
        prev = v[:, t - 1] if t % chunk else 0.0
        v[:, t] = f[:, t] * prev + (1 - f[:, t]) * x[:, t]
    return (v / (1 + np.exp(-z))) @ np.asarray(m.w_out.weight[...], np.float64)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_chunk_zero_closed_form(impl):
    """§10.3 / §8.1: for t < L the output is (z * v_bar) W_out, no attention contribution."""
    L = 4
    m, u = mixer(L, impl), inputs()
    out = forward(m, u)[0]
    assert_close(out[:, :L], gated_rnn(m, u, L)[:, :L], atol=1e-5, rtol=1e-5, what="chunk 0")


def test_one_chunk_is_the_gated_rnn_and_qk_get_no_gradient():
    """§10.6: with L >= T the layer is the gated RNN baseline; the q/k columns of W_in get zero
    gradient."""
    m, u = mixer(16, "chunked"), inputs()
    assert_close(forward(m, u)[0], gated_rnn(m, u, 10 ** 9), atol=1e-5, rtol=1e-5, what="L = T")
    graphdef, params = nnx.split(m)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(u)[0] ** 2)))(params)
    gw = np.asarray(grads["w_in"]["weight"][...])
    assert np.all(gw[:, 3 * D:] == 0) and np.any(gw[:, :3 * D] != 0)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_chunk_one_with_no_memory_is_causal_mha_with_token_rope(impl):
    """§10.7: L = 1 and f = 0 (b_f = -1e4, zero gate weights): causal MHA with token RoPE over
    the tiled q/k groups, values x, then the output gate and W_out."""
    m, u = mixer(1, impl), inputs()
    m.b_f[...] = jnp.full((D,), -1e4)
    m.w_in.weight[...] = m.w_in.weight[...].at[:, 2 * D:3 * D].set(0.0)
    h = m.w_in(u)
    d = D // H
    pos = jnp.broadcast_to(jnp.arange(T), (2, T))
    q = apply_rope(tile_groups(h[..., 3 * D:3 * D + G * d], H, d), pos)
    k = apply_rope(tile_groups(h[..., 3 * D + G * d:], H, d), pos)
    v = h[..., D:2 * D].reshape(2, T, H, d)
    zero = jnp.zeros((2, T), jnp.int32)
    o = attn_ref.attention(q, k, v, q_pos=pos, k_pos=pos, q_group=zero, k_group=zero,
                           k_valid=jnp.ones((2, T), bool)).reshape(2, T, D)
    want = m.w_out(jax.nn.sigmoid(h[..., :D]) * o)
    assert_close(forward(m, u)[0], want, atol=1e-5, rtol=1e-5, what="L = 1")


def test_group_tiling_is_h_mod_g():
    """§3.4 / §8.2: head h uses group h mod G."""
    a = jnp.arange(G * 3, dtype=jnp.float32).reshape(1, 1, G * 3)      # groups of 3 channels
    t = tile_groups(a, 6, 3)[0, 0]
    for h in range(6):
        np.testing.assert_array_equal(t[h], a[0, 0, (h % G) * 3:(h % G + 1) * 3])


def test_chunk_reset():
    """§10.4: the running states at t = cL depend only on token t."""
    L, c = 4, 2
    m = mixer(L, "chunked")
    u = inputs(B=1)[:, :c * L + 1]
    v = u.at[:, :c * L].set(inputs(seed=9, B=1)[:, :c * L])
    sa, sb = forward(m, u)[1], forward(m, v)[1]
    assert_close((sa.k_run, sa.v_run), (sb.k_run, sb.v_run), atol=0, rtol=0, what="reset")
    assert not np.allclose(sa.k_sum[:, :c], sb.k_sum[:, :c])


def test_relative_position_property():
    """§10.8: RoPE(q, c1) . RoPE(k, c2) depends only on c1 - c2; the self term is unrotated."""
    q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 8))
    score = lambda c1, c2: float(jnp.sum(apply_rope(q, jnp.full((1, 1), c1))
                                         * apply_rope(k, jnp.full((1, 1), c2))))
    assert math.isclose(score(5, 2), score(13, 10), rel_tol=1e-5)
    assert math.isclose(score(7, 7), float(jnp.sum(q * k)), rel_tol=1e-5)


def test_parameter_count_and_cache_size():
    """§10.9: D(3D + 2G d) + D^2 + 2D per RAT layer, 17,829,888 at 1.3B; §10.10: the cache holds
    2 H ceil(T/L) d + 2 D numbers per RAT layer."""
    cfg = PRESETS["rat_xl"]()
    assert rat_mixer_count(cfg.dim, cfg.n_heads, cfg.n_groups) + cfg.dim == 17_829_888
    m = mixer(4)
    st = m.init_state(1, 22)
    n = sum(int(np.prod(a.shape)) for a in (st.k_sum, st.v_sum, st.k_run, st.v_run))
    assert n == cache_size(RATConfig(dim=D, n_heads=H, chunk=4), 22) == 2 * H * 6 * (D // H) + 2 * D


@pytest.mark.parametrize("L", [1, 2, 16])
def test_gate_bias_init_range(L):
    """§10.11 / §7: sigmoid(b_f) in [1/2, (L-1)/L]; b_f = 0 for L <= 2."""
    s = jax.nn.sigmoid(gate_bias_init(jax.random.key(0), 4096, L))
    if L <= 2:
        assert np.all(np.asarray(s) == 0.5)
    else:
        assert float(s.min()) >= 0.5 and float(s.max()) <= (L - 1) / L
        assert float(s.max()) > 0.9


def test_hybrid_layout():
    """§4.2: RAT at even layers, sliding-window attention (window W) at odd layers."""
    cfg = dataclasses.replace(_TINY, n_layers=4)
    model = nnx.eval_shape(lambda: zoo.build("rat_hybrid", cfg, rngs=0))
    kinds = [type(b.mixer) for b in model.blocks]
    assert kinds == [RATMixer, Attention, RATMixer, Attention]
    assert model.blocks[1].mixer.window == _TINY.window


def test_validate_rejects_bad_values():
    for bad, key in ((dict(n_groups=3), "n_heads"), (dict(chunk=0), "chunk"),
                     (dict(pe="alibi"), "pe"), (dict(ffn="relu"), "ffn")):
        with pytest.raises(ValueError, match=rf"^model\.{key}"):
            dataclasses.replace(_TINY, **bad).validate()


def test_op_chunked_equals_reference_with_resets_mid_chunk_start_and_pads():
    """The op's fast form == its reference, forward and gradients, for a call that starts
    mid-chunk (position 6, L = 4) from a random carry, with two document starts inside the call
    (at 5 and 9), right pads, and a length (13) that is not a multiple of the chunk."""
    B, Hh, d, L, S = 2, 2, 4, 4, 6
    ks = jax.random.split(jax.random.key(3), 8)
    q, k, v = (jax.random.normal(ks[i], (B, T, Hh, d)) for i in range(3))
    f = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, Hh, d)))
    carry = (jax.random.normal(ks[4], (B, S, Hh, d)), jax.random.normal(ks[5], (B, S, Hh, d)),
             jax.random.normal(ks[6], (B, Hh, d)), jax.random.normal(ks[7], (B, Hh, d)))
    seg = jnp.asarray(np.repeat([[0] * 5 + [1] * 4 + [2] * 4], B, 0))
    seg = seg.at[1].set(0)                               # row 1: one document, no reset
    mask = jnp.asarray(np.arange(T)[None] < np.array([[T - 2], [T]]))
    pos, doc, _ = token_positions(jnp.full((B,), 6, jnp.int32), doc_starts(seg, B, T), mask)
    last = np.asarray(mask.sum(1)) - 1
    c_last = np.asarray(pos)[np.arange(B), last] // L
    slot_ok = jnp.asarray(np.arange(S)[None] <= c_last[:, None])[..., None, None]
    rotate = lambda x, p: apply_rope(x, p)
    w = jax.random.normal(jax.random.key(11), (B, T, Hh, d)) * mask[..., None, None]

    def run(form, q, k, v, f, carry):
        kw = dict(doc=doc) if form is rat_chunked else {}
        y, c = form.rat(q, k, v, f, carry, chunk=L, pos=pos, mask=mask, rotate=rotate, **kw)
        return (y * mask[..., None, None], c[0] * slot_ok, c[1] * slot_ok, c[2], c[3])

    def loss(form, *a):
        y, k_sum, v_sum, k_run, v_run = run(form, *a)
        return (jnp.sum(y * w) + jnp.sum(jnp.sin(k_sum)) + jnp.sum(v_sum ** 2)
                + jnp.sum(k_run * v_run))

    args = (q, k, v, f, carry)
    fwd = lambda form: jax.jit(lambda *a: run(form, *a))(*args)
    assert_close(fwd(rat_chunked), fwd(rat_ref), atol=1e-5, rtol=1e-5, what="forward and carry")
    grad = lambda form: jax.jit(jax.grad(lambda *a: loss(form, *a), argnums=(0, 1, 2, 3, 4)))(*args)
    assert_close(grad(rat_chunked), grad(rat_ref), atol=1e-4, rtol=1e-4, what="gradients")
