"""Pure parts of the neural memory (layers/memory_parts.py): closed forms against autodiff, the
reductions and invariants of specs/miras.md §7 and specs/atlas.md §7 in the form they are stated.

Float64 where a statement is exact (tolerances ~1e-10); float32 where the spec states a float32
property (Newton–Schulz singular-value ranges)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import memory_parts as mp
from pallas_kernels.attention import reference as attn_ref

F64 = jnp.float64


def rnd(seed, shape, scale=1.0, dtype=F64):
    return scale * jax.random.normal(jax.random.key(seed), shape, dtype)


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
        obj = mp.objective(name)
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
        np.testing.assert_allclose(mp.lp_loss(y, v, 2.0), 2 * mp.l2_loss(y, v), rtol=1e-13)
        np.testing.assert_allclose(mp.lp_signal(y, v, 2.0), 2 * mp.l2_signal(y, v), rtol=1e-13)


def test_lp_smooth_surrogate_tends_to_exact_signal():
    """Moneta's tanh/sqrt surrogate → exact ℓp signal (errors O(ε^{1/2}) and O(e^{−a|e|}))."""
    with jax.enable_x64():
        y, v = rnd(4, (8, 6)), rnd(5, (8, 6))
        exact = mp.lp_signal(y, v, 3.0)
        loose = mp.lp_signal_smooth(y, v, 3.0, a=10.0, eps=1e-6)
        tight = mp.lp_signal_smooth(y, v, 3.0, a=1e4, eps=1e-14)
        err_loose = float(jnp.max(jnp.abs(loose - exact)))
        err_tight = float(jnp.max(jnp.abs(tight - exact)))
        assert err_tight < 1e-6 < err_loose


def test_huber_limits():
    """Yaad: δ → ∞ gives the ℓ2 signal; δ → 0⁺ with the ℓ1 branch scaled by 1/δ gives sign(e)."""
    with jax.enable_x64():
        y, v = rnd(6, (5, 4)), rnd(7, (5, 4))
        np.testing.assert_array_equal(mp.huber_signal(y, v, 1e9), y - v)
        d = 1e-9
        np.testing.assert_allclose(mp.huber_signal(y, v, d) / d, jnp.sign(y - v), rtol=1e-15)  # 1/d rounding


def test_yaad_linear_memory_step():
    """Linear matrix memory, coordinate-wise Yaad: one step is W − η clip(kW − v, ±δ)ᵀ-outer-k,
    i.e. W − η kᵀ clip(e, ±δ) in row layout, equal to a descent step on the Huber loss."""
    with jax.enable_x64():
        W, k, v = rnd(8, (4, 3)), rnd(9, (4,)), rnd(10, (3,))
        delta, eta = jnp.asarray([0.1, 0.5, 5.0]), 0.3
        lit = W - eta * jnp.outer(k, jnp.clip(k @ W - v, -delta, delta))
        auto = W - eta * jax.grad(lambda w: mp.huber_loss(k @ w, v, delta))(W)
        np.testing.assert_allclose(lit, auto, atol=1e-14)


@pytest.mark.parametrize("name,kw", [("huber_norm", {"delta": 1.0}),
                                     ("huber_mixture", {"delta": 1.0}),
                                     ("value_shift", {"shift": 0.3}),
                                     ("lp", {"p": 1.5}), ("lp", {"p": 3.0})])
def test_safe_norms_finite_at_zero_error(name, kw):
    """Exact zero errors (a pair the memory fits, inert padding): loss, signal and the gradient of
    the signal (the outer loop differentiates through it) are finite."""
    obj = mp.objective(name)
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
        lam, zeta = mp.l2_retention_coefficients(eta, beta)
        W = mp.decay_step(W0, g, lam, zeta)
        obj = lambda w: (jnp.sum((w - W0) * g) + 0.5 * jnp.sum((w - W0) ** 2) / eta
                         + 0.5 * jnp.sum(w ** 2) / beta)
        np.testing.assert_allclose(jax.grad(obj)(W), 0.0, atol=1e-14)


def test_moneta_link():
    """q = 2: W = A; the printed link W = A/‖A‖_q^{q−2} (entry-wise q-norm per matrix) and the
    element-wise option against their formulas; homogeneity degree 3 − q; ‖A₀‖_q = 1 after
    `moneta_init` and then W₀ = A₀ (the fixed point of miras.md §7.6); finite gradient at A = 0."""
    with jax.enable_x64():
        A = rnd(13, (2, 3, 4))
        np.testing.assert_array_equal(mp.moneta_link(A, 2.0), A)
        n4 = np.sum(np.abs(np.asarray(A)) ** 4, axis=(-2, -1), keepdims=True) ** 0.25
        np.testing.assert_allclose(mp.moneta_link(A, 4.0, eps=0.0), np.asarray(A) / n4 ** 2,
                                   rtol=1e-13)
        np.testing.assert_allclose(mp.moneta_link(A, 4.0, eps=0.0, elementwise=True),
                                   np.asarray(A) * np.abs(np.asarray(A)) ** 2 / n4 ** 2, rtol=1e-13)
        np.testing.assert_allclose(mp.moneta_link(3.0 * A, 4.0, eps=0.0),
                                   3.0 ** (3 - 4) * mp.moneta_link(A, 4.0, eps=0.0), rtol=1e-13)
        A0 = mp.moneta_init(A, 4.0, eps=0.0)
        np.testing.assert_allclose(mp.matrix_q_norm(A0, 4.0, eps=0.0), 1.0, rtol=1e-13)
        np.testing.assert_allclose(mp.moneta_link(A0, 4.0, eps=0.0), A0, rtol=1e-13)
    g = jax.grad(lambda a: jnp.sum(mp.moneta_link(a, 4.0) * 1.7))(jnp.zeros((3, 4)))
    assert np.all(np.isfinite(np.asarray(g)))


def test_memora_logit_form_equals_literal_softmax_update():
    """The logit recurrence Z_t = α Z_{t−1} − η ∇ℓ, W_t = c·Softmax(Z_t) equals the literal
    Eq. 27 W_t = c·Softmax(α log W_{t−1} − η ∇ℓ) step by step (float64, 1e-12), and every
    column (an output unit's incoming weights) stays positive and sums to c."""
    with jax.enable_x64():
        c = 2.0
        Z = rnd(14, (4, 3))
        W = mp.memora_weights(Z, c)
        for t in range(6):
            g = rnd(100 + t, (4, 3))
            alpha, eta = 0.9 + 0.01 * t, 0.2 + 0.05 * t
            W = mp.memora_literal_step(W, g, alpha, eta, c)
            Z = mp.memora_logit_step(Z, g, alpha, eta)
            np.testing.assert_allclose(mp.memora_weights(Z, c), W, rtol=1e-12, atol=1e-12)
            assert np.all(np.asarray(W) > 0)
            np.testing.assert_allclose(np.sum(np.asarray(W), axis=-2), c, rtol=1e-13)


def test_kl_simplex_coefficients_and_elastic_net():
    with jax.enable_x64():
        keep, step = mp.kl_simplex_coefficients(2.0, 0.5)
        lam = (1 / 2.0) / (1 / 2.0 + 1 / 0.5)
        np.testing.assert_allclose([keep, step], [1 - lam, 1 / (1 / 2.0 + 1 / 0.5)], rtol=1e-15)
        z = jnp.asarray([-2.0, -0.3, 0.0, 0.2, 1.5])
        np.testing.assert_allclose(mp.soft_threshold(z, 0.5), [-1.5, 0, 0, 0, 1.0], atol=0)
        np.testing.assert_allclose(mp.soft_threshold_smooth(jnp.asarray([40.0]), 1e-3), [40.0],
                                   rtol=1e-4)
        W = jax.nn.sigmoid(rnd(15, (3, 3)))
        g = rnd(16, (3, 3))
        Wn = mp.bregman_logit_step(W, g, 0.1)
        np.testing.assert_allclose(jnp.log(Wn / (1 - Wn)), jnp.log(W / (1 - W)) - 0.1 * g,
                                   rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- Newton–Schulz


def test_newton_schulz_singular_values_and_symmetries():
    """atlas.md §7.6 (float32): Gaussian 64×256 and 256×64 inputs come out with every singular
    value in [0.65, 1.15]; square inputs stay ≤ 1.2; exactly zero singular values stay zero;
    NS(−X) = −NS(X); NS(cX) = NS(X); shapes preserved."""
    for shape in [(64, 256), (256, 64)]:
        X = jax.random.normal(jax.random.key(1), shape)
        O = mp.newton_schulz(X)
        assert O.shape == shape
        s = np.linalg.svd(np.asarray(O), compute_uv=False)
        assert 0.65 <= s.min() and s.max() <= 1.15, (s.min(), s.max())
        np.testing.assert_allclose(mp.newton_schulz(-X), -O, atol=1e-6)
        np.testing.assert_allclose(mp.newton_schulz(37.0 * X), O, atol=2e-5)
    sq = mp.newton_schulz(jax.random.normal(jax.random.key(2), (3, 64, 64)))   # batched
    assert np.linalg.svd(np.asarray(sq), compute_uv=False).max() <= 1.2
    # rank 2 in 16×24: the 14 zero singular values stay zero
    u = jax.random.normal(jax.random.key(3), (16, 2))
    w = jax.random.normal(jax.random.key(4), (2, 24))
    s = np.linalg.svd(np.asarray(mp.newton_schulz(u @ w)), compute_uv=False)
    assert s[:2].min() > 0.5 and s[2:].max() < 1e-4


def test_newton_schulz_matches_polar_factor_with_more_steps_and_is_exact_polynomial():
    """k is a compute knob: the iteration is the stated quintic polynomial (checked step by step
    on a small matrix in float64), NS_0 is the Frobenius normalisation."""
    with jax.enable_x64():
        X = rnd(17, (3, 5))
        x = X / jnp.sqrt(jnp.sum(X * X) + 1e-14)
        np.testing.assert_allclose(mp.newton_schulz(X, steps=0), x, rtol=1e-12)
        for _ in range(3):
            A = x @ x.T
            x = 3.4445 * x + (-4.7750 * A + 2.0315 * A @ A) @ x
        np.testing.assert_allclose(mp.newton_schulz(X, steps=3), x, rtol=1e-12)
        np.testing.assert_allclose(mp.newton_schulz(X.T, steps=3), x.T, rtol=1e-12)


def test_newton_schulz_finite_gradient_at_zero():
    """NS(0) = 0 and the gradient at S = 0 (an all-inert window) is finite."""
    Z = jnp.zeros((4, 6))
    np.testing.assert_array_equal(mp.newton_schulz(Z), 0.0)
    R = jax.random.normal(jax.random.key(5), (4, 6))
    g = jax.grad(lambda x: jnp.sum(mp.newton_schulz(x) * R))(Z)
    assert np.all(np.isfinite(np.asarray(g))) and float(jnp.max(jnp.abs(g))) > 0


# ----------------------------------------------------------------------------- feature maps


@pytest.mark.parametrize("p", [1, 2, 3])
def test_poly_features_realise_the_kernel(p):
    """φ(q)·φ(k) = Σ_i a_i (q·k)^i (atlas.md §7.5; float64 to 1e-12) with D_φ = Σ C(d+i−1, i)."""
    with jax.enable_x64():
        d = 5
        q, k = rnd(18, (7, d)), rnd(19, (7, d))
        a = jax.nn.softplus(rnd(20, (p + 1,)))
        fq, fk = mp.poly_features(q, a), mp.poly_features(k, a)
        assert fq.shape == (7, mp.poly_feature_dim(d, p))
        np.testing.assert_allclose(jnp.sum(fq * fk, -1), mp.poly_kernel(q, k, a), rtol=1e-12)


def test_poly_features_init_and_identity_coefficients():
    """At init a = softplus(ρ₀) = (1, 1, 1/2): φ(q)·φ(k) = 1 + q·k + (q·k)²/2; with
    a = (0, 1, 0) it is q·k; D_φ = 1 + d + d(d+1)/2; degree-2 block = squares then √2 x_j x_l."""
    with jax.enable_x64():
        d = 4
        q, k = mp.safe_normalize(rnd(21, (6, d))), mp.safe_normalize(rnd(22, (6, d)))
        a0 = mp.poly_coeffs(jnp.asarray(mp.poly_coeffs_init(2)))
        np.testing.assert_allclose(a0, [1.0, 1.0, 0.5], rtol=1e-14)
        s = jnp.sum(q * k, -1)
        np.testing.assert_allclose(jnp.sum(mp.poly_features(q, a0) * mp.poly_features(k, a0), -1),
                                   1 + s + s * s / 2, rtol=1e-12)
        a = jnp.asarray([0.0, 1.0, 0.0])
        np.testing.assert_allclose(jnp.sum(mp.poly_features(q, a) * mp.poly_features(k, a), -1),
                                   s, atol=1e-14)
        assert mp.poly_feature_dim(d, 2) == 1 + d + d * (d + 1) // 2
        x = jnp.asarray([1.0, 2.0, 3.0])
        np.testing.assert_allclose(mp.sym_features(x, 2),
                                   [1, 4, 9, 2 * 2 ** .5, 3 * 2 ** .5, 6 * 2 ** .5], rtol=1e-14)
        np.testing.assert_allclose(mp.poly_residual(mp.poly_features(x, a0), 3, 2), x, rtol=1e-14)


# ----------------------------------------------------------------------------- Omega window


def test_omega_band_structure_and_window_sum():
    """Γ has no non-zero above the diagonal (source after target) nor beyond c − 1
    sub-diagonals (atlas.md §7.7); the band applied to source gradients equals the window sum
    U_t = Σ_j γ^{(t)}[j] u_{t−j}; c = 1 is the online rule U_t = γ_t u_t; gates zero at every
    offset but 0 reduce the window to c = 1."""
    with jax.enable_x64():
        n, c = 6, 3
        gam = jax.nn.sigmoid(rnd(23, (n, c)))
        G = np.asarray(mp.omega_band(gam))
        assert G.shape == (n, n + c - 1)
        t = np.arange(n)[:, None]
        src = np.arange(n + c - 1)[None, :] - (c - 1)
        assert np.all(G[(src > t) | (t - src >= c)] == 0)
        assert np.all(G[(src <= t) & (t - src < c)] > 0)
        u = rnd(24, (n, 2, 3))
        loop = np.stack([sum(np.asarray(gam)[s, j] * np.asarray(u)[s - j]
                             for j in range(c) if s - j >= 0) for s in range(n)])
        np.testing.assert_allclose(mp.omega_window_sum(u, gam), loop, rtol=1e-13)
        g1 = gam[:, :1]
        np.testing.assert_allclose(mp.omega_window_sum(u, g1), g1[:, :, None] * u, rtol=1e-14)
        only0 = gam * jnp.asarray([1.0, 0.0, 0.0])
        np.testing.assert_allclose(mp.omega_window_sum(u, only0), mp.omega_window_sum(u, g1),
                                   rtol=1e-14)
        valid = jnp.asarray([0, 0, 1, 1, 1, 1], bool)
        np.testing.assert_allclose(mp.omega_window_sum(u, gam, valid)[2],
                                   gam[2, 0] * u[2], rtol=1e-14)
        # keep-gate variant: γ_i^{(t)} = g_i
        gs = jax.nn.sigmoid(rnd(25, (n + c - 1,)))
        K = np.asarray(mp.keep_gate_band(gs, n, c))
        ref = np.where((src <= t) & (t - src < c), np.asarray(gs)[None, :], 0.0)
        np.testing.assert_allclose(K, ref, rtol=1e-15)


def test_omega_rule_c1_equals_online_rule_linear_memory():
    """Omega rule with c = 1, γ ≡ 1 equals the online rule (atlas.md §2.4), token level, linear
    memory on polynomial features: the window gradient U_t formed by `omega_window_sum` over the
    per-source gradients at M_{t−1} (jax.grad of the ½-loss) equals the single online gradient
    φ(k_t)(φ(k_t)ᵀM_{t−1} − v_t)."""
    with jax.enable_x64():
        T, d, dv = 7, 3, 2
        a = mp.poly_coeffs(jnp.asarray(mp.poly_coeffs_init(2)))
        k, v = mp.poly_features(mp.safe_normalize(rnd(26, (T, d))), a), rnd(27, (T, dv))
        alpha, eta = jax.nn.sigmoid(rnd(28, (T,)) + 3), 0.5 * jax.nn.sigmoid(rnd(29, (T,)))
        src_grads = jax.jit(jax.vmap(jax.grad(lambda m, kk, vv: mp.l2_loss(kk @ m, vv)),
                                     (None, 0, 0)))
        wsum = jax.jit(mp.omega_window_sum)

        def run(gam):
            M = jnp.zeros((k.shape[1], dv))
            outs = []
            for t in range(T):
                U = wsum(src_grads(M, k, v), gam)[t]      # sources after t carry no gate weight
                M = alpha[t] * M - eta[t] * U
                outs.append(M)
            return np.stack(outs)

        kn, vn, an, en = (np.asarray(x) for x in (k, v, alpha, eta))
        online, M = [], np.zeros((kn.shape[1], dv))
        for t in range(T):
            M = an[t] * M - en[t] * np.outer(kn[t], kn[t] @ M - vn[t])
            online.append(M)
        np.testing.assert_allclose(run(jnp.ones((T, 1))), np.stack(online), rtol=1e-12)
        # a wider window is a different model (the test bites)
        assert not np.allclose(run(jnp.ones((T, 3))), np.stack(online))


# ----------------------------------------------------------------------------- φ* kernel form


def _attn_ref(q, k, v, scale, window):
    T = q.shape[0]
    pos = jnp.arange(T)[None]
    z = jnp.zeros((1, T), jnp.int32)
    return attn_ref.attention(q[None, :, None], k[None, :, None], v[None, :, None], q_pos=pos,
                              k_pos=pos, q_group=z, k_group=z, k_valid=jnp.ones((1, T), bool),
                              causal=True, window=window, scale=scale)[0, :, 0]


@pytest.mark.parametrize("window", [None, 3])
def test_deep_transformer_normalised_is_softmax_attention(window):
    """DeepTransformer, linear memory, normalised, α ≡ η ≡ 1 == causal softmax attention with the
    same kernel scale (atlas.md §7.4, 1e-6); SWDT with a window of c = 4 tokens == the shared
    sliding-window attention with W = c − 1 = 3."""
    T, d = 11, 4
    q, k, v = (jax.random.normal(jax.random.key(s), (T, d)) for s in (30, 31, 32))
    ours = mp.deep_transformer_read(q, k, v, scale=d ** -0.5, window=window, normalize=True)
    np.testing.assert_allclose(ours, _attn_ref(q, k, v, d ** -0.5, window), atol=1e-6, rtol=1e-6)


def test_deep_transformer_kernel_form_equals_linear_memory_on_truncated_phi_star():
    """The kernel form is the linear memory M_t = α_t M_{t−1} + η_t v_t φ*(k_t)ᵀ read at φ*(q_t):
    compared with the explicit recurrence on the order-10 truncation of φ* (the polynomial map
    with a_i = s^i/i!), whose kernel error is < 1e-10 for |q·k| ≤ 1."""
    with jax.enable_x64():
        T, d, dv, p, s = 9, 3, 2, 10, 0.7
        q = mp.safe_normalize(rnd(33, (T, d)))
        k = mp.safe_normalize(rnd(34, (T, d)))
        v = rnd(35, (T, dv))
        la, eta = jnp.log(jax.nn.sigmoid(rnd(36, (T,)) + 2)), jax.nn.sigmoid(rnd(37, (T,)))
        a = jnp.asarray([s ** i / math.factorial(i) for i in range(p + 1)])
        fq, fk = np.asarray(mp.poly_features(q, a)), np.asarray(mp.poly_features(k, a))
        vn, ln, en = np.asarray(v), np.asarray(la), np.asarray(eta)
        M = np.zeros((fk.shape[1], dv))
        ys = []
        for t in range(T):
            M = np.exp(ln[t]) * M + en[t] * np.outer(fk[t], vn[t])
            ys.append(fq[t] @ M)
        ours = mp.deep_transformer_read(q, k, v, scale=s, log_alpha=la, eta=eta)
        np.testing.assert_allclose(ours, np.stack(ys), atol=1e-9, rtol=1e-9)
        sw = mp.deep_transformer_read(q, k, v, scale=s, eta=eta, window=2)
        qn, kn = np.asarray(q), np.asarray(k)
        ref = [sum(en[i] * np.exp(s * qn[t] @ kn[i]) * vn[i] for i in range(max(0, t - 2), t + 1))
               for t in range(T)]
        np.testing.assert_allclose(sw, np.stack(ref), rtol=1e-12)


def test_dot_triangular_solve_equals_token_loop_and_deltanet():
    """Dot, linear memory, c = 1: the triangular-solve form equals the token loop of the
    kernelised delta rule (atlas.md §7.4); with φ = id (linear kernel) both equal DeltaNet
    M_t = M_{t−1} + η_t (v_t − M_{t−1} k_t) k_tᵀ; gradients of the two forms agree."""
    with jax.enable_x64():
        T, d, dv = 10, 3, 2
        q = mp.safe_normalize(rnd(38, (T, d)))
        k = mp.safe_normalize(rnd(39, (T, d)))
        v = rnd(40, (T, dv))
        eta = jax.nn.sigmoid(rnd(41, (T,)))
        one = jnp.ones((T, 1))
        for kern in ("exp", "linear"):
            a = mp.dot_solve(q, k, v, eta, scale=0.8, kernel=kern)
            b = mp.dot_token_loop(q, k, v, eta, one, scale=0.8, kernel=kern)
            np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-12)
        qn, kn, vn, en = (np.asarray(x) for x in (q, k, v, eta))
        M = np.zeros((dv, d))
        ys = []
        for t in range(T):
            M = M + en[t] * np.outer(vn[t] - M @ kn[t], kn[t])
            ys.append(M @ qn[t])
        np.testing.assert_allclose(mp.dot_solve(q, k, v, eta, scale=1.0, kernel="linear"),
                                   np.stack(ys), rtol=1e-12, atol=1e-13)
        ga = jax.grad(lambda vv: jnp.sum(mp.dot_solve(q, k, vv, eta, scale=0.8) ** 2))(v)
        gb = jax.grad(lambda vv: jnp.sum(mp.dot_token_loop(q, k, vv, eta, one, scale=0.8) ** 2))(v)
        np.testing.assert_allclose(ga, gb, rtol=1e-10)


def test_dot_window_equals_omega_rule_on_truncated_phi_star():
    """Dot with a window c = 3, gates γ and decay: the kernel token loop equals the Omega rule
    on an explicit linear memory over the order-12 truncation of φ* (atlas.md §2.7 ρ-form)."""
    with jax.enable_x64():
        T, d, dv, c, s = 8, 2, 2, 3, 0.6
        q = mp.safe_normalize(rnd(42, (T, d)))
        k = mp.safe_normalize(rnd(43, (T, d)))
        v = rnd(44, (T, dv))
        eta = 0.5 * jax.nn.sigmoid(rnd(45, (T,)))
        alpha = jax.nn.sigmoid(rnd(46, (T,)) + 3)
        gam = jax.nn.sigmoid(rnd(47, (T, c)))
        a = jnp.asarray([s ** i / math.factorial(i) for i in range(13)])
        fq, fk = np.asarray(mp.poly_features(q, a)), np.asarray(mp.poly_features(k, a))
        vn, en, an, gn = (np.asarray(x) for x in (v, eta, alpha, gam))
        M = np.zeros((fk.shape[1], dv))
        ys = []
        for t in range(T):   # explicit Omega rule: every window source's gradient at M_{t−1}
            U = sum(gn[t, j] * np.outer(fk[t - j], fk[t - j] @ M - vn[t - j])
                    for j in range(c) if t - j >= 0)
            M = an[t] * M - en[t] * U
            ys.append(fq[t] @ M)
        ours = mp.dot_token_loop(q, k, v, eta, gam, scale=s, alpha=alpha)
        np.testing.assert_allclose(ours, np.stack(ys), rtol=1e-9, atol=1e-10)
