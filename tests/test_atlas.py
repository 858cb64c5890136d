"""ATLAS family on the shared neural-memory layer (zoo/atlas.py): the invariants and reductions
of specs/atlas.md §7 in the form the spec states them.

The layer's inner maths runs in float32, so comparisons against the float64 numpy token loops
use rtol 1e-4: five Newton–Schulz steps amplify float32 rounding (atlas.md §6.3); the plain
GD reductions are checked at 2e-5."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from layers.memory import NeuralMemory, NeuralMemoryConfig
from zoo.atlas import AtlasConfig, AtlasMemory, OmegaNetConfig

B, T, D, H = 2, 11, 8, 2
BASE = dict(dim=D, n_heads=H, memory="linear", memory_init_std=0.3, lr_max=0.5, lr_bias=0.0,
            alpha_bias=2.0, theta_bias=0.5, gamma_bias=1.0, init_std=0.3)


@nnx.jit
def fwd(layer, x):
    return layer(x)[0]


def make(cls=AtlasConfig, seed=0, **kw):
    cfg = cls(**{**BASE, **kw})
    return AtlasMemory(cfg, rngs=nnx.Rngs(params=seed))


def xs(seed=0, length=T):
    return jax.random.normal(jax.random.key(seed), (B, length, D))


@nnx.jit
def memory_io(layer, x):
    """q, k (features), v, gates and the memory read y [B, T, H, d] of one fresh call."""
    Bx, Tx, _ = x.shape
    st = layer.init_state(Bx)
    real = jnp.ones((Bx, Tx), bool)
    starts = jnp.zeros((Bx, Tx), bool)
    pos = jnp.broadcast_to(jnp.arange(Tx, dtype=jnp.int32), (Bx, Tx))
    q, k, v, _ = layer.qkv(x, st.conv, real, starts)
    g = layer.gates(x)
    y, _ = layer.memory(q, k, v, g, st.mem, pos, starts, real, has_resets=False)
    return q, k, v, g, y


def ns_np(X, steps=5):
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = X.shape[0] > X.shape[1]
    x = X.T if tall else X
    x = x / np.sqrt(np.sum(x * x) + 1e-14)
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if tall else x


def omega_loop(q, k, v, g, W0, *, b, c, momentum, ns_steps):
    """atlas.md §2.4–2.6 for a linear memory (row layout y = φ(q) W), gradient anchor of
    titans.md §2.7 with chunk b, window c, float64 numpy, one (row, head):
      U_t = Σ_{j<c, t−j≥0} γ^{(t)}[j] φ(k_{t−j})ᵀ(φ(k_{t−j}) W_anchor − v_{t−j})
      Atlas:    S_t = θ_t S_{t−1} + U_t,  W_t = α_t W_{t−1} − η_t NS_k(S_t)
      OmegaNet: W_t = α_t W_{t−1} − η_t U_t;   y_t = φ(q_t) W_t."""
    alpha, eta = np.exp(g["log_ret"]), g["lr"]
    theta = np.exp(g["log_mom"]) if momentum else None
    Tn = q.shape[0]
    gam = g["gamma"] if g["gamma"] is not None else np.ones((Tn, c))
    W, S, anc = W0.copy(), np.zeros_like(W0), W0.copy()
    ys = []
    for t in range(Tn):
        U = sum(gam[t, j] * np.outer(k[t - j], k[t - j] @ anc - v[t - j])
                for j in range(c) if t - j >= 0)
        if momentum:
            S = theta[t] * S + U
            W = alpha[t] * W - eta[t] * (ns_np(S, ns_steps) if ns_steps else S)
        else:
            W = alpha[t] * W - eta[t] * U
        ys.append(q[t] @ W)
        if (t + 1) % b == 0:
            anc = W.copy()
    return np.stack(ys)


def check_against_loop(layer, cfg, x, rtol):
    q, k, v, g, y = memory_io(layer, x)
    W0 = np.asarray(layer.W0["w"][...], np.float64)
    for bb in range(B):
        for h in range(H):
            gh = {name: (None if val is None else np.asarray(val[bb, :, h], np.float64))
                  for name, val in g.items() if name != "extra"}
            if g["extra"] is not None:   # keep gates: γ_i^{(t)} = g_i
                keep = np.asarray(g["extra"]["keep"][bb, :, h, 0], np.float64)
                gh["gamma"] = np.stack([[keep[t - j] if t - j >= 0 else 0.0
                                         for j in range(cfg.window)] for t in range(x.shape[1])])
            ref = omega_loop(*(np.asarray(a[bb, :, h], np.float64) for a in (q, k, v)), gh,
                             W0[h], b=cfg.chunk, c=cfg.window, momentum=cfg.momentum,
                             ns_steps=cfg.ns_steps)
            np.testing.assert_allclose(np.asarray(y[bb, :, h]), ref, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("b,c,impl", [(1, 1, "reference"), (3, 5, "chunked"),
                                      (4, 2, "chunked")])
def test_atlas_linear_memory_equals_token_loop(b, c, impl):
    """Atlas (Omega + momentum + NS-5, polynomial features, linear memory) at chunk b and window
    c, T = 11 (not a multiple of b, c > b included) == the float64 token loop of §2.4–2.6; b = 1
    is the exact online model."""
    cfg = AtlasConfig(**{**BASE, "chunk": b, "window": c, "impl": impl})
    check_against_loop(make(chunk=b, window=c, impl=impl), cfg, xs(1), rtol=1e-4)


@pytest.mark.parametrize("gates", ["window", "keep"])
def test_omeganet_linear_memory_equals_token_loop(gates):
    """OmegaNet (Omega + GD + polynomial features), b = 2, c = 3, both gate forms (§8.1)."""
    cfg = OmegaNetConfig(**{**BASE, "chunk": 2, "window": 3, "window_gates": gates,
                            "impl": "chunked"})
    layer = AtlasMemory(cfg, rngs=nnx.Rngs(params=0))
    check_against_loop(layer, cfg, xs(2), rtol=2e-5)


def test_omeganet_c1_identity_linear_is_titans_without_momentum():
    """OmegaNet c = 1, γ ≡ 1, φ = id, linear memory == the Titans no-momentum recurrence
    M_t = (1−α^T_t) M_{t−1} − θ_t (M_{t−1}k_t − v_t)k_tᵀ with 1 − α^T = α (atlas.md §7.4):
    the shared layer configured as Titans, with the retention logit negated, gives the same
    mixer output."""
    om = make(OmegaNetConfig, chunk=1, window=1, feature="identity")
    ti = NeuralMemory(NeuralMemoryConfig(dim=D, n_heads=H, memory="linear", momentum=False,
                                         chunk=1, window=1, lr_max=0.5, memory_init_std=0.3),
                      rngs=nnx.Rngs(params=1))
    _copy_shared(om, ti)
    ti.w_alpha.weight[...] = -om.w_alpha.weight[...]     # α^T = sigmoid(−z): 1 − α^T = α
    ti.w_alpha.bias[...] = -om.w_alpha.bias[...]
    x = xs(3)
    np.testing.assert_allclose(fwd(om, x), fwd(ti, x), rtol=2e-5, atol=2e-6)


def _copy_shared(src, dst):
    for name in ("wq", "wk", "wv", "wg", "wo", "w_alpha", "w_theta", "conv"):
        a, b_ = getattr(src, name), getattr(dst, name)
        b_.weight[...] = a.weight[...]
        if getattr(a, "bias", None) is not None:
            b_.bias[...] = a.bias[...]
    if src.w_eta is not None and dst.w_eta is not None:
        dst.w_eta.weight[...] = src.w_eta.weight[...]
        dst.w_eta.bias[...] = src.w_eta.bias[...]
    dst.out_norm[...] = src.out_norm[...]
    for k_ in src.W0:
        dst.W0[k_][...] = src.W0[k_][...]


def test_atlas_without_ns_c1_constant_rate_is_titans_lmm():
    """Atlas with NS = identity, c = 1, constant η == Titans LMM (Titans θ = η, Titans momentum
    η = θ, Titans 1−α = α; atlas.md §2.6); with a time-varying rate the two differ (Titans scales
    the gradient before the momentum, Atlas after) — the test bites."""
    at = make(chunk=2, window=1, feature="identity", ns_steps=0)
    at.w_theta.weight[...] = jnp.zeros_like(at.w_theta.weight[...])    # constant η
    ti = NeuralMemory(NeuralMemoryConfig(dim=D, n_heads=H, memory="linear", momentum=True,
                                         chunk=2, window=1, lr_max=0.5, memory_init_std=0.3),
                      rngs=nnx.Rngs(params=1))
    _copy_shared(at, ti)
    ti.w_alpha.weight[...] = -at.w_alpha.weight[...]
    ti.w_alpha.bias[...] = -at.w_alpha.bias[...]
    x = xs(4)
    np.testing.assert_allclose(fwd(at, x), fwd(ti, x), rtol=2e-5, atol=2e-6)
    at2 = make(chunk=2, window=1, feature="identity", ns_steps=0)
    ti.w_theta.weight[...] = at2.w_theta.weight[...]
    _copy_shared(at2, ti)
    ti.w_alpha.weight[...] = -at2.w_alpha.weight[...]
    ti.w_alpha.bias[...] = -at2.w_alpha.bias[...]
    assert not np.allclose(fwd(at2, x), fwd(ti, x), rtol=1e-3, atol=1e-4)


def test_atlas_theta0_without_ns_is_omeganet_and_gamma_offset0_is_c1():
    """Atlas with θ ≡ 0 and NS = identity == OmegaNet (§7.4); gates γ = (1, 0, …, 0) reduce the
    window c = 3 to c = 1 (§7.7)."""
    at = make(chunk=3, window=3, ns_steps=0)
    at.w_eta.weight[...] = jnp.zeros_like(at.w_eta.weight[...])
    at.w_eta.bias[...] = jnp.full_like(at.w_eta.bias[...], -1e4)        # θ = sigmoid(−1e4) = 0
    om = make(OmegaNetConfig, chunk=3, window=3)
    _copy_shared(at, om)
    om.w_gamma.weight[...] = at.w_gamma.weight[...]
    om.w_gamma.bias[...] = at.w_gamma.bias[...]
    om.poly_rho[...] = at.poly_rho[...]
    x = xs(5)
    np.testing.assert_allclose(fwd(at, x), fwd(om, x), rtol=2e-5, atol=2e-6)
    # γ = (1, 0, 0): window 3 == window 1
    w3 = make(OmegaNetConfig, chunk=3, window=3)
    w3.w_gamma.weight[...] = jnp.zeros_like(w3.w_gamma.weight[...])
    w3.w_gamma.bias[...] = jnp.tile(jnp.asarray([1e4, -1e4, -1e4]), H)
    w1 = make(OmegaNetConfig, chunk=3, window=1)
    _copy_shared(w3, w1)
    w1.poly_rho[...] = w3.poly_rho[...]
    np.testing.assert_allclose(fwd(w3, x), fwd(w1, x), rtol=2e-5, atol=2e-6)


def _loss_and_grads(layer, x, r):
    g, st = nnx.split(layer)

    @jax.jit
    def f(st):
        return jnp.sum(nnx.merge(g, st)(x)[0] * r)
    return f(st), jax.grad(f)(st)


def test_atlas_mlp_chunked_equals_reference_with_window_longer_than_chunk():
    """Atlas with the default MLP memory (residual + LayerNorm, polynomial features): chunked ==
    reference token loop at (b, c) = (3, 5) (the window reaches c − 1 = 4 tokens back, past the
    previous chunk), T = 11. Forward here; outer gradients of chunked vs reference for the MLP
    memory are the conformance suite's check (tiny Atlas config, b = 3, c = 4, T = 13)."""
    kw = dict(memory="mlp", memory_init_std=None, chunk=3, window=5, lr_max=0.3)
    x = xs(6)
    np.testing.assert_allclose(fwd(make(impl="reference", **kw), x),
                               fwd(make(impl="chunked", **kw), x), rtol=1e-4, atol=1e-5)


def test_atlas_chunked_loop_runs_over_chunks_not_tokens():
    """The chunk-parallel form's sequential loop is a scan over O(T/b) chunks: its length is the
    layout's ceil((T + b − 1)/b) ≤ ceil(T/b) + 1 (one spare chunk holds a call that starts
    mid-chunk), never T."""
    layer = make(chunk=4, window=3, impl="chunked", memory="mlp", memory_init_std=None)
    x = xs(8, length=30)
    jaxpr = jax.make_jaxpr(lambda x_: layer(x_)[0])(x)
    lengths = []

    def walk(jp):
        for eq in jp.eqns:
            if eq.primitive.name == "scan":
                lengths.append(eq.params["length"])
            for p in eq.params.values():
                for sub in (p if isinstance(p, (list, tuple)) else [p]):
                    if hasattr(sub, "jaxpr"):
                        walk(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
    walk(jaxpr.jaxpr)
    assert lengths, "no scan found"
    assert 30 not in lengths, lengths
    assert max(lengths) <= math.ceil(30 / 4) + 1, lengths


def test_atlas_finite_gradients_with_an_inert_window():
    """γ ≡ 0 makes every window inert, S = 0 at every step: Newton–Schulz at 0 and the outer
    gradient stay finite (Frobenius normalisation with ε inside the rsqrt)."""
    layer = make(chunk=2, window=2)
    layer.w_gamma.weight[...] = jnp.zeros_like(layer.w_gamma.weight[...])
    layer.w_gamma.bias[...] = jnp.full_like(layer.w_gamma.bias[...], -1e4)
    _, grads = _loss_and_grads(layer, xs(9), jnp.ones((B, T, D)))
    for path, gr in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(np.asarray(gr))), jax.tree_util.keystr(path)

