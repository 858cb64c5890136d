"""LSSL invariants (specs/lssl.md §7 and contract notes): HiPPO closed forms, the structured
parameterisation, discretisations, the three views equal (float64), chunked convolution with
state passing == recurrence, trainable A and dt, dt independent of the call length.

The recurrence and the chunked convolution are the `lssl` op (pallas_kernels/lssl/); the
full-length FFT convolution and the associative scan below are test-only views of the same map."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from layers.lssl import (
    HIPPO,
    LSSLMixer,
    discretize,
    gbt,
    hippo_lagt,
    hippo_legs,
    hippo_legt,
    lssl_ssm,
    structured_A,
    structured_init,
    zoh,
)
from pallas_kernels.common import upcast
from pallas_kernels.lssl import chunked, reference
from pallas_kernels.lssl.chunked import krylov, ssm_kernel
from zoo.lssl import LSSLConfig, classifier_loss

STRUCT = ("p", "q", "dg", "t_diag", "t_sub", "t_sup")


@jax.jit
def conv_view(u, Abar, Bbar, C, D, s=None):
    """View 2 (§2.4): y = K * u (FFT of length >= 2L, no wrap-around) + D u + C Abar^{k+1} s,
    with the kernel generated for this call's length; x_final = Abar^L s
    + sum_j Abar^{L-1-j} Bbar u_j."""
    u, Abar, Bbar, C, D = upcast(u, Abar, Bbar, C, D)
    Bsz, L, H = u.shape
    Kr = krylov(L, Abar, Bbar)                                   # [H, N, L]
    K = jnp.einsum("hmn,hnl->hml", C, Kr)
    n = int(2 ** np.ceil(np.log2(2 * L)))
    yf = jnp.fft.rfft(K, n)[None] * jnp.fft.rfft(jnp.moveaxis(u, 1, 2), n)[:, :, None]
    y = jnp.fft.irfft(yf, n)[..., :L]                            # [B, H, M, L]
    y = jnp.moveaxis(y, -1, 1) + D * u[..., None]
    x = jnp.einsum("hnl,bhl->bhn", Kr[..., ::-1], jnp.moveaxis(u, 1, 2))
    if s is not None:
        Xs = krylov(L + 1, Abar, upcast(s))                      # [B, H, N, L+1]: Abar^k s
        y = y + jnp.moveaxis(jnp.einsum("hmn,bhnl->bhml", C, Xs[..., 1:]), -1, 1)
        x = x + Xs[..., L]
    return y, x


@jax.jit
def scan_view(u, Abar, Bbar, C, D, s=None):
    """View 3: an associative scan over (Abar, Bbar u_k) pairs with the operator
    (A_i, b_i) o (A_j, b_j) = (A_j A_i, A_j b_i + b_j) (materialises L copies of Abar)."""
    u, Abar, Bbar, C, D = upcast(u, Abar, Bbar, C, D)
    Bsz, L, H = u.shape
    b = jnp.moveaxis(Bbar * u[..., None], 1, 0)                  # [L, B, H, N]
    if s is not None:
        b = b.at[0].add(jnp.einsum("hnm,bhm->bhn", Abar, upcast(s)))
    As = jnp.broadcast_to(Abar, (L, *Abar.shape))

    def op(a, c):
        Ai, bi = a
        Aj, bj = c
        return Aj @ Ai, jnp.einsum("lhnm,lbhm->lbhn", Aj, bi) + bj

    _, xs = jax.lax.associative_scan(op, (As, b))
    y = jnp.einsum("hkn,lbhn->blhk", C, xs) + D * u[..., None]
    return y, xs[-1]


def test_hippo_closed_forms():
    """§2.6 / §7.1: LegS entries, eigenvalues exactly -1..-N, the code's construction
    -T M T^{-1}; LagT = -(T^{-1} - I/2); LegT's sign matrix M' has inverse
    1/2 tridiag(-1, (1, 0, ..., 0, 1), +1); all three stable."""
    N = 9
    A, B = hippo_legs(N)
    n = np.arange(N)
    for i in range(N):
        for k in range(N):
            want = -np.sqrt((2 * i + 1) * (2 * k + 1)) if i > k else (-(i + 1) if i == k else 0.0)
            assert A[i, k] == pytest.approx(want, abs=1e-12)
    np.testing.assert_allclose(B, np.sqrt(2 * n + 1), rtol=1e-15)
    np.testing.assert_allclose(np.sort(np.linalg.eigvals(A).real), -np.arange(N, 0, -1.0),
                               atol=1e-9)
    r = np.sqrt(2 * n + 1)
    M = (2 * n[None, :] + 1.0) * (n[:, None] >= n[None, :]) - np.diag(n)
    np.testing.assert_allclose(-np.diag(r) @ M @ np.diag(1 / r), A, atol=1e-12)
    Tinv = np.tril(np.ones((N, N)))
    A_lag, B_lag = hippo_lagt(N)
    np.testing.assert_allclose(A_lag, -(Tinv - 0.5 * np.eye(N)), atol=1e-15)
    np.testing.assert_array_equal(B_lag, np.ones(N))
    A_legt, B_legt = hippo_legt(N, scale=0.5)
    Mp = -A_legt / (0.5 * np.outer(r, r))
    main = np.zeros(N)
    main[0] = main[-1] = 1.0
    tri = 0.5 * (np.diag(main) + np.diag(-np.ones(N - 1), -1) + np.diag(np.ones(N - 1), 1))
    np.testing.assert_allclose(np.linalg.inv(Mp), tri, atol=1e-12)
    np.testing.assert_allclose(B_legt, 0.5 * r, rtol=1e-15)
    for fn in HIPPO.values():
        assert np.linalg.eigvals(fn(N)[0]).real.max() < 0


@pytest.mark.parametrize("measure", ["legs", "legt", "lagt"])
def test_structured_parameterisation_reproduces_hippo(measure):
    """§2.7: A = -P (Dg + T^{-1}) Q with the spec's P, Q, Dg, T equals each HiPPO matrix."""
    with jax.enable_x64():
        init = structured_init(measure, 8)
        A = structured_A(*(jnp.asarray(init[k]) for k in STRUCT))
        A0, B0 = HIPPO[measure](8)
        np.testing.assert_allclose(np.asarray(A), A0, atol=1e-12)
        np.testing.assert_allclose(init["b"], B0, atol=1e-15)


def test_gbt_special_cases_and_gating_lemma():
    """§7.2: α = 0 gives I + dt A and dt B; α = 1 with N = 1, A = -1, B = 1, dt = e^z gives the
    sigmoid gate (x_t = (1 - σ(z)) x_{t-1} + σ(z) u_t); bilinear is the Padé (1,1) of ZOH."""
    with jax.enable_x64():
        A, B = (jnp.asarray(v) for v in hippo_legs(5))
        dt = jnp.asarray([0.01, 0.3])
        Ab, Bb = gbt(A, B, dt, alpha=0.0)
        np.testing.assert_allclose(Ab, jnp.eye(5) + dt[:, None, None] * A, atol=1e-14)
        np.testing.assert_allclose(Bb, dt[:, None] * B, atol=1e-14)
        z = jnp.linspace(-5.0, 5.0, 11)
        Ab, Bb = gbt(-jnp.ones((1, 1)), jnp.ones(1), jnp.exp(z), alpha=1.0)
        np.testing.assert_allclose(Ab[:, 0, 0], 1 - jax.nn.sigmoid(z), atol=1e-12)
        np.testing.assert_allclose(Bb[:, 0], jax.nn.sigmoid(z), atol=1e-12)
        # ZOH: exact for a scalar system; bilinear and ZOH agree to O(dt^3) per step
        a = jnp.asarray([[-2.0]])
        Az, Bz = zoh(a, jnp.ones(1), jnp.asarray([0.1]))
        np.testing.assert_allclose(Az[0, 0, 0], np.exp(-0.2), rtol=1e-13)
        np.testing.assert_allclose(Bz[0, 0], (1 - np.exp(-0.2)) / 2.0, rtol=1e-13)
        errs = []
        for h in (0.01, 0.005):
            Az, _ = zoh(A, B, jnp.asarray([h]))
            Ab, _ = gbt(A, B, jnp.asarray([h]))
            errs.append(float(jnp.abs(Az - Ab).max()))
        assert 7.0 < errs[0] / errs[1] < 9.0, errs      # third order: ratio ~8


def _views_inputs(L=37, H=3, N=8, M=2, Bsz=2, seed=0, measure="legs"):
    k = jax.random.split(jax.random.key(seed), 5)
    A, B = (jnp.asarray(v) for v in HIPPO[measure](N))
    dt = jnp.exp(jax.random.uniform(k[0], (H,), minval=np.log(1e-2), maxval=np.log(0.5)))
    Ab, Bb = gbt(A, B, dt)
    C = jax.random.normal(k[1], (H, M, N))
    D = jax.random.normal(k[2], (H, M))
    u = jax.random.normal(k[3], (Bsz, L, H))
    s = jax.random.normal(k[4], (Bsz, H, N))
    return u, Ab, Bb, C, D, s


def test_three_views_equal_float64():
    """§7.3-7.5: recurrence == Krylov/FFT convolution == associative scan == explicit Toeplitz
    (with and without an initial state; final states equal), float64 to 1e-10 relative."""
    with jax.enable_x64():
        u, Ab, Bb, C, D, s = _views_inputs()
        L = u.shape[1]
        for state in (None, s):
            y_r, x_r = reference.lssl(u, Ab, Bb, C, D, state)
            for view in (conv_view, scan_view):
                y, x = view(u, Ab, Bb, C, D, state)
                np.testing.assert_allclose(y, y_r, rtol=1e-10, atol=1e-10, err_msg=view.__name__)
                np.testing.assert_allclose(x, x_r, rtol=1e-10, atol=1e-10, err_msg=view.__name__)
        K = np.asarray(ssm_kernel(L, Ab, Bb, C))              # [H, M, L]
        Toe = np.zeros((L, L) + K.shape[:2])
        for t in range(L):
            for j in range(t + 1):
                Toe[t, j] = K[..., t - j]
        y_t = np.einsum("tjhm,bjh->bthm", Toe, np.asarray(u)) + np.asarray(D) * np.asarray(u)[..., None]
        y_r, _ = reference.lssl(u, Ab, Bb, C, D)
        np.testing.assert_allclose(y_t, y_r, rtol=1e-10, atol=1e-10)


def test_krylov_squaring_equals_sequential_powers():
    """§7.4 at lengths that are not powers of two."""
    with jax.enable_x64():
        _, Ab, Bb, _, _, _ = _views_inputs()
        for L in (1, 37, 100):
            Kr = np.asarray(krylov(L, Ab, Bb))
            v = np.asarray(Bb)
            for j in range(L):
                np.testing.assert_allclose(Kr[..., j], v, rtol=1e-11, atol=1e-13)
                v = np.einsum("hnm,hm->hn", np.asarray(Ab), v)


def test_chunked_conv_with_state_equals_recurrence():
    """Contract note: convolution inside chunks + state passing == the recurrence for several
    chunk lengths and ragged lengths, with an incoming state, right padding and document
    resets; the returned state follows the last real token (float64)."""
    with jax.enable_x64():
        u, Ab, Bb, C, D, s = _views_inputs(L=29, seed=1)
        L = u.shape[1]
        mask = jnp.arange(L)[None] < jnp.asarray([[L], [17]])
        reset = jnp.zeros((2, L), bool).at[0, 9].set(True).at[1, 4].set(True).at[1, 16].set(True)
        y_r, x_r = reference.lssl(u, Ab, Bb, C, D, s, mask, reset)
        for Q in (1, 4, 8, 16, 64):
            y, x = chunked.lssl(u, Ab, Bb, C, D, s, mask, reset, block=Q)
            m = np.asarray(mask)[..., None, None]
            np.testing.assert_allclose(np.asarray(y) * m, np.asarray(y_r) * m, rtol=1e-10,
                                       atol=1e-10, err_msg=f"chunk {Q}")
            np.testing.assert_allclose(x, x_r, rtol=1e-10, atol=1e-10, err_msg=f"state, chunk {Q}")
        # splitting the sequence and carrying the state == one pass (§7.5)
        y1, x1 = chunked.lssl(u[:, :11], Ab, Bb, C, D, s, block=8)
        y2, x2 = chunked.lssl(u[:, 11:], Ab, Bb, C, D, x1, block=8)
        y_full, x_full = reference.lssl(u, Ab, Bb, C, D, s)
        np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), y_full, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(x2, x_full, rtol=1e-10, atol=1e-10)


def test_conv_kernel_uses_the_call_length():
    """Contract note: a kernel cached at a shorter length truncates the impulse response; the
    convolution view generates it for the call's length, so it equals the recurrence at any L."""
    with jax.enable_x64():
        u, Ab, Bb, C, D, _ = _views_inputs(L=40, seed=2)
        y_r, _ = reference.lssl(u, Ab, Bb, C, D)
        K_short = ssm_kernel(8, Ab, Bb, C)
        y_trunc = np.zeros_like(np.asarray(y_r))
        for t in range(40):
            for j in range(max(0, t - 7), t + 1):
                y_trunc[:, t] += np.asarray(K_short)[..., t - j][None] * np.asarray(u)[:, j, :, None]
        assert np.abs(y_trunc + np.asarray(D) * np.asarray(u)[..., None] - np.asarray(y_r)).max() > 1e-3
        y_c, _ = conv_view(u, Ab, Bb, C, D)
        np.testing.assert_allclose(y_c, y_r, rtol=1e-10, atol=1e-10)


def test_float32_views_agree():
    """§7.3 in float32 (the layer's precision): rtol 1e-4 as the spec recommends."""
    u, Ab, Bb, C, D, s = (a.astype(jnp.float32) for a in _views_inputs(seed=3))
    y_r, x_r = reference.lssl(u, Ab, Bb, C, D, s)
    y_c, x_c = chunked.lssl(u, Ab, Bb, C, D, s, block=16)
    np.testing.assert_allclose(y_c, y_r, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(x_c, x_r, rtol=1e-4, atol=1e-4)


def test_continuous_time_first_order_convergence():
    """§7.7: with point samples of a smooth input, the bilinear recurrence's read-out at T = 2
    converges to the ODE solution at first order (error ratio ~2 per halving of dt)."""
    with jax.enable_x64():
        N = 8
        A, B = hippo_legs(N)
        # ODE reference by a fine-step ZOH-free integrator: RK4 with dt = 1e-4 in float64
        f = lambda t: np.sin(3 * t) + 0.5 * np.cos(7 * t)
        Tend, h = 2.0, 1e-4
        x = np.zeros(N)
        t = 0.0
        for _ in range(int(round(Tend / h))):
            k1 = A @ x + B * f(t)
            k2 = A @ (x + h / 2 * k1) + B * f(t + h / 2)
            k3 = A @ (x + h / 2 * k2) + B * f(t + h / 2)
            k4 = A @ (x + h * k3) + B * f(t + h)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            t += h
        errs = []
        for dt in (0.02, 0.01, 0.005):
            n = int(round(Tend / dt))
            u = jnp.asarray(f(dt * np.arange(1, n + 1)))[None, :, None]
            Ab, Bb = gbt(jnp.asarray(A), jnp.asarray(B), jnp.asarray([dt]))
            _, xs = reference.lssl(u, Ab, Bb, jnp.eye(N)[None], jnp.zeros((1, N)))
            errs.append(np.abs(np.asarray(xs[0, 0]) - x).max())
        ratios = [errs[0] / errs[1], errs[1] / errs[2]]
        assert all(1.7 < r < 2.3 for r in ratios), (errs, ratios)


def test_trainable_transition_and_dt():
    """LSSL (full): gradients reach the structured A parameters, B and log_dt; LSSL-f
    (learn_A=False, learn_dt=False) stops them (C, D and the output linear still train)."""
    u = jax.random.normal(jax.random.key(0), (2, 9, 4))

    def grads(learn):
        m = LSSLMixer(4, rngs=nnx.Rngs(params=0), d_state=5, channels=2, learn_A=learn,
                      learn_dt=learn)
        g, p = nnx.split(m)
        return jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(g, p)(u)[0] ** 2)))(p)

    full, fixed = grads(True), grads(False)
    for name in STRUCT + ("b", "log_dt"):
        assert float(jnp.abs(full[name][...]).sum()) > 0, name
        assert float(jnp.abs(fixed[name][...]).sum()) == 0, name
    for name in ("C", "D"):
        assert float(jnp.abs(fixed[name][...]).sum()) > 0, name


def test_init_and_dt_independent_of_call_length():
    """§5.1: A = LegS, B = sqrt(2n+1), log_dt log-uniform in [dt_min, dt_max]; dt = exp(log_dt) *
    rate with a fixed rate: a prefix's outputs do not depend on how long the call is, and
    rate = f equals multiplying dt by f."""
    m = LSSLMixer(6, rngs=nnx.Rngs(params=0), d_state=7, dt_min=1e-3, dt_max=1e-1)
    A, B = m.transition()
    np.testing.assert_allclose(A, hippo_legs(7)[0], atol=1e-4)
    np.testing.assert_allclose(B, hippo_legs(7)[1], atol=1e-6)
    dt = np.exp(np.asarray(m.log_dt[...]))
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    u = jax.random.normal(jax.random.key(1), (1, 30, 6))
    run = jax.jit(lambda p, u: lssl_ssm(p, u, jnp.zeros((1, 6, 7)), jnp.ones(u.shape[:2], bool),
                                        jnp.zeros(u.shape[:2], bool), rate=2.0)[0])
    p = m.arrays()
    y_long = run(p, u)
    y_short = run(p, u[:, :10])
    np.testing.assert_allclose(y_short, y_long[:, :10], atol=1e-6, rtol=0)
    p3 = {**p, "log_dt": p["log_dt"] + np.log(2.0)}
    ref = jax.jit(lambda p, u: lssl_ssm(p, u, jnp.zeros((1, 6, 7)), jnp.ones(u.shape[:2], bool),
                                        jnp.zeros(u.shape[:2], bool), rate=1.0)[0])
    np.testing.assert_allclose(y_long, ref(p3, u), atol=1e-5, rtol=1e-5)


def test_param_count_small_model():
    """§7.9: the paper's small model (6 layers, H = N = 128, M = 1) has ≈ 6·128·(128+128) ≈ 197K
    LSSL parameters (C plus the output linear); the exact count adds D, dt, the shared
    transition, biases and norms."""
    cfg = LSSLConfig(vocab_size=1, dim=128, n_layers=6, d_state=128, channels=1)
    n = zoo.get("lssl").param_count(cfg)
    approx = 6 * 128 * (128 + 128)
    assert approx < n < 1.05 * approx, n


def test_classifier_pools_real_positions_and_trains():
    """The pooled head averages the real (mask) positions only: right padding never changes
    the logits; the pure classification loss has finite gradients; float features work."""
    cfg = dataclasses.replace(zoo.get("lssl_classifier").conformance.config, n_classes=3,
                              n_layers=1)
    model = zoo.build("lssl_classifier", cfg, rngs=0)
    g, p = nnx.split(model)
    fwd = jax.jit(lambda p, x, m: nnx.merge(g, p)(x, mask=m)[0])
    x = jax.random.randint(jax.random.key(0), (2, 13), 0, cfg.vocab_size)
    mask = jnp.broadcast_to(jnp.arange(13)[None] < 9, (2, 13))
    garbage = jnp.where(mask, x, (x * 7 + 3) % cfg.vocab_size)
    np.testing.assert_allclose(fwd(p, garbage, mask), fwd(p, x, mask), atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(fwd(p, x, mask), jax.jit(lambda p, x: nnx.merge(g, p)(x)[0])(p, x[:, :9]),
                               atol=1e-5, rtol=1e-5)
    batch = {"inputs": x, "labels": jnp.array([0, 2]), "mask": mask}
    grads = jax.jit(jax.grad(lambda p: classifier_loss(g, p, batch)[0]))(p)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["decoder"]["weight"][...]).sum()) > 0
    feat = zoo.build("lssl_classifier", dataclasses.replace(cfg, d_input=3), rngs=0)
    out = feat(jax.random.normal(jax.random.key(1), (2, 9, 3)))[0]
    assert out.shape == (2, 3) and np.all(np.isfinite(np.asarray(out)))
    with pytest.raises(ValueError, match="segment_ids"):
        model(x, segment_ids=jnp.zeros_like(x))


def test_zoh_discretisation_runs_through_the_layer():
    """discretization='zoh' (behind a flag): the layer equals the recurrence with expm."""
    with jax.enable_x64():
        A, B = (jnp.asarray(v) for v in hippo_legs(4))
        dt = jnp.asarray([0.1, 0.2])
        Ab, Bb = discretize(A, B, dt, "zoh")
        np.testing.assert_allclose(Ab, jax.vmap(jax.scipy.linalg.expm)(dt[:, None, None] * A),
                                   rtol=1e-12)
        # ZOH B̄ solves A B̄ = (Ā - I) B
        np.testing.assert_allclose(jnp.einsum("nm,hm->hn", A, Bb),
                                   jnp.einsum("hnm,m->hn", Ab - jnp.eye(4), B), atol=1e-12)


def test_gauss_jordan_solve_matches_lapack_with_pivoting_and_gradients():
    """`layers.lssl.solve` (plain-XLA Gauss-Jordan, used because XLA:CPU deadlocked on
    concurrent LAPACK solves) equals jnp.linalg.solve in value and first derivatives, also for
    matrices that need row pivoting (zero leading entries)."""
    from layers.lssl import inverse, solve
    with jax.enable_x64():
        k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
        M = jax.random.normal(k1, (3, 6, 6), jnp.float64)
        M = M.at[0, 0, 0].set(0.0).at[1, :2, :2].set(0.0)  # pivots needed
        R = jax.random.normal(k2, (3, 6, 4), jnp.float64)
        W = jax.random.normal(k3, (3, 6, 4), jnp.float64)
        np.testing.assert_allclose(inverse(M) @ M, np.broadcast_to(np.eye(6), M.shape), atol=1e-11)
        np.testing.assert_allclose(solve(M, R), jnp.linalg.solve(M, R), rtol=1e-10, atol=1e-11)
        f = lambda fn: jax.grad(lambda m, r: jnp.sum(jnp.sin(fn(m, r)) * W), argnums=(0, 1))(M, R)
        for a, b in zip(f(solve), f(jnp.linalg.solve)):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)


def test_impl_vocabulary():
    """`auto` runs the recurrence on CPU (the LSSL's default there); an implementation the `lssl`
    op lacks is rejected by the op and, naming the key, by the config."""
    from pallas_kernels.impl import on_cpu
    from pallas_kernels.lssl import lssl
    u, Ab, Bb, C, D, s = (a.astype(jnp.float32) for a in _views_inputs(L=9, seed=4))
    y_a, x_a = lssl(u, Ab, Bb, C, D, h0=s)
    y_r, x_r = reference.lssl(u, Ab, Bb, C, D, s)
    if on_cpu():
        np.testing.assert_array_equal(y_a, y_r)
        np.testing.assert_array_equal(x_a, x_r)
    y_c, _ = lssl(u, Ab, Bb, C, D, h0=s, impl="chunked", block=4)
    np.testing.assert_allclose(y_c, y_r, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="lssl: impl='pallas' is not available"):
        lssl(u, Ab, Bb, C, D, impl="pallas")
    with pytest.raises(ValueError, match="model.impl='pallas_interpret': op 'lssl'"):
        zoo.make_config("lssl", {"impl": "pallas_interpret"})
    with pytest.raises(ValueError, match="model.block"):
        zoo.make_config("lssl_classifier", {"block": 0})
