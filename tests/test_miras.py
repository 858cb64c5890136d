"""Moneta, Yaad, Memora (layers/miras.py, zoo/miras.py): specs/miras.md §7, for the layers and
for their pure parts (attentional biases, retention links) against the reference forms of
tests/memory_reference.py.

Linear matrix memories (row layout y = q W) so that float64 numpy token loops of the literal
equations are the references; the layer's inner maths is float32 (tolerance 2e-5 relative).
The pure parts are checked in float64 where a statement is exact (tolerances ~1e-10)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import memory_reference as ref
import numpy as np
import pytest
from flax import nnx
from memory_reference import memory_io

from layers import miras
from layers.memory import l2_signal
from zoo.miras import MemoraConfig, MonetaConfig, YaadConfig

B, T, D, H = 2, 10, 8, 2
BASE = dict(dim=D, n_heads=H, memory="linear", memory_init_std=0.3, lr_max=0.5, lr_bias=0.0,
            alpha_bias=2.0, init_std=0.3, gate_rank=4)
F64 = jnp.float64


def make(cls, **kw):
    return cls(**{**BASE, **kw}).mixer(nnx.Rngs(params=0))


def rnd(seed, shape, scale=1.0, dtype=F64):
    return scale * jax.random.normal(jax.random.key(seed), shape, dtype)


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


@pytest.mark.parametrize("b,impl", [(1, "reference"), (3, "chunked")])
def test_yaad_eq26_mixture_flavour(b, impl):
    """Yaad's Eq. 26 as printed (huber="mixture", per-head δ_t): the ℓ2 gradient e if
    ‖e‖ ≤ δ_t, else δ_t·sign(e) (δ × the ℓ1 gradient), token by token (b = 1) and anchored in the
    chunked form (b = 3, T = 10 ragged); both branches are taken."""
    layer = make(YaadConfig, chunk=b, impl=impl, huber="mixture", delta_bias=-1.0,
                 delta_floor=0.01)
    W0 = np.asarray(layer.W0["w"][...], np.float64)
    inside = []

    def sig(e, d):
        n = np.linalg.norm(e)
        inside.append(n <= d[0])
        return e if n <= d[0] else d[0] * np.sign(e)
    io = memory_io(layer, x_in(4))
    assert io[3]["extra"]["delta"].shape == (B, T, H, 1)          # per-head δ_t
    per_head(io, layer, lambda q, k, v, al, et, h, ex:
             loop(q, k, v, al, et, sig, b=b, A0=W0[h], extra=ex))
    assert any(inside) and not all(inside), "one branch only: the test would not bite"


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


# ----------------------------------------------------------------------------- attentional biases

CASES = [
    ("l2", {}),
    ("dot", {}),
    ("lp", {"p": 3.0}),
    ("lp", {"p": 1.5}),
    ("lp", {"p": 2.0}),
    ("huber", {"delta": 0.5}),
    ("huber", {"delta": np.array([0.2, 0.5, 1.0, 2.0, 0.05])}),
    ("huber_norm", {"delta": 1.0}),
    ("huber_mixture", {"delta": 1.0}),
    ("value_shift", {"shift": 0.3}),
]


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_signal_is_gradient_of_loss(name, kw):
    """Closed-form output signal ψ = dℓ/dy equals jax.grad of the per-token loss (float64),
    on tokens on both sides of every threshold (norms from ~0.1 to ~4)."""
    with jax.enable_x64():
        obj = ref.OBJECTIVES[name]
        scales = jnp.asarray([0.05, 0.3, 0.6, 1.0, 2.0, 4.0], F64)[:, None]
        y = rnd(0, (6, 5)) * scales
        v = rnd(1, (6, 5)) * scales * 0.1
        kw = {k: (jnp.asarray(x) if isinstance(x, np.ndarray) else x) for k, x in kw.items()}
        g = jax.vmap(jax.grad(lambda yy, vv: obj.loss(yy, vv, **kw)))(y, v)
        s = obj.signal(y, v, **kw)
        np.testing.assert_allclose(np.asarray(s), np.asarray(g), atol=1e-12, rtol=1e-10)
        if name in ("huber_norm", "huber_mixture"):   # both branches were exercised
            n = np.linalg.norm(np.asarray(y - v), axis=-1)
            assert (n < kw["delta"]).any() and (n > kw["delta"]).any()


def test_lp_with_p2_is_the_l2_objective():
    """ℓp with p = 2 is the ℓ2 objective: ‖e‖₂² = 2·(½‖e‖²) (the ½ convention puts the 2 in η)."""
    with jax.enable_x64():
        y, v = rnd(2, (4, 6)), rnd(3, (4, 6))
        np.testing.assert_allclose(ref.lp_loss(y, v, 2.0), 2 * ref.l2_loss(y, v), rtol=1e-13)
        np.testing.assert_allclose(miras.lp_signal(y, v, 2.0), 2 * l2_signal(y, v), rtol=1e-13)


def test_lp_smooth_surrogate_tends_to_exact_signal():
    """Moneta's tanh/sqrt surrogate → exact ℓp signal (errors O(ε^{1/2}) and O(e^{−a|e|}))."""
    with jax.enable_x64():
        y, v = rnd(4, (8, 6)), rnd(5, (8, 6))
        exact = miras.lp_signal(y, v, 3.0)
        loose = miras.lp_signal_smooth(y, v, 3.0, a=10.0, eps=1e-6)
        tight = miras.lp_signal_smooth(y, v, 3.0, a=1e4, eps=1e-14)
        err_loose = float(jnp.max(jnp.abs(loose - exact)))
        err_tight = float(jnp.max(jnp.abs(tight - exact)))
        assert err_tight < 1e-6 < err_loose


def test_huber_limits():
    """Yaad: δ → ∞ gives the ℓ2 signal; δ → 0⁺ with the ℓ1 branch scaled by 1/δ gives sign(e)."""
    with jax.enable_x64():
        y, v = rnd(6, (5, 4)), rnd(7, (5, 4))
        np.testing.assert_array_equal(miras.huber_signal(y, v, 1e9), y - v)
        d = 1e-9
        np.testing.assert_allclose(miras.huber_signal(y, v, d) / d, jnp.sign(y - v),
                                   rtol=1e-15)  # 1/d rounding


def test_yaad_linear_memory_step():
    """Linear matrix memory, coordinate-wise Yaad: one step is W − η clip(kW − v, ±δ)ᵀ-outer-k,
    i.e. W − η kᵀ clip(e, ±δ) in row layout, equal to a descent step on the Huber loss."""
    with jax.enable_x64():
        W, k, v = rnd(8, (4, 3)), rnd(9, (4,)), rnd(10, (3,))
        delta, eta = jnp.asarray([0.1, 0.5, 5.0]), 0.3
        lit = W - eta * jnp.outer(k, jnp.clip(k @ W - v, -delta, delta))
        auto = W - eta * jax.grad(lambda w: ref.huber_loss(k @ w, v, delta))(W)
        np.testing.assert_allclose(lit, auto, atol=1e-14)


@pytest.mark.parametrize("name,kw", [("huber_norm", {"delta": 1.0}),
                                     ("huber_mixture", {"delta": 1.0}),
                                     ("value_shift", {"shift": 0.3}),
                                     ("lp", {"p": 1.5}), ("lp", {"p": 3.0})])
def test_safe_norms_finite_at_zero_error(name, kw):
    """Exact zero errors (a pair the memory fits, inert padding): loss, signal and the gradient of
    the signal (the outer loop differentiates through it) are finite."""
    obj = ref.OBJECTIVES[name]
    v = jnp.asarray([0.3, -1.0, 2.0], jnp.float32)
    y = v
    assert np.isfinite(float(obj.loss(y, v, **kw)))
    assert np.all(np.isfinite(np.asarray(obj.signal(y, v, **kw))))
    g = jax.grad(lambda yy: jnp.sum(obj.signal(yy, v, **kw) * jnp.arange(1.0, 4.0)))(y)
    assert np.all(np.isfinite(np.asarray(g)))
    g2 = jax.grad(lambda yy: obj.loss(yy, v, **kw))(y)
    assert np.all(np.isfinite(np.asarray(g2)))


# ----------------------------------------------------------------------------- retention


def test_l2_retention_is_the_argmin():
    """λ W₀ − ζ g with (λ, ζ) = (β/(β+η), ηλ) zeroes the gradient of the learning–retaining
    objective ⟨W − W₀, g⟩ + ½‖W − W₀‖²/η + ½‖W‖²/β."""
    with jax.enable_x64():
        W0, g = rnd(11, (3, 4)), rnd(12, (3, 4))
        eta, beta = 0.3, 2.0
        lam, zeta = ref.l2_retention_coefficients(eta, beta)
        W = ref.decay_step(W0, g, lam, zeta)
        obj = lambda w: (jnp.sum((w - W0) * g) + 0.5 * jnp.sum((w - W0) ** 2) / eta
                         + 0.5 * jnp.sum(w ** 2) / beta)
        np.testing.assert_allclose(jax.grad(obj)(W), 0.0, atol=1e-14)


def test_moneta_link():
    """q = 2: W = A; the printed link W = A/‖A‖_q^{q−2} (entry-wise q-norm per matrix) and the
    element-wise option against their formulas; homogeneity degree 3 − q; ‖A₀‖_q = 1 after
    `moneta_init` and then W₀ = A₀ (the fixed point of miras.md §7.6); finite gradient at A = 0."""
    with jax.enable_x64():
        A = rnd(13, (2, 3, 4))
        np.testing.assert_array_equal(miras.moneta_link(A, 2.0), A)
        n4 = np.sum(np.abs(np.asarray(A)) ** 4, axis=(-2, -1), keepdims=True) ** 0.25
        np.testing.assert_allclose(miras.moneta_link(A, 4.0, eps=0.0), np.asarray(A) / n4 ** 2,
                                   rtol=1e-13)
        np.testing.assert_allclose(ref.moneta_link_elementwise(A, 4.0, eps=0.0),
                                   np.asarray(A) * np.abs(np.asarray(A)) ** 2 / n4 ** 2, rtol=1e-13)
        np.testing.assert_allclose(miras.moneta_link(3.0 * A, 4.0, eps=0.0),
                                   3.0 ** (3 - 4) * miras.moneta_link(A, 4.0, eps=0.0), rtol=1e-13)
        A0 = miras.moneta_init(A, 4.0, eps=0.0)
        np.testing.assert_allclose(miras.matrix_q_norm(A0, 4.0, eps=0.0), 1.0, rtol=1e-13)
        np.testing.assert_allclose(miras.moneta_link(A0, 4.0, eps=0.0), A0, rtol=1e-13)
    g = jax.grad(lambda a: jnp.sum(miras.moneta_link(a, 4.0) * 1.7))(jnp.zeros((3, 4)))
    assert np.all(np.isfinite(np.asarray(g)))


def test_memora_logit_form_equals_literal_softmax_update():
    """The logit recurrence Z_t = α Z_{t−1} − η ∇ℓ, W_t = c·Softmax(Z_t) equals the literal
    Eq. 27 W_t = c·Softmax(α log W_{t−1} − η ∇ℓ) step by step (float64, 1e-12), and every
    column (an output unit's incoming weights) stays positive and sums to c."""
    with jax.enable_x64():
        c = 2.0
        Z = rnd(14, (4, 3))
        W = miras.memora_weights(Z, c)
        for t in range(6):
            g = rnd(100 + t, (4, 3))
            alpha, eta = 0.9 + 0.01 * t, 0.2 + 0.05 * t
            W = ref.memora_literal_step(W, g, alpha, eta, c)
            Z = ref.memora_logit_step(Z, g, alpha, eta)
            np.testing.assert_allclose(miras.memora_weights(Z, c), W, rtol=1e-12, atol=1e-12)
            assert np.all(np.asarray(W) > 0)
            np.testing.assert_allclose(np.sum(np.asarray(W), axis=-2), c, rtol=1e-13)


def test_kl_simplex_coefficients_and_elastic_net():
    with jax.enable_x64():
        keep, step = ref.kl_simplex_coefficients(2.0, 0.5)
        lam = (1 / 2.0) / (1 / 2.0 + 1 / 0.5)
        np.testing.assert_allclose([keep, step], [1 - lam, 1 / (1 / 2.0 + 1 / 0.5)], rtol=1e-15)
        z = jnp.asarray([-2.0, -0.3, 0.0, 0.2, 1.5])
        np.testing.assert_allclose(ref.soft_threshold(z, 0.5), [-1.5, 0, 0, 0, 1.0], atol=0)
        np.testing.assert_allclose(ref.soft_threshold_smooth(jnp.asarray([40.0]), 1e-3), [40.0],
                                   rtol=1e-4)
        W = jax.nn.sigmoid(rnd(15, (3, 3)))
        g = rnd(16, (3, 3))
        Wn = ref.bregman_logit_step(W, g, 0.1)
        np.testing.assert_allclose(jnp.log(Wn / (1 - Wn)), jnp.log(W / (1 - W)) - 0.1 * g,
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [MonetaConfig, YaadConfig, MemoraConfig])
def test_miras_h_is_titans_mal_around_the_family_memory(cls):
    """Moneta-H / Yaad-H / Memora-H (miras.md §3, `hybrid="mal"`): the blocks alternate the
    family's memory on [P; x] (Titans' MAL host, titans.md §3.6) and sliding-window attention
    (W + 1 keys, RoPE on the attention only); the entry's parameter formula counts them. Yaad-H
    (its δ gate an extra of the memory) also: the full forward equals prefill + continue at a cut
    inside a chunk (after the N_p = 2 persistent tokens, chunk 3), and a packed second document
    equals a fresh call on it."""
    import zoo
    from layers.attention import Attention
    from layers.titans import PrefixedMemory
    name = cls().model
    cfg = cls(vocab_size=37, dim=16, n_layers=2, n_heads=2, chunk=3, init_std=0.1, gate_rank=4,
              hybrid="mal", attn_window=3, n_persistent=2, max_len=16)
    model = zoo.build(name, cfg, nnx.Rngs(params=0))
    mem, attn = (blk.mixer for blk in model.blocks)
    family = {"moneta": miras.MonetaMemory, "yaad": miras.YaadMemory,
              "memora": miras.MemoraMemory}[name]
    assert isinstance(mem, PrefixedMemory) and isinstance(mem.memory, family)
    assert isinstance(attn, Attention) and attn.window == 3 and attn.rope_base == cfg.rope_base
    count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert zoo.get(name).param_count(cfg) == count
    if name != "yaad":
        return
    graphdef, params = nnx.split(model)
    x = jax.random.randint(jax.random.key(0), (2, 11), 0, 37)

    @jax.jit
    def run(params, x):
        full = zoo.lm.forward(graphdef, params, x)[0]
        a, st, _ = zoo.lm.forward(graphdef, params, x[:, :5], model.init_state(2, 11))
        b, _, _ = zoo.lm.forward(graphdef, params, x[:, 5:], st)
        seg = jnp.broadcast_to((jnp.arange(11) >= 6).astype(jnp.int32), (2, 11))
        packed = zoo.lm.forward(graphdef, params, x, segment_ids=seg)[0]
        fresh = zoo.lm.forward(graphdef, params, x[:, 6:])[0]
        return full, jnp.concatenate([a, b], axis=1), packed, fresh

    full, split, packed, fresh = run(params, x)
    np.testing.assert_allclose(split, full, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(packed[:, 6:], fresh, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(packed[:, :6], full[:, :6], rtol=2e-5, atol=2e-5)
