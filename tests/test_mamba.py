"""Mamba-1 / Mamba-2 invariants of specs/mamba.md §7 and §9.4 (the shared equalities -- causal,
prefill + continue, decode, resets, fast == reference, sharding -- run in test_conformance.py)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from layers.ssm import Mamba2Mixer, MambaMixer, inv_softplus
from pallas_kernels.selective_scan import reference as ss_ref
from zoo.mamba import Mamba2Config, MambaConfig, mamba2_param_count, mamba_param_count, mamba_preset


def test_param_count_of_released_shapes():
    """specs/mamba.md §3.3: 129.1M / 371.5M / 793.2M / 1372M / 2768M."""
    want = {"130m": 129.1, "370m": 371.5, "790m": 793.2, "1.4b": 1372.2, "2.8b": 2768.3}
    for size, millions in want.items():
        assert round(mamba_param_count(mamba_preset(size)) / 1e6, 1) == millions, size


@pytest.mark.parametrize("name,cfg,count", [
    ("mamba", MambaConfig(vocab_size=50, dim=24, n_layers=3, d_state=6, tie_embeddings=False,
                          conv_bias=False), mamba_param_count),
    ("mamba2", Mamba2Config(vocab_size=50, dim=24, n_layers=3, d_state=6, head_dim=12,
                            n_groups=2, tie_embeddings=False), mamba2_param_count)])
def test_param_count_formula_untied(name, cfg, count):
    model = zoo.build(name, cfg, rngs=0)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n == count(cfg)


def test_mamba1_init():
    """§5.1 / §7.7: softplus(b_dt) in [dt_min, dt_max]; inverse-softplus round trip; A = -(1..N)
    per channel; D = 1; dt_proj weight U(+-R^-1/2); out_proj U(+-1/sqrt(Di)) / sqrt(n_layers);
    in_proj U(+-1/sqrt(D)); conv U(+-1/sqrt(K))."""
    D, Di, N, n_layers = 32, 64, 8, 4
    m = MambaMixer(D, rngs=nnx.Rngs(params=0), d_inner=Di, d_state=N,
                   out_scale=1 / math.sqrt(n_layers))
    dt0 = np.asarray(jax.nn.softplus(m.dt_b[...]))
    assert dt0.min() >= 1e-3 * (1 - 1e-6) and dt0.max() <= 0.1 * (1 + 1e-6)
    assert np.log(dt0).std() > 0.5, "dt should spread log-uniformly over two decades"
    with jax.enable_x64():
        y = jnp.asarray(np.geomspace(1e-4, 10.0, 50))
        np.testing.assert_allclose(np.asarray(jax.nn.softplus(inv_softplus(y))), np.asarray(y),
                                   rtol=1e-12)
    np.testing.assert_allclose(-np.exp(np.asarray(m.A_log[...])),
                               np.broadcast_to(-np.arange(1, N + 1), (Di, N)), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(m.D[...]), 1.0)
    R = m.dt_rank
    assert R == math.ceil(D / 16)
    for w, bound in ((m.dt_w[...], R ** -0.5), (m.in_proj.weight[...], D ** -0.5),
                     (m.x_proj.weight[...], Di ** -0.5), (m.conv.weight[...], 0.5),
                     (m.out_proj.weight[...], Di ** -0.5 / math.sqrt(n_layers))):
        a = np.abs(np.asarray(w))
        assert a.max() <= bound and a.max() > 0.9 * bound, (w.shape, a.max(), bound)


def test_mamba2_init():
    m = Mamba2Mixer(32, rngs=nnx.Rngs(params=1), d_inner=64, head_dim=8, d_state=4)
    A = -np.exp(np.asarray(m.A_log[...]))
    assert A.shape == (8,) and np.all(A <= -1.0) and np.all(A >= -16.0)
    dt0 = np.asarray(jax.nn.softplus(m.dt_bias[...]))
    assert dt0.min() >= 1e-3 * (1 - 1e-6) and dt0.max() <= 0.1 * (1 + 1e-6)
    np.testing.assert_array_equal(np.asarray(m.D[...]), 1.0)
    np.testing.assert_array_equal(np.asarray(m.norm.weight[...]), 1.0)


def test_lti_special_case_is_a_convolution():
    """§2.5 / §7.5: constant dt, B, C give the S4D-Real LTI model
    y = K * x with K_k[d] = sum_n C[n] exp(dt A[d, n])^k dt B[n] (float64)."""
    with jax.enable_x64():
        k = jax.random.split(jax.random.key(0), 5)
        Bsz, T, Di, N = 2, 23, 3, 4
        x = jax.random.normal(k[0], (Bsz, T, Di), jnp.float64)
        dt = jnp.broadcast_to(jnp.asarray([0.05, 0.3, 1.2]), (Bsz, T, Di))
        A = -jnp.exp(jax.random.normal(k[1], (Di, N), jnp.float64))
        b, c = jax.random.normal(k[2], (N,), jnp.float64), jax.random.normal(k[3], (N,), jnp.float64)
        y, _ = ss_ref.selective_scan(x, dt, A, jnp.broadcast_to(b, (Bsz, T, N)),
                                     jnp.broadcast_to(c, (Bsz, T, N)))
        d = np.asarray(dt[0, 0])
        kern = np.stack([(np.exp(d[:, None] * np.asarray(A)) ** j * d[:, None] * np.asarray(b))
                         @ np.asarray(c) for j in range(T)])          # [T, Di]
        xn = np.asarray(x)
        want = np.zeros_like(xn)
        for t in range(T):
            want[:, t] = np.einsum("jd,bjd->bd", kern[:t + 1][::-1], xn[:, :t + 1])
        np.testing.assert_allclose(np.asarray(y), want, rtol=1e-12, atol=1e-12)


def test_gating_theorem_needs_exact_zoh():
    """§2.6 / §7.6: N = 1, A = -1, B = 1, dt = softplus(z): exact ZOH gives
    h_t = (1 - sigmoid(z)) h_{t-1} + sigmoid(z) x_t; the Euler input weight is softplus(z)."""
    with jax.enable_x64():
        z = jnp.linspace(-4.0, 4.0, 17, dtype=jnp.float64)
        T = z.size
        x = jnp.asarray(np.random.default_rng(0).normal(size=(1, T, 1)))
        dt = jax.nn.softplus(z)[None, :, None]
        A = -jnp.ones((1, 1), jnp.float64)
        ones = jnp.ones((1, T, 1), jnp.float64)
        y_zoh, _ = ss_ref.selective_scan(x, dt, A, ones, ones, exact_zoh=True)
        g = np.asarray(jax.nn.sigmoid(z))
        h, want = 0.0, []
        for t in range(T):
            h = (1 - g[t]) * h + g[t] * float(x[0, t, 0])
            want.append(h)
        np.testing.assert_allclose(np.asarray(y_zoh)[0, :, 0], want, rtol=1e-12, atol=1e-14)
        y_euler, _ = ss_ref.selective_scan(x, dt, A, ones, ones, exact_zoh=False)
        assert np.max(np.abs(np.asarray(y_euler)[0, :, 0] - np.asarray(want))) > 0.5


def test_stability_decay_at_most_one():
    """§7.11: |exp(dt A)| <= 1 for any input since dt >= 0 and A < 0: a long random drive keeps
    the state bounded by sum of |input| terms."""
    m = MambaMixer(16, rngs=nnx.Rngs(params=0), d_inner=32, d_state=4)
    u = 3.0 * jax.random.normal(jax.random.key(1), (1, 40, 16))
    y, st, _ = m(u)
    assert np.all(np.isfinite(np.asarray(y)))
    assert np.all(np.asarray(-np.exp(m.A_log[...])) < 0)


@pytest.mark.parametrize("exact_zoh", [False, True])
def test_mixer_decode_equals_forward(exact_zoh):
    """§7.3: prefill(L0) + step-by-step decode == the full forward, L0 in {0, 1, K-1, K, 17},
    through the mixer alone (the LM-level equality is in the conformance suite)."""
    m = MambaMixer(16, rngs=nnx.Rngs(params=0), d_inner=32, d_state=4, exact_zoh=exact_zoh,
                   impl="chunked", block=4)
    T = 21
    u = jax.random.normal(jax.random.key(2), (1, T, 16))
    graphdef, params = nnx.split(m)
    full = jax.jit(lambda p, u: nnx.merge(graphdef, p)(u)[0])(params, u)

    @jax.jit
    def prefill(p, u, L0):
        mod = nnx.merge(graphdef, p)
        y, st, _ = mod(u, mod.init_state(1), mask=jnp.arange(T)[None] < L0)
        return y, st

    step = jax.jit(lambda p, u_t, st: nnx.merge(graphdef, p)(u_t, st)[:2])
    for L0 in (0, 1, 3, 4, 17):
        pre, st = prefill(params, u, L0)
        np.testing.assert_allclose(pre[:, :L0], full[:, :L0], atol=1e-5, rtol=1e-5)
        outs = []
        for t in range(L0, T):
            y, st = step(params, u[:, t:t + 1], st)
            outs.append(np.asarray(y[:, 0]))
        np.testing.assert_allclose(np.stack(outs, 1), full[:, L0:], atol=1e-5, rtol=1e-5,
                                   err_msg=f"decode after a prefill of {L0}")
        assert int(st.pos[0]) == T


def test_exact_zoh_flag_changes_the_model():
    cfg = MambaConfig(vocab_size=20, dim=16, n_layers=1, d_state=4)
    toks = jnp.arange(12)[None] % 20
    a = zoo.build("mamba", cfg, rngs=0)(toks)[0]
    b = zoo.build("mamba", MambaConfig(**{**cfg.__dict__, "exact_zoh": True}), rngs=0)(toks)[0]
    diff = float(jnp.max(jnp.abs(a - b)))
    assert 0 < diff < 1.0, diff   # first-order agreement (dt small at init), not equality


def test_mamba2_groups_use_repeat_not_tile():
    """Head h reads B/C group h // (H / G): changing group 1's B changes only heads 2, 3 (G = 2,
    H = 4) of the SSD output."""
    from pallas_kernels.ssd import reference as ssd_ref
    k = jax.random.split(jax.random.key(3), 5)
    x = jax.random.normal(k[0], (1, 6, 4, 2))
    dt = jax.nn.softplus(jax.random.normal(k[1], (1, 6, 4)))
    A = -jnp.ones((4,))
    Bm = jax.random.normal(k[2], (1, 6, 2, 3))
    C = jax.random.normal(k[3], (1, 6, 2, 3))
    y0, _ = ssd_ref.ssd(x, dt, A, Bm, C)
    y1, _ = ssd_ref.ssd(x, dt, A, Bm.at[:, :, 1].add(1.0), C)
    d = np.abs(np.asarray(y1 - y0)).max(axis=(0, 1, 3))
    assert d[0] == 0 and d[1] == 0 and d[2] > 0 and d[3] > 0


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match="model.n_groups"):
        zoo.make_config("mamba2", {"dim": 32, "head_dim": 16, "n_groups": 3})
    with pytest.raises(ValueError, match="model.bogus"):
        zoo.make_config("mamba2", {"bogus": 1})


def test_d_skip_is_the_whole_output_when_the_state_gets_no_input():
    """§3.1's skip y = SSM(x) + D ⊙ x, seen without the HF fixtures: with the x_proj columns of
    B zeroed the state never receives input, so the mixer's output is exactly zero at D = 0,
    nonzero at D = 1, and linear in D (dropping the D term makes every D give zero)."""
    m = MambaMixer(16, rngs=nnx.Rngs(params=0), d_inner=32, d_state=4, impl="reference")
    R, N = m.dt_rank, m.d_state
    m.x_proj.weight[...] = m.x_proj.weight[...].at[:, R:R + N].set(0.0)
    u = jax.random.normal(jax.random.key(3), (2, 9, 16))

    def out(d):
        m.D[...] = jnp.full_like(m.D[...], d)
        return np.asarray(m(u)[0], np.float64)
    y0, y1, y2 = out(0.0), out(1.0), out(2.0)
    assert np.all(y0 == 0.0)
    assert np.abs(y1).max() > 1e-3
    np.testing.assert_allclose(y2, 2.0 * y1, rtol=1e-5, atol=1e-7)
