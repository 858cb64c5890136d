"""MoM (layers/mom.py, zoo/mom.py; specs/mom.md §7): the parallel form against a float64
per-memory token loop of the recurrent form (§4.2), prefill splits, unrouted invariance,
permutation symmetry, tied memories, one memory == the base model, cost growing with k and not
with the number of memories, no per-token state, and the conformance runs' routing margins."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from asserts import assert_close
from conformance_inputs import conformance_rows
from flax import nnx
from test_flops import unrolled_loops

import zoo
from layers.common import doc_starts
from layers.mom import MoMMixer, mom_mixer
from layers.router import margins, route

B, T, D, H, DK, DV, M, K = 3, 11, 16, 2, 4, 4, 4, 2
KW = dict(kind="gated_deltanet", n_heads=H, top_k=K, shared=True, resets=True, impl="chunked",
          block=3)


@functools.lru_cache(maxsize=None)
def mixer(n_memories=M, shared=True):
    return MoMMixer(D, rngs=nnx.Rngs(params=0), kind="gated_deltanet", n_memories=n_memories,
                    top_k=min(K, n_memories), shared=shared, n_heads=H, head_dim_k=DK,
                    head_dim_v=DV, gain=1.0, router_gain=1.0, block=3)


def inputs():
    x = jax.random.normal(jax.random.key(1), (B, T, D))
    mask = jnp.arange(T)[None] < jnp.array([[T], [7], [T]])
    seg = jnp.asarray(np.where(np.arange(T) < 5, 0, 1)[None] * np.array([[0], [0], [1]]),
                      jnp.int32)
    return x, mask, seg


def silu(a):
    return a / (1.0 + np.exp(-a))


def oracle(p, x, mask, seg, state=None):
    """§4.2 token by token in float64: route, then for each selected memory (and the shared
    one) a conv step on its own caches and a gated-delta step on its own state; unselected
    memories untouched; a document start clears every memory."""
    p = {k: None if v is None else np.asarray(v, np.float64) for k, v in p.items()}
    x = np.asarray(x, np.float64)
    G = p["k_proj"].shape[0]
    conv_w = np.concatenate([p["conv_q"], p["conv_k"], p["conv_v"]], 0)      # [C, 4]
    S = np.zeros((B, G, H, DK, DV)) if state is None else np.asarray(state.memory, np.float64)
    cache = (np.zeros((B, G, 3, conv_w.shape[0])) if state is None else np.concatenate(
        [np.asarray(a, np.float64) for a in (state.conv_q, state.conv_k, state.conv_v)], -1))
    A = -np.exp(p["A_log"])
    ys = np.zeros((B, T, H * DV))
    probs = np.zeros((B, T, M))
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            if t > 0 and seg[b, t] != seg[b, t - 1]:
                S[b], cache[b] = 0.0, 0.0
            xt = x[b, t]
            lg = xt @ p["router"]
            pr = np.exp(lg - lg.max())
            pr /= pr.sum()
            probs[b, t] = pr
            sel = np.argsort(-pr, kind="stable")[:K]
            weights = list(zip(sel, pr[sel] / pr[sel].sum())) + ([(M, 1.0)] if G > M else [])
            o = np.zeros((H, DV))
            for m, w in weights:
                pre = np.concatenate([xt @ p["q_proj"], xt @ p["k_proj"][m], xt @ p["v_proj"][m]])
                win = np.concatenate([cache[b, m], pre[None]], 0)              # [4, C]
                cache[b, m] = win[1:]
                u = silu(np.einsum("jc,cj->c", win, conv_w))
                q, k, v = (u[:H * DK].reshape(H, DK), u[H * DK:2 * H * DK].reshape(H, DK),
                           u[2 * H * DK:].reshape(H, DV))
                q = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6)
                k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
                beta = 1.0 / (1.0 + np.exp(-(xt @ p["b_proj"][m])))
                a = xt @ p["a_proj"][m] + p["dt_bias"]
                g = A * np.log1p(np.exp(a))
                for h in range(H):
                    Sm = np.exp(g[h]) * S[b, m, h]
                    Sm = Sm + np.outer(k[h], beta[h] * (v[h] - k[h] @ Sm))
                    S[b, m, h] = Sm
                    o[h] += w * DK ** -0.5 * (q[h] @ Sm)
            z = (xt @ p["g_proj"]).reshape(H, DV)
            o = o / np.sqrt((o * o).mean(-1, keepdims=True) + 1e-6) * p["norm"] * silu(z)
            ys[b, t] = o.reshape(-1)
    return ys @ p["o_proj"], S, cache, probs


def call(p, x, state, mask, seg, **kw):
    starts = doc_starts(seg, B, T)
    return mom_mixer(p, x, state, mask, starts, **{**KW, **kw})


def test_parallel_form_equals_the_per_memory_token_loop():
    """§7.4, §7.10, §4.3: outputs and every final state (routed and shared memories, conv
    caches) of the reordered parallel form == the float64 recurrent form; right padding and a
    document start inside a row included; the Switch statistics cover the real rows only."""
    mx = mixer()
    p = mx.arrays()
    x, mask, seg = inputs()
    r = route(jnp.einsum("btd,dm->btm", x, p["router"]), K, mask)
    assert float(jnp.min(jnp.where(mask, margins(r), 1.0))) > 1e-4, "near-tie routing: reseed"
    y, st, aux = call(p, x, mx.init_state(B), mask, seg)
    ry, rS, rc, probs = oracle(p, x, np.asarray(mask), np.asarray(seg))
    real = np.asarray(mask)[..., None]
    assert_close(np.where(real, y, 0), np.where(real, ry, 0), atol=2e-5, rtol=1e-4, what="y")
    assert_close(st.memory, rS, atol=2e-5, rtol=1e-4, what="memories")
    conv = np.concatenate([np.asarray(a) for a in (st.conv_q, st.conv_k, st.conv_v)], -1)
    assert_close(conv, rc, atol=1e-5, rtol=1e-5, what="conv caches")
    assert float(aux["mom/rows"]) == float(np.sum(mask))
    assert_close(aux["mom/prob_sum"], probs.sum((0, 1)), atol=1e-5, what="prob_sum")


@pytest.mark.parametrize("cuts", [(1, 3, 7), (6, 9, 10)])
def test_prefill_stops_anywhere_and_continues_exactly(cuts):
    """§7.5: prefill(x[:c]) then continue(x[c:]) == one call, outputs and final states; a
    memory that receives no token in a window keeps its state and caches bit for bit (§7.6)."""
    mx = mixer()
    p = mx.arrays()
    x, _, _ = inputs()
    seg = jnp.zeros((B, T), jnp.int32)
    full_mask = jnp.ones((B, T), bool)
    y, st, _ = call(p, x, mx.init_state(B), full_mask, seg)
    c = np.asarray(cuts)[:, None]
    t = np.arange(T)[None]
    y1, st1, _ = call(p, x, mx.init_state(B), jnp.asarray(t < c), seg)
    x2 = jnp.take_along_axis(x, jnp.asarray(np.minimum(t + c, T - 1))[..., None], axis=1)
    y2, st2, _ = call(p, x2, st1, jnp.asarray(t < T - c), seg)
    for b, cb in enumerate(cuts):
        assert_close(y1[b, :cb], y[b, :cb], atol=1e-5, rtol=1e-5, what=f"prefill {cb}")
        assert_close(y2[b, :T - cb], y[b, cb:], atol=1e-5, rtol=1e-5, what=f"continue {cb}")
    assert_close(st2.replace(pos=st.pos), st, atol=1e-5, rtol=1e-5, what="final state")
    # a one-token window: the memories it does not route to are untouched
    w_mask = jnp.asarray(np.broadcast_to(t < 1, (B, T)))
    _, st3, _ = call(p, x2, st2, w_mask, seg)
    r = route(jnp.einsum("btd,dm->btm", x2, p["router"]), K, w_mask)
    for b in range(B):
        used = set(np.asarray(r.index[b, :1]).ravel().tolist())
        for m in set(range(M)) - used:
            for f in ("memory", "conv_q", "conv_k", "conv_v"):
                np.testing.assert_array_equal(np.asarray(getattr(st3, f)[b, m]),
                                              np.asarray(getattr(st2, f)[b, m]), err_msg=f)
        assert len(used) < M, "every memory was routed: the invariance check did not bite"


def test_permuting_memories_leaves_outputs_unchanged():
    """§7.7: router columns permuted together with the per-memory parameters (the shared
    memory stays last) give the same outputs and the correspondingly permuted states."""
    mx = mixer()
    p = mx.arrays()
    x, mask, seg = inputs()
    perm = np.array([2, 0, 3, 1])
    full = np.concatenate([perm, [M]])
    q = dict(p, router=p["router"][:, perm],
             **{n: p[n][full] for n in ("k_proj", "v_proj", "b_proj", "a_proj")})
    y, st, _ = call(p, x, mx.init_state(B), mask, seg)
    yp, stp, _ = call(q, x, mx.init_state(B), mask, seg)
    assert_close(yp, y, atol=1e-5, rtol=1e-5, what="outputs")
    assert_close(stp.memory, st.memory[:, full], atol=1e-5, rtol=1e-5, what="states")


def test_tied_memories_with_all_selected_equal_one_memory():
    """§7.3: all memories share W_K, W_V, W_b, W_a, k = M, shared off == one GDN memory."""
    one = mixer(1, shared=False).arrays()
    p = dict(one, router=mixer(M, shared=False).arrays()["router"],
             **{n: jnp.repeat(one[n], M, axis=0) for n in ("k_proj", "v_proj", "b_proj",
                                                            "a_proj")})
    x, mask, seg = inputs()
    st0 = mixer(M, shared=False).init_state(B)
    y, _, _ = call(p, x, st0, mask, seg, top_k=M, shared=False)
    y1, _, _ = call(one, x, mixer(1, shared=False).init_state(B), mask, seg, top_k=1,
                    shared=False)
    assert_close(y, y1, atol=1e-5, rtol=1e-5, what="tied memories")


# ----------------------------------------------------------------------------- model level

BASES = {"mom_gated_deltanet": "gated_deltanet", "mom_linear_attention": "linear_attention"}


@pytest.mark.parametrize("name", sorted(BASES))
def test_one_memory_without_shared_equals_the_base_model(name):
    """§7.2: M = 1, k = 1, shared memory off == the base LM with the same parameters (the
    router weight is exactly 1)."""
    base = BASES[name]
    common = dict(vocab_size=37, dim=16, n_layers=1, n_heads=2, head_dim=8, expand_v=1,
                  ffn_dim=32, block=4, impl="chunked")
    mom = zoo.build(name, dict(common, n_memories=1, top_k=1, shared_memory=False))
    ref = zoo.build(base, dict(common, init_std=0.2), rngs=1)
    mx, bx = mom.blocks[0].mixer, ref.blocks[0].mixer
    for n in ("k_proj", "v_proj", "b_proj", "a_proj"):
        if hasattr(bx, n):
            getattr(mx, n)[...] = getattr(bx, n).weight[...][None]
    graphdef, mom_state = nnx.split(mom)
    ref_def, ref_state = nnx.split(ref)
    flat_ref = dict(nnx.to_flat_state(ref_state))
    for path, var in nnx.to_flat_state(mom_state):
        if path in flat_ref:                    # everything but the router and the stacks
            var.set_value(flat_ref[path].get_value())
    x = jax.random.randint(jax.random.key(3), (2, 9), 0, 37, jnp.int32)
    fwd = lambda gd: jax.jit(lambda prm, t: zoo.lm.forward(gd, prm, t)[0])  # noqa: E731
    a = fwd(graphdef)(mom_state, x)
    b = fwd(ref_def)(ref_state, x)
    assert_close(a, b, atol=1e-5, rtol=1e-5, what=f"{name} with one memory vs {base}")


def _mixer_fn(n_memories, top_k, shared, T_=24):
    mx = MoMMixer(D, rngs=nnx.Rngs(params=0), kind="gated_deltanet", n_memories=n_memories,
                  top_k=top_k, shared=shared, n_heads=H, head_dim_k=DK, head_dim_v=6, block=2,
                  impl="reference")
    graphdef, params = nnx.split(mx)
    x = jnp.ones((2, T_, D))
    return (lambda prm: nnx.merge(graphdef, prm)(x)[0]), params


def test_cost_grows_with_top_k_not_with_the_number_of_memories():
    """XLA's cost analysis of the forward (every loop unrolled): 4x the memories costs little
    (only the router and the layout's per-memory pad slots grow), 2x the top-k ~2x the memory
    work (no memory runs on a token not routed to it)."""
    def cost(*args):
        f, params = _mixer_fn(*args)
        with unrolled_loops():
            lowered = jax.jit(f).lower(params)
        assert "stablehlo.while" not in lowered.as_text()
        c = lowered.cost_analysis()
        return float((c[0] if isinstance(c, list) else c)["flops"])

    m2, m8, k2 = cost(2, 1, False), cost(8, 1, False), cost(8, 2, False)
    assert m8 / m2 < 1.35, f"memories 2 -> 8 at top-1: x{m8 / m2:.2f}"
    assert k2 / m8 > 1.4, f"top-1 -> top-2 at 8 memories: x{k2 / m8:.2f}"


def test_no_per_token_state_in_the_forward():
    """The forward's jaxpr holds no [.., T, .., dk, dv] array: states live per memory and per
    chunk only (the op's state is carried through its scan)."""
    f, params = _mixer_fn(4, 2, True)
    jaxpr = jax.make_jaxpr(f)(params)

    def jaxprs(v):
        if hasattr(v, "eqns"):
            yield v
        elif hasattr(getattr(v, "jaxpr", None), "eqns"):
            yield v.jaxpr
        elif isinstance(v, (tuple, list)):
            for u in v:
                yield from jaxprs(u)

    def shapes(jx):
        for eqn in jx.eqns:
            for v in eqn.outvars:
                yield tuple(getattr(v.aval, "shape", ()))
            for pv in eqn.params.values():
                for sub in jaxprs(pv):
                    yield from shapes(sub)

    states = [s for s in shapes(jaxpr.jaxpr) if s[-2:] == (DK, 6)]
    assert states, "no state-shaped array found: the check would not bite"
    for s in states:
        assert int(np.prod(s[:-2])) < 2 * 24, f"per-token state {s}"  # B T_ = 48


@pytest.mark.parametrize("name", sorted(BASES))
def test_conformance_runs_route_clear_of_ties(name):
    """The conformance suite's token sets (test_conformance.tokens_for seeds and batch sizes,
    the causality perturbations and the document-reset runs) route every real token with a
    margin > zoo.mom.MARGIN at every layer (the spec's check_margins)."""
    spec = zoo.get(name).conformance
    x, mask, _ = conformance_rows(spec)
    model = zoo.build(name, spec.config, rngs=0)
    graphdef, params = nnx.split(model)
    check = jax.jit(lambda prm, x, m: jnp.min(jnp.stack([
        jnp.min(jnp.where(m, g, jnp.inf)) for g in zoo.mom.routing_margins(
            nnx.merge(graphdef, prm), x, m)])))
    low = float(check(params, x, mask))
    assert low > zoo.mom.MARGIN, f"{name}: routing margin {low:.3g}"
    assert spec.check_margins is zoo.mom.check_margins
