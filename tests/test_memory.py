"""The neural-memory op and layer (titans.md §2.7, §4, §7; atlas.md §4 window).

* both forms against an independent per-token implementation of the anchored rule written with
  `jax.grad` of the inner loss (float64): chunk sizes 1, 3, 4, windows 1 and 3, the learning
  rate inside (Titans) and outside (ATLAS) the momentum, linear and deep (MLP) memories;
* chunked == reference (forward, state, gradients) at the same chunk size, for both chunk bodies
  (the dual form of titans.md §2.8 for layered memories, and materialised per-token states);
* with chunk 1 both equal the plain token rule (gradient at W_{t-1});
* a call may stop anywhere (mid-chunk) and continue; right padding; document resets (chunk grid
  restarts) including the fallback when a row has more document starts than the static bound;
* zero learning rate: y_t = M_{A_t W0}(q_t).
"""
import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from asserts import assert_close
from flax import nnx

from layers.memory import NeuralMemory, NeuralMemoryConfig, l2_signal
from layers.memory_nets import _MLPMemory, linear_memory
from pallas_kernels.neural_memory import MemoryRule, chunked, init_state
from pallas_kernels.neural_memory import neural_memory as _nm
from pallas_kernels.neural_memory.reference import layered_of

neural_memory = jax.jit(_nm, static_argnums=(0,), static_argnames=("impl", "max_resets"))
B, T, H, D = 2, 11, 2, 4


def _setup(memory, dtype=jnp.float64, seed=0, window=1):
    ks = jax.random.split(jax.random.key(seed), 12)
    n = lambda x: x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-6)
    inp = dict(
        q=n(jax.random.normal(ks[0], (B, T, H, D), dtype)),
        k=n(jax.random.normal(ks[1], (B, T, H, D), dtype)),
        v=jax.random.normal(ks[2], (B, T, H, D), dtype),
        log_ret=jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H), dtype) + 2.0),
        lr=0.6 * jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H), dtype)),
        log_mom=jax.nn.log_sigmoid(jax.random.normal(ks[5], (B, T, H), dtype)),
        gamma=jax.nn.sigmoid(jax.random.normal(ks[6], (B, T, H, window), dtype)))
    if memory == "linear":
        W0 = {"w": 0.3 * jax.random.normal(ks[7], (H, D, D), dtype)}
        outer, fn = {}, linear_memory
    else:
        W0 = {"w1": 0.5 * jax.random.normal(ks[7], (H, D, 2 * D), dtype),
              "w2": 0.5 * jax.random.normal(ks[8], (H, 2 * D, D), dtype)}
        outer = {"ln_w": 1.0 + 0.1 * jax.random.normal(ks[9], (H, D), dtype),
                 "ln_b": 0.1 * jax.random.normal(ks[10], (H, D), dtype)}
        fn = _MLPMemory(True, 1e-5)
    return inp, W0, outer, fn


def _flags(pos=None, reset=None, real=None):
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)) if pos is None else pos
    reset = jnp.zeros((B, T), bool) if reset is None else reset
    real = jnp.ones((B, T), bool) if real is None else real
    return dict(pos=pos, reset=reset, real=real)


def _run(rule, outer, W0, state, inp, impl, **flags):
    return neural_memory(rule, outer, W0, state, inp["q"], inp["k"], inp["v"],
                         log_ret=inp["log_ret"], lr=inp["lr"], log_mom=inp.get("log_mom"),
                         gamma=inp.get("gamma"), impl=impl, **{**_flags(), **flags})


def _run_form(rule, outer, W0, state, inp, form, **flags):
    """The chunked form with a chosen chunk body ("dual" or "materialised")."""
    return chunked.neural_memory(rule, outer, W0, state, inp["q"], inp["k"], inp["v"],
                                 log_ret=inp["log_ret"], lr=inp["lr"], log_mom=inp.get("log_mom"),
                                 gamma=inp.get("gamma"), form=form, **{**_flags(), **flags})


def _spec_loop(fn, outer, W0, inp, b, c, lr_inside):
    """The anchored rule written out per token with jax.grad (titans.md §2.7, atlas.md §2.4,
    §2.6): independent of the op's code."""

    @jax.jit
    def step(o, W, S, anchor, ks, vs, gam, lmom, lret, lr, q):
        U = jax.tree.map(jnp.zeros_like, W)
        for j in range(ks.shape[0]):  # source t - j (absent sources carry gamma 0)
            gr = jax.grad(lambda w: 0.5 * jnp.sum((fn(o, w, ks[j]) - vs[j]) ** 2))(anchor)
            U = jax.tree.map(lambda a, g: a + gam[j] * g, U, gr)
        mom, ret = jnp.exp(lmom), jnp.exp(lret)
        if lr_inside:
            S = jax.tree.map(lambda s, u: mom * s - lr * u, S, U)
            W = jax.tree.map(lambda w, s: ret * w + s, W, S)
        else:
            S = jax.tree.map(lambda s, u: mom * s + u, S, U)
            W = jax.tree.map(lambda w, s: ret * w - lr * s, W, S)
        return W, S, fn(o, W, q)

    y = np.zeros(inp["v"].shape)
    for bi in range(B):
        for h in range(H):
            o = jax.tree.map(lambda a: a[h], outer)
            W = jax.tree.map(lambda a: a[h], W0)
            S = jax.tree.map(jnp.zeros_like, W)
            anchor = W
            for t in range(T):
                if t % b == 0:
                    anchor = W
                src = [max(t - j, 0) for j in range(c)]
                gam = jnp.where(jnp.arange(c) <= t, inp["gamma"][bi, t, h], 0.0)
                W, S, yt = step(o, W, S, anchor, inp["k"][bi, src, h], inp["v"][bi, src, h],
                                gam, inp["log_mom"][bi, t, h], inp["log_ret"][bi, t, h],
                                inp["lr"][bi, t, h], inp["q"][bi, t, h])
                y[bi, t, h] = np.asarray(yt)
    return y


@pytest.mark.parametrize("memory,b,c,inside", [("linear", 1, 1, True), ("linear", 4, 3, False),
                                               ("mlp", 4, 1, True), ("mlp", 3, 3, False)])
def test_forms_equal_the_anchored_rule(memory, b, c, inside):
    with jax.enable_x64():
        inp, W0, outer, fn = _setup(memory, window=c)
        rule = MemoryRule(fn, l2_signal, chunk=b, window=c, lr_inside=inside)
        st = init_state(W0, B, D, D, c)
        want = _spec_loop(fn, outer, W0, inp, b, c, inside)
        y_r, s_r = _run(rule, outer, W0, st, inp, "reference")
        y_c, s_c = jax.jit(lambda o, w, s, i: _run(rule, o, w, s, i, "chunked"))(outer, W0, st, inp)
        y_m, s_m = _run_form(rule, outer, W0, st, inp, "materialised")
        assert layered_of(rule) is not None  # "chunked" took the dual body
        np.testing.assert_allclose(y_r, want, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(y_c, want, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(y_m, want, rtol=1e-10, atol=1e-10)
        assert_close(s_c, s_r, rtol=1e-10, atol=1e-10, what="chunked state")
        assert_close(s_m, s_r, rtol=1e-10, atol=1e-10, what="materialised state")


def test_chunk_one_is_the_plain_token_rule():
    """b = 1, deep memory, momentum: gradient at W_{t-1} (titans.md §2.5), no anchor."""
    with jax.enable_x64():
        inp, W0, outer, fn = _setup("mlp", seed=1)
        del inp["gamma"]  # no window gates: the plain rule
        rule = MemoryRule(fn, l2_signal, chunk=1)
        y_c, _ = _run(rule, outer, W0, init_state(W0, B, D, D), inp, "chunked")

        @jax.jit
        def step(o, W, S, kk, vv, eta, theta, lret, q):
            u = jax.grad(lambda w: 0.5 * jnp.sum((fn(o, w, kk) - vv) ** 2))(W)
            S = jax.tree.map(lambda s, g: eta * s - theta * g, S, u)
            W = jax.tree.map(lambda w, s: jnp.exp(lret) * w + s, W, S)
            return W, S, fn(o, W, q)

        for bi, h in ((0, 0), (1, 1)):
            o = jax.tree.map(lambda a: a[h], outer)
            W = jax.tree.map(lambda a: a[h], W0)
            S = jax.tree.map(jnp.zeros_like, W)
            for t in range(T):
                W, S, yt = step(o, W, S, inp["k"][bi, t, h], inp["v"][bi, t, h],
                                jnp.exp(inp["log_mom"][bi, t, h]), inp["lr"][bi, t, h],
                                inp["log_ret"][bi, t, h], inp["q"][bi, t, h])
                np.testing.assert_allclose(y_c[bi, t, h], yt, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("form", ["dual", "materialised"])
def test_chunked_gradients_equal_reference(form):
    """Gradients w.r.t. the outer parameters, W0 and every per-token input (q, k, v, gates),
    T = 11 with chunk 4 (not a multiple), window 2, momentum."""
    with jax.enable_x64():
        inp, W0, outer, fn = _setup("mlp", seed=2, window=2)
        rule = MemoryRule(fn, l2_signal, chunk=4, window=2)
        wy = jax.random.normal(jax.random.key(7), (B, T, H, D), jnp.float64)

        def loss(impl, outer, W0, inp):
            st = init_state(W0, B, D, D, 2)
            y, st = (_run(rule, outer, W0, st, inp, impl) if impl == "reference" else
                     _run_form(rule, outer, W0, st, inp, impl))
            return (jnp.sum(y * wy) + sum(jnp.sum(jnp.sin(a)) for a in jax.tree.leaves(st.W))
                    + sum(jnp.sum(jnp.cos(a)) for a in jax.tree.leaves(st.S)))

        g_r = jax.jit(jax.grad(lambda *a: loss("reference", *a), argnums=(0, 1, 2)))(outer, W0, inp)
        g_c = jax.jit(jax.grad(lambda *a: loss(form, *a), argnums=(0, 1, 2)))(outer, W0, inp)
        assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(g_c))
        assert_close(g_c, g_r, rtol=1e-9, atol=1e-9, what="gradients")


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_split_anywhere_padding_and_resets(impl):
    """One call == prefill (right padded, cut mid-chunk) + continuation; a packed row with a
    document start == the two documents run separately (fresh state, chunk grid restarted)."""
    with jax.enable_x64():
        inp, W0, outer, fn = _setup("linear", seed=3, window=2)
        rule = MemoryRule(fn, l2_signal, chunk=4, window=2)
        st0 = init_state(W0, B, D, D, 2)
        y, s = _run(rule, outer, W0, st0, inp, impl)
        cuts = np.array([5, 3])  # mid-chunk for b = 4
        t = np.arange(T)[None]
        y1, s1 = _run(rule, outer, W0, st0, inp, impl, real=jnp.asarray(t < cuts[:, None]))
        shift = lambda a: jnp.take_along_axis(
            a, jnp.asarray(np.minimum(t + cuts[:, None], T - 1)).reshape((B, T) + (1,) * (a.ndim - 2)), 1)
        inp2 = jax.tree.map(shift, inp)
        pos2 = jnp.asarray(t + cuts[:, None], jnp.int32)
        y2, s2 = _run(rule, outer, W0, s1, inp2, impl, pos=pos2,
                      real=jnp.asarray(t < (T - cuts)[:, None]))
        for r, c in enumerate(cuts):
            np.testing.assert_allclose(y1[r, :c], y[r, :c], rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(y1[r, c:], 0.0)
            np.testing.assert_allclose(y2[r, :T - c], y[r, c:], rtol=1e-10, atol=1e-10)
        assert_close(s2, s, rtol=1e-10, atol=1e-10, what="state after the split")
        # packed documents [0, a) | [a, T)
        a = 6
        reset = jnp.asarray(np.broadcast_to(t == a, (B, T)))
        pos = jnp.asarray(np.broadcast_to(np.where(t < a, t, t - a), (B, T)), jnp.int32)
        for max_resets in (1, 0):  # 0: more starts than the bound -> exact fallback
            kw = dict(pos=pos, reset=reset)
            y_p, s_p = neural_memory(rule, outer, W0, st0, inp["q"], inp["k"], inp["v"],
                                     log_ret=inp["log_ret"], lr=inp["lr"],
                                     log_mom=inp["log_mom"], gamma=inp["gamma"], impl=impl,
                                     max_resets=max_resets, real=jnp.ones((B, T), bool), **kw)
            tail = jax.tree.map(lambda x: x[:, a:], inp)
            y_b = neural_memory(rule, outer, W0, st0, tail["q"], tail["k"], tail["v"],
                                log_ret=tail["log_ret"], lr=tail["lr"], log_mom=tail["log_mom"],
                                gamma=tail["gamma"], impl=impl, pos=pos[:, a:],
                                reset=reset[:, a:] & False, real=jnp.ones((B, T - a), bool))[0]
            np.testing.assert_allclose(y_p[:, :a], y[:, :a], rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(y_p[:, a:], y_b, rtol=1e-10, atol=1e-10)


def test_zero_learning_rate_scales_the_initial_memory():
    """θ ≡ 0, S0 = 0: y_t = M_{A_t W0}(q_t), A_t = prod_{j<=t}(1 - α_j) (titans.md §7.8)."""
    with jax.enable_x64():
        inp, W0, outer, fn = _setup("mlp", seed=4)
        inp["lr"] = jnp.zeros_like(inp["lr"])
        rule = MemoryRule(fn, l2_signal, chunk=4)
        y, _ = _run(rule, outer, W0, init_state(W0, B, D, D), inp, "chunked")
        A = jnp.exp(jnp.cumsum(inp["log_ret"], axis=1))
        for bi, h, t in ((0, 0, 0), (1, 1, 6), (0, 1, T - 1)):
            Wt = jax.tree.map(lambda w: A[bi, t, h] * w[h], W0)
            o = jax.tree.map(lambda a: a[h], outer)
            np.testing.assert_allclose(y[bi, t, h], fn(o, Wt, inp["q"][bi, t, h]), rtol=1e-12,
                                       atol=1e-12)


def test_layer_forms_agree_with_resets_and_padding():
    """NeuralMemory: chunked == reference with packed documents and right padding."""
    cfg = NeuralMemoryConfig(dim=16, n_heads=2, memory="mlp", chunk=4, init_std=0.2,
                             impl="chunked")
    layer = NeuralMemory(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 13, 16))
    seg = jnp.asarray([[0] * 5 + [1] * 8, [0] * 9 + [1] * 4])
    mask = jnp.asarray(np.arange(13)[None] < np.array([[13], [11]]))
    y_c, s_c, _ = layer(x, mask=mask, segment_ids=seg)
    layer.cfg = dataclasses.replace(cfg, impl="reference")
    y_r, s_r, _ = layer(x, mask=mask, segment_ids=seg)
    np.testing.assert_allclose(y_c, y_r, rtol=1e-5, atol=1e-6)
    assert_close(s_c, s_r, rtol=1e-5, atol=1e-6, what="state")
    assert float(jnp.max(jnp.abs(y_c))) > 1e-3


def test_chunked_loop_runs_over_chunks_not_tokens():
    """The only sequential loop of the chunked form is a scan over ceil((T + b - 1) / b) chunks
    (deep memory, b = 4, T = 11: 4 steps), never over the T tokens."""
    inp, W0, outer, fn = _setup("mlp", dtype=jnp.float32)
    rule = MemoryRule(fn, l2_signal, chunk=4)
    jaxpr = jax.make_jaxpr(lambda o, w, i: _nm(rule, o, w, init_state(W0, B, D, D), i["q"],
                                                 i["k"], i["v"], log_ret=i["log_ret"],
                                                 lr=i["lr"], impl="chunked", **_flags()))(
        outer, W0, inp)
    lengths = []

    def walk(jp):
        for eqn in jp.eqns:
            if eqn.primitive.name == "scan":
                lengths.append(eqn.params["length"])
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    assert lengths == [4]


def test_config_validates_impl_naming_the_key():
    """NeuralMemoryConfig.impl is the op's implementation, checked before anything compiles."""
    NeuralMemoryConfig(dim=8, n_heads=2, impl="chunked").validate()
    with pytest.raises(ValueError, match=r"^impl='cuda' is not one of"):
        NeuralMemoryConfig(dim=8, n_heads=2, impl="cuda").validate()
    # the kernels cover the matrix memory (l2, window 1) only: the MLP memory is one line
    with pytest.raises(ValueError, match=r"^impl='pallas': the neural_memory kernel cannot run "
                                         r"this memory: its memory is not the matrix memory"):
        NeuralMemoryConfig(dim=8, n_heads=2, impl="pallas").validate()
    NeuralMemoryConfig(dim=8, n_heads=2, memory="linear", impl="pallas_interpret").validate()


MEMORY_MODELS = ("titans_lmm", "titans_mac", "titans_mag", "titans_mal", "atlas", "omeganet",
                 "atlas_pp", "dla", "swla", "atlas_mag", "atlas_mal", "moneta", "yaad", "memora")


@pytest.mark.parametrize("name", MEMORY_MODELS)
def test_memory_qkv_from_raw_parameters(name):
    """The memory's q, k, v written out from its raw parameters, not through the layer: the
    three projections, the causal depthwise conv of kernel K (w[:, K-1] on the current token, no
    bias), SiLU, the split into heads, and the ℓ2 normalisation of q and k per head (then the
    family's feature map). Every exact memory test takes q and k from the layer under test, so
    without this one dropping the keys' normalisation passed them all."""
    import zoo
    cfg = zoo.get(name).conformance.config
    model = zoo.build(name, cfg, nnx.Rngs(params=0))
    mems = [m for _, m in nnx.iter_graph(model) if isinstance(m, NeuralMemory)]
    assert mems, name
    for mem in mems:
        c = mem.cfg
        B, T, H, d = 2, 7, c.n_heads, c.hd
        x = np.asarray(jax.random.normal(jax.random.key(5), (B, T, c.dim)), np.float64)
        u = np.concatenate([x @ np.asarray(w.weight[...], np.float64)
                            for w in (mem.wq, mem.wk, mem.wv)], axis=-1)
        w = np.asarray(mem.conv.weight[...], np.float64)                     # [C, K]
        K = w.shape[1]
        pad = np.concatenate([np.zeros((B, K - 1, u.shape[-1])), u], axis=1)
        conv = sum(pad[:, j:j + T] * w[:, j] for j in range(K))
        act = conv / (1.0 + np.exp(-conv))
        q, k, v = (a.reshape(B, T, H, d) for a in np.split(act, 3, axis=-1))
        eps = c.norm_eps
        unit = lambda a: a / np.sqrt(np.sum(a * a, -1, keepdims=True) + eps)  # noqa: E731
        want_q, want_k = mem.features(jnp.asarray(unit(q), jnp.float32),
                                      jnp.asarray(unit(k), jnp.float32))
        real = jnp.ones((B, T), bool)
        got_q, got_k, got_v, _ = mem.qkv(jnp.asarray(x, jnp.float32),
                                         mem.conv.init_state(B), real, None)
        for got, want in ((got_q, want_q), (got_k, want_k), (got_v, v)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-5)
