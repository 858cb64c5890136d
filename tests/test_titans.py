"""Titans reductions in the exact form of titans.md §2.9 / §7.6 (linear memory, no residual or
LayerNorm, ½-loss, chunk b = 1, no momentum), checked against the shared ops:

* gated delta rule ONLY after the reparametrisation g = log(1 − α), β = θ / (1 − α),
  v' = (1 − α) v, scale 1 — and the naive map (β = θ, v unchanged) differs;
* α ≡ 0: DeltaNet with β = θ;
* dot-product objective: linear attention with decay
  y_t = A_t q_t W0 + Σ_{i≤t} (A_t / A_i) θ_i (q_t · k_i) v_i.

Also: the hosts of layers/titans.py take any memory (titans.md §3.4, §3.5: here an OmegaNet-style
Omega-window memory), and TitansConfig validates its one `impl` and `block`. The model-level
equalities of every Titans entry are the conformance suite's checks.
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.memory import NeuralMemory, NeuralMemoryConfig, dot_signal, l2_signal
from layers.memory_nets import linear_memory
from layers.titans import MACMixer
from pallas_kernels.gated_delta import gated_delta as _gd
from pallas_kernels.neural_memory import MemoryRule, init_state
from pallas_kernels.neural_memory import neural_memory as _nm

neural_memory = jax.jit(_nm, static_argnums=(0,), static_argnames=("impl", "max_resets"))
gated_delta = jax.jit(_gd, static_argnames=("scale", "impl", "block"))

B, T, H, D = 2, 12, 2, 5


def _inputs(seed):
    ks = jax.random.split(jax.random.key(seed), 6)
    n = lambda x: x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-6)
    q = n(jax.random.normal(ks[0], (B, T, H, D), jnp.float64))
    k = n(jax.random.normal(ks[1], (B, T, H, D), jnp.float64))
    v = jax.random.normal(ks[2], (B, T, H, D), jnp.float64)
    alpha = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H), jnp.float64) - 1.0)
    theta = 0.9 * jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H), jnp.float64))
    W0 = {"w": 0.5 * jax.random.normal(ks[5], (H, D, D), jnp.float64)}
    return q, k, v, alpha, theta, W0


def _titans(q, k, v, alpha, theta, W0, signal, impl):
    rule = MemoryRule(linear_memory, signal, chunk=1)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    y, st = neural_memory(rule, {}, W0, init_state(W0, B, D, D), q, k, v,
                          log_ret=jnp.log1p(-alpha), lr=theta, log_mom=None, pos=pos,
                          reset=jnp.zeros((B, T), bool), real=jnp.ones((B, T), bool), impl=impl)
    return y, st.W["w"]


def test_l2_linear_memory_is_gated_delta_after_reparametrisation():
    with jax.enable_x64():
        q, k, v, alpha, theta, W0 = _inputs(0)
        S0 = jnp.broadcast_to(W0["w"], (B, H, D, D))
        for impl in ("reference", "chunked"):
            y, W = _titans(q, k, v, alpha, theta, W0, l2_signal, impl)
            o, S = gated_delta(q, k, (1 - alpha)[..., None] * v, jnp.log1p(-alpha),
                               theta / (1 - alpha), scale=1.0, initial_state=S0, impl="chunked",
                               block=4)
            np.testing.assert_allclose(y, o, rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(W, S, rtol=1e-10, atol=1e-10)
            # the naive map a = 1 - α, β = θ, v unchanged is a different model
            o_naive, _ = gated_delta(q, k, v, jnp.log1p(-alpha), theta, scale=1.0,
                                     initial_state=S0, impl="reference")
            assert float(jnp.max(jnp.abs(y - o_naive))) > 1e-2


def test_no_forgetting_is_deltanet():
    with jax.enable_x64():
        q, k, v, alpha, theta, W0 = _inputs(1)
        alpha = jnp.zeros_like(alpha)
        S0 = jnp.broadcast_to(W0["w"], (B, H, D, D))
        y, _ = _titans(q, k, v, alpha, theta, W0, l2_signal, "chunked")
        o, _ = gated_delta(q, k, v, jnp.zeros_like(theta), theta, scale=1.0, initial_state=S0,
                           impl="reference")
        np.testing.assert_allclose(y, o, rtol=1e-10, atol=1e-10)


def test_dot_objective_is_linear_attention_with_decay():
    with jax.enable_x64():
        q, k, v, alpha, theta, W0 = _inputs(2)
        logA = jnp.cumsum(jnp.log1p(-alpha), axis=1)  # [B, T, H]
        t, i = np.arange(T)[:, None], np.arange(T)[None, :]
        decay = jnp.where(t >= i, jnp.exp(jnp.moveaxis(logA, 1, 2)[..., :, None]
                                          - jnp.moveaxis(logA, 1, 2)[..., None, :]), 0.0)
        scores = jnp.einsum("bthd,bihd->bhti", q, k) * decay * jnp.moveaxis(theta, 1, 2)[..., None, :]
        want = (jnp.einsum("bhti,bihd->bthd", scores, v)
                + jnp.exp(logA)[..., None] * jnp.einsum("bthd,hde->bthe", q, W0["w"]))
        for impl in ("reference", "chunked"):
            y, _ = _titans(q, k, v, alpha, theta, W0, dot_signal, impl)
            np.testing.assert_allclose(y, want, rtol=1e-10, atol=1e-10)


def test_mac_host_takes_another_memory_and_continues_exactly():
    """MAC (the host that uses most of its memory: q path, rule, outer parameters, conv) around
    another memory (Omega window c = 2, plain GD, learning rate outside: OmegaNet's rule): full
    forward == prefill(x[:5]) + continue(x[5:]) (5 is mid-segment and mid-chunk). MAG / MAL use
    their memory through the mixer contract alone."""
    dim = 16
    mcfg = NeuralMemoryConfig(dim=dim, n_heads=2, memory="linear", chunk=2, window=2,
                              momentum=False, lr_inside=False, lr_max=0.5, init_std=0.1)
    mixer = MACMixer(lambda rngs: NeuralMemory(mcfg, rngs=rngs), dim=dim, n_heads=2, segment=4,
                     n_persistent=2, init_std=0.1, rngs=nnx.Rngs(params=0))
    x = jax.random.normal(jax.random.key(3), (2, 9, dim))

    @nnx.jit
    def full_and_split(m, x):
        y, _, _ = m(x)
        y1, st, _ = m(x[:, :5])
        y2, _, _ = m(x[:, 5:], st)
        return y, jnp.concatenate([y1, y2], axis=1)

    y, y_split = full_and_split(mixer, x)
    np.testing.assert_allclose(y_split, y, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- persistent memory, MAL

def _titans_model(name, **kw):
    import dataclasses

    import zoo
    cfg = dataclasses.replace(zoo.get(name).conformance.config, **kw)
    return cfg, zoo.build(name, cfg, nnx.Rngs(params=0))


def _mixers(model):
    return [blk.mixer for blk in model.blocks]


@nnx.jit
def _call(mod, x, state=None, segment_ids=None):
    """A mixer's (or memory's) call, compiled once per shape (eager calls of the scanned memory
    cost 40-55 s of CI per test)."""
    return mod(x, state, segment_ids=segment_ids)


def test_lmm_is_the_memory_on_persistent_tokens_and_zero_is_the_ablation():
    """titans_lmm is Table 5's base row: every block's memory reads [P; x] (titans.md §3.3), i.e.
    its outputs on x are the bare memory's outputs on the concatenation at the x positions (the
    chunk grid counting from the first persistent token: N_p = 3 is not a multiple of the chunk
    4); `n_persistent=0` is the "w/o persistent memory" row, the bare memory, N_p x D fewer
    parameters per layer."""
    import zoo
    from layers.titans import PrefixedMemory
    cfg, model = _titans_model("titans_lmm", n_persistent=3)
    mixers = _mixers(model)
    assert all(isinstance(m, PrefixedMemory) for m in mixers) and cfg.chunk == 4
    x = jax.random.normal(jax.random.key(1), (2, 9, cfg.dim))
    for m in mixers:
        P = jnp.broadcast_to(m.persistent[...], (2, 3, cfg.dim))
        want = _call(m.memory, jnp.concatenate([P, x], axis=1), m.memory.init_state(2))[0][:, 3:]
        np.testing.assert_allclose(_call(m, x)[0], want, rtol=1e-5, atol=1e-6)
    cfg0, bare = _titans_model("titans_lmm", n_persistent=0)
    assert all(isinstance(m, NeuralMemory) for m in _mixers(bare))
    count = lambda mod: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(mod, nnx.Param)))  # noqa: E731
    assert count(model) - count(bare) == cfg.n_layers * 3 * cfg.dim
    assert zoo.get("titans_lmm").param_count(cfg) == count(model)
    assert zoo.get("titans_lmm").param_count(cfg0) == count(bare)


def test_mal_literal_is_window_attention_over_the_memory_outputs():
    """mal_layout="literal" (titans.md §3.6): x~ = [P; x], y = LMM(x~), o = SWA(y), written out:
    the memory on the concatenation from its initial state, then softmax attention with RoPE on
    the x positions, the window W (W + 1 keys) and the outputs at the N_p persistent positions an
    always-visible unrotated prefix of keys. Also prefill + continue (a cut mid-chunk), a packed
    document start (the second document == a fresh call on it), and the parameter count."""
    import zoo
    from layers.rope import apply_rope
    from layers.titans import MALMixer
    cfg, model = _titans_model("titans_mal", mal_layout="literal")
    mixers = _mixers(model)
    assert len(mixers) == cfg.n_layers and all(isinstance(m, MALMixer) for m in mixers)
    count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert zoo.get("titans_mal").param_count(cfg) == count
    m = mixers[0]
    Np, W, A = cfg.n_persistent, cfg.window, cfg.n_attn_heads
    dh = cfg.dim // A
    Bx, Tx = 2, 11
    x = jax.random.normal(jax.random.key(2), (Bx, Tx, cfg.dim))
    P = jnp.broadcast_to(m.mem.persistent[...], (Bx, Np, cfg.dim))
    y = _call(m.mem.memory, jnp.concatenate([P, x], axis=1), m.mem.memory.init_state(Bx))[0]
    y_p, y_x = y[:, :Np], y[:, Np:]
    at = m.attn
    heads = lambda a: np.asarray(a, np.float64).reshape(Bx, -1, A, dh)  # noqa: E731
    pos = jnp.broadcast_to(jnp.arange(Tx), (Bx, Tx))
    q = heads(apply_rope(at.wq(y_x).reshape(Bx, Tx, A, dh), pos, base=cfg.rope_base))
    k = np.concatenate([heads(at.wk(y_p)),
                        heads(apply_rope(at.wk(y_x).reshape(Bx, Tx, A, dh), pos,
                                         base=cfg.rope_base))], axis=1)
    v = np.concatenate([heads(at.wv(y_p)), heads(at.wv(y_x))], axis=1)
    i, j = np.arange(Tx)[:, None], np.arange(Tx)[None, :]
    vis = np.concatenate([np.ones((Tx, Np), bool), (j <= i) & (i - j <= W)], axis=1)
    s = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(dh)
    s = np.where(vis[None, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    o = np.einsum("bhij,bjhd->bihd", p / p.sum(-1, keepdims=True), v).reshape(Bx, Tx, -1)
    want = np.asarray(o, np.float32) @ np.asarray(at.wo.weight[...])
    got, _, _ = _call(m, x)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    # prefill 5 (mid-chunk: chunk 4 after N_p = 3) + continue
    y1, st, _ = _call(m, x[:, :5])
    y2, _, _ = _call(m, x[:, 5:], st)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), got, rtol=1e-5, atol=1e-6)
    # a packed document start at 6: the second document is a fresh call on it
    seg = jnp.broadcast_to((jnp.arange(Tx) >= 6).astype(jnp.int32), (Bx, Tx))
    packed, _, _ = _call(m, x, None, seg)
    np.testing.assert_allclose(packed[:, 6:], _call(m, x[:, 6:])[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(packed[:, :6], got[:, :6], rtol=1e-5, atol=1e-6)
