"""Moneta, Yaad, Memora on the shared neural-memory layer (zoo/miras.py): specs/miras.md §7.

Linear matrix memories (row layout y = q W) so that float64 numpy token loops of the literal
equations are the references; the layer's inner maths is float32 (tolerance 2e-5 relative)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zoo.miras import MemoraConfig, MirasMemory, MonetaConfig, YaadConfig

B, T, D, H = 2, 10, 8, 2
BASE = dict(dim=D, n_heads=H, memory="linear", memory_init_std=0.3, lr_max=0.5, lr_bias=0.0,
            alpha_bias=2.0, init_std=0.3, gate_rank=4)


def make(cls, **kw):
    return MirasMemory(cls(**{**BASE, **kw}), rngs=nnx.Rngs(params=0))


@nnx.jit
def memory_io(layer, x):
    Bx, Tx, _ = x.shape
    st = layer.init_state(Bx)
    real = jnp.ones((Bx, Tx), bool)
    starts = jnp.zeros((Bx, Tx), bool)
    pos = jnp.broadcast_to(jnp.arange(Tx, dtype=jnp.int32), (Bx, Tx))
    q, k, v, _ = layer.qkv(x, st.conv, real, starts)
    g = layer.gates(x)
    y, mem = layer.memory(q, k, v, g, st.mem, pos, starts, real, has_resets=False)
    return q, k, v, g, y, mem


def x_in(seed=0):
    return jax.random.normal(jax.random.key(seed), (B, T, D))


def qnorm_link(A, q):
    s = np.sum(np.abs(A) ** q) + 1e-12
    return A / s ** ((q - 2) / q)


def softmax0(Z):
    e = np.exp(Z - Z.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def loop(q, k, v, alpha, eta, signal, *, b, A0, link=lambda A: A, extra=None):
    """Anchored per-token rule (titans.md §2.7 anchor, miras.md §4): the carried state A,
    effective weights link(A), u_t = k_tᵀ ψ(k_t link(A_anchor) − v_t), A_t = α_t A_{t−1} − η_t u_t,
    y_t = q_t link(A_t); b = 1 is the literal per-token recurrence."""
    A, anc, ys = A0.copy(), A0.copy(), []
    for t in range(q.shape[0]):
        e = k[t] @ link(anc) - v[t]
        A = alpha[t] * A - eta[t] * np.outer(k[t], signal(e, None if extra is None else extra[t]))
        ys.append(q[t] @ link(A))
        if (t + 1) % b == 0:
            anc = A.copy()
    return np.stack(ys)


def per_head(io, layer, fn, rtol=2e-5):
    q, k, v, g, y, _ = io
    for bb in range(B):
        for h in range(H):
            sel = lambda a: np.asarray(a[bb, :, h], np.float64)
            ex = None if g["extra"] is None else sel(g["extra"]["delta"])
            ref = fn(sel(q), sel(k), sel(v), np.exp(sel(g["log_ret"])), sel(g["lr"]), h, ex)
            np.testing.assert_allclose(np.asarray(y[bb, :, h]), ref, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("b,impl", [(1, "reference"), (3, "chunked")])
def test_moneta_equals_token_loop(b, impl):
    """Moneta (smooth ℓ3 signal, q = 4 link W = A/‖A‖_4², A₀ = W̃₀/‖W̃₀‖_4): b = 1 is Eq. 24
    token by token; b = 3 (T = 10, ragged) the anchored rule, here in its chunked form."""
    layer = make(MonetaConfig, chunk=b, impl=impl)
    W0 = np.asarray(layer.W0["w"][...], np.float64)
    sig = lambda e, _: 3.0 * np.tanh(10.0 * e) * (e * e + 1e-6)

    def fn(q, k, v, al, et, h, ex):
        A0 = W0[h] / np.sum(np.abs(W0[h]) ** 4) ** 0.25
        return loop(q, k, v, al, et, sig, b=b, A0=A0, link=lambda A: qnorm_link(A, 4.0))
    per_head(memory_io(layer, x_in(1)), layer, fn)


@pytest.mark.parametrize("b,impl", [(1, "reference"), (3, "chunked")])
def test_yaad_equals_token_loop(b, impl):
    """Yaad, coordinate-wise Huber with channel-wise δ_t: W_t = α_t W_{t−1} − η_t k_tᵀ
    clip(k_t W − v_t, ±δ_t) (Eq. 26 in the coordinate-wise reading of miras.md §2.5)."""
    layer = make(YaadConfig, chunk=b, impl=impl, delta_bias=-1.0, delta_floor=0.01)
    W0 = np.asarray(layer.W0["w"][...], np.float64)
    clipped = []

    def sig(e, d):
        clipped.append(np.any(np.abs(e) > d) and np.any(np.abs(e) < d))
        return np.clip(e, -d, d)
    io = memory_io(layer, x_in(2))
    assert io[3]["extra"]["delta"].shape == (B, T, H, D // H)   # channel-wise δ_t
    per_head(io, layer, lambda q, k, v, al, et, h, ex:
             loop(q, k, v, al, et, sig, b=b, A0=W0[h], extra=ex))
    assert any(clipped), "the threshold never split a token's coordinates: the test would not bite"


def test_yaad_norm_flavour():
    """The norm-test flavour (per-head δ_t, signal e if ‖e‖ ≤ δ else δ e/‖e‖) matches its loop."""
    layer = make(YaadConfig, chunk=1, impl="reference", huber="norm", delta_bias=-1.0,
                 delta_floor=0.01)
    W0 = np.asarray(layer.W0["w"][...], np.float64)

    def sig(e, d):
        n = np.linalg.norm(e)
        return e if n <= d[0] else d[0] * e / n
    per_head(memory_io(layer, x_in(3)), layer, lambda q, k, v, al, et, h, ex:
             loop(q, k, v, al, et, sig, b=1, A0=W0[h], extra=ex))


def test_memora_b1_equals_literal_softmax_update_and_stays_on_the_simplex():
    """Memora at b = 1 == the literal Eq. 27 W_t = c·Softmax(α_t log W_{t−1} − η_t ∇ℓ(W_{t−1}))
    (softmax over the input axis, float64 loop with log W); after the call every column of the
    effective weights is positive and sums to c (miras.md §7.5)."""
    layer = make(MemoraConfig, chunk=1, impl="reference")
    Z0 = np.asarray(layer.W0["w"][...], np.float64)
    c = np.asarray(layer.memora_scale["w"][...], np.float64)
    io = memory_io(layer, x_in(4))

    def fn(q, k, v, al, et, h, ex):
        W, ys = c[h] * softmax0(Z0[h]), []
        for t in range(q.shape[0]):
            g = np.outer(k[t], k[t] @ W - v[t])
            W = c[h] * softmax0(al[t] * np.log(W) - et[t] * g)
            ys.append(q[t] @ W)
        return np.stack(ys)
    per_head(io, layer, fn)
    Z = np.asarray(io[5].W["w"], np.float64)                # [B, H, dk, dv] logits
    W = c[None, :, None, None] * np.exp(Z - Z.max(-2, keepdims=True))
    W = W / np.exp(Z - Z.max(-2, keepdims=True)).sum(-2, keepdims=True)
    assert np.all(W > 0)
    np.testing.assert_allclose(W.sum(-2), np.broadcast_to(c[None, :, None], W.sum(-2).shape),
                               rtol=1e-12)


def test_memora_chunked_equals_anchored_logit_loop():
    """Memora at b = 3 (chunked form): Z_t = α_t Z_{t−1} − η_t ∇ℓ(c·Softmax(Z_anchor))."""
    layer = make(MemoraConfig, chunk=3, impl="chunked")
    Z0 = np.asarray(layer.W0["w"][...], np.float64)
    c = np.asarray(layer.memora_scale["w"][...], np.float64)
    per_head(memory_io(layer, x_in(5)), layer, lambda q, k, v, al, et, h, ex:
             loop(q, k, v, al, et, lambda e, _: e, b=3, A0=Z0[h],
                  link=lambda Z: c[h] * softmax0(Z)))


def test_moneta_p2_q2_exact_is_gd_with_decay_and_yaad_large_delta_is_l2():
    """Moneta with p = 2, q = 2 and the exact signal 2e == GD with decay on the ℓ2 bias
    W_t = α_t W_{t−1} − η_t ∇‖e‖²; Yaad with δ → ∞ == the same model on the ½-loss (ψ = e)."""
    mon = make(MonetaConfig, chunk=2, impl="chunked", p=2.0, q=2.0, exact_signal=True)
    W0 = np.asarray(mon.W0["w"][...], np.float64)
    per_head(memory_io(mon, x_in(6)), mon, lambda q, k, v, al, et, h, ex:
             loop(q, k, v, al, et, lambda e, _: 2 * e, b=2, A0=W0[h]))
    yaad = make(YaadConfig, chunk=2, impl="chunked", delta_floor=1e6)
    W0 = np.asarray(yaad.W0["w"][...], np.float64)
    per_head(memory_io(yaad, x_in(6)), yaad, lambda q, k, v, al, et, h, ex:
             loop(q, k, v, al, et, lambda e, _: e, b=2, A0=W0[h]))


def test_moneta_fixed_point():
    """η ≡ 0, α ≡ 1 and ‖A₀‖_q = 1: W_t = W₀ for all t (miras.md §7.6) — the final carried A
    equals A₀ and every read is q_t A₀."""
    layer = make(MonetaConfig, chunk=2, impl="chunked")
    for w, bias in ((layer.w_theta, -1e4), (layer.w_alpha, 1e4)):
        w.weight[...] = jnp.zeros_like(w.weight[...])
        w.bias[...] = jnp.full_like(w.bias[...], bias)
    q, k, v, g, y, mem = memory_io(layer, x_in(7))
    W0 = np.asarray(layer.W0["w"][...], np.float64)
    A0 = W0 / np.sum(np.abs(W0) ** 4, axis=(-2, -1), keepdims=True) ** 0.25
    np.testing.assert_allclose(np.asarray(mem.W["w"]), np.broadcast_to(A0, (B,) + A0.shape),
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(y), np.einsum("bthk,hkv->bthv", np.asarray(q), A0),
                               rtol=1e-5, atol=1e-6)
