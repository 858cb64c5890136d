"""The dropless top-k MoE (layers/moe.py; specs/hydra.md §2.4 and §7.5): the block dispatch ==
every expert run densely and the top-k picked, E = 1 and k = E with tied experts == a dense
SwiGLU, per-token independence, pads, XLA's cost growing with k and not with E, experts
sharded over the mesh (shard shapes asserted) == unsharded, and the balance statistics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from asserts import assert_close
from flax import nnx

from layers.moe import MoE, moe_slots
from layers.router import dense_gates, switch_loss, usage_loss, usage_stats
from train.sharding import make_mesh, param_shardings

D, H = 8, 12


def _moe(E=4, k=2, block=4, seed=0, **kw):
    return MoE(D, H, E, k, rngs=nnx.Rngs(params=seed), router_std=1.0, init_std=0.3,
               block=block, **kw)


def _x(B=2, T=13, seed=1):
    return jax.random.normal(jax.random.key(seed), (B, T, D))


def _swiglu(x, w1, w3, w2):
    return (jax.nn.silu(x @ w1) * (x @ w3)) @ w2


def _dense(moe, x, r):
    """Every expert on every token, then the top-k weighted (the definition, E times the work)."""
    every = jnp.stack([_swiglu(x, moe.w1[...][e], moe.w3[...][e], moe.w2[...][e])
                       for e in range(moe.n_experts)], axis=2)               # [B, T, E, D]
    return jnp.einsum("bted,bte->btd", every, dense_gates(r))


@nnx.jit
def _run(moe, x, mask=None):
    y, _, aux = moe(x, mask=mask)
    return y, aux


def test_block_dispatch_equals_the_dense_definition_with_pads():
    moe = _moe()
    x = _x()
    mask = jnp.asarray(np.arange(13)[None] < np.array([[13], [9]]))
    y, aux = _run(moe, x, mask)
    r = moe.routing(x, mask)
    assert len(set(np.asarray(r.index).ravel().tolist())) == 4      # every expert is used
    assert_close(y, _dense(moe, x, r), atol=1e-5, rtol=1e-5, what="MoE vs dense")
    np.testing.assert_array_equal(np.asarray(y[1, 9:]), 0.0)       # pads: routed nowhere
    assert float(aux["moe/rows"]) == 22.0


def test_one_expert_and_tied_experts_are_the_dense_swiglu():
    """§7.5: E = 1 -> a dense SwiGLU (routing weight 1); k = E with identical experts -> the
    same dense FFN (gates sum to 1)."""
    x = _x()
    one = _moe(E=1, k=1)
    want = _swiglu(x, one.w1[...][0], one.w3[...][0], one.w2[...][0])
    assert_close(_run(one, x)[0], want, atol=1e-5, rtol=1e-5, what="E = 1")
    tied = _moe(E=3, k=3)
    for w in (tied.w1, tied.w3, tied.w2):
        w[...] = jnp.broadcast_to(w[...][:1], w[...].shape)
    want = _swiglu(x, tied.w1[...][0], tied.w3[...][0], tied.w2[...][0])
    assert_close(_run(tied, x)[0], want, atol=1e-5, rtol=1e-5, what="tied experts, k = E")


def test_each_token_is_computed_alone():
    """Token routing and the shared layout: perturbing other tokens (which reorders every expert's
    segment) leaves a token's output unchanged."""
    moe = _moe()
    x = _x()
    y = _run(moe, x)[0]
    x2 = x.at[:, 5:].set(-x[:, 5:])
    np.testing.assert_allclose(np.asarray(_run(moe, x2)[0][:, :5]), np.asarray(y[:, :5]),
                               atol=1e-6)


def test_cost_grows_with_k_not_with_the_number_of_experts():
    """XLA's cost analysis of the layer at width 64, hidden 128 (where the expert products, not
    the layout's integer bookkeeping, dominate): 4x the experts adds only their pad blocks and
    router columns (dense dispatch would be 4x); 2x the top-k doubles the expert work."""
    x = jax.random.normal(jax.random.key(1), (2, 64, 64))

    def flops(E, k):
        moe = MoE(64, 128, E, k, rngs=nnx.Rngs(params=0), block=4)
        gd, st = nnx.split(moe)
        cost = jax.jit(lambda st, x: nnx.merge(gd, st)(x)[0]).lower(st, x).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    f4, f16, f4k1 = flops(4, 2), flops(16, 2), flops(4, 1)
    assert f16 / f4 < 1.5, (f4, f16)
    assert 1.6 < f4 / f4k1 < 2.4, (f4k1, f4)
    assert moe_slots(64, 2, 16, 4) < 1.5 * moe_slots(64, 2, 4, 4)


def test_experts_shard_over_the_mesh_and_equal_unsharded():
    """The "expert" axis goes over fsdp on the (2, 2, 2) mesh (and mlp over tensor): each
    device holds [E/2, D, H/2] of an expert matrix; the sharded call == the unsharded one."""
    moe = _moe(E=4, k=2)
    gd, st = nnx.split(moe)
    mesh = make_mesh((2, 2, 2))
    shardings = param_shardings(st, mesh)
    sp = jax.device_put(jax.tree.map(np.asarray, st), shardings)
    shapes = {k: v.sharding.shard_shape(v.shape) for k, v in
              (("w1", sp["w1"][...]), ("w2", sp["w2"][...]), ("router", sp["router"][...]))}
    assert shapes == {"w1": (2, D, H // 2), "w2": (2, H // 2, D), "router": (D // 2, 4)}
    x = _x(B=4)
    f = jax.jit(lambda st, x: nnx.merge(gd, st)(x)[0])
    assert_close(f(sp, x), f(st, x), atol=1e-5, rtol=1e-5, what="sharded experts")


def test_balance_statistics():
    """Switch's L_aux = k and Hydra's E Σ u² − 1 = 0 at perfect balance; E − 1 when one expert
    takes every weight; the router gets a gradient through the gates."""
    from layers.router import route
    E, k = 4, 2
    pairs = [(e, (e + 1) % E) for e in range(E)]            # each expert first and second once
    logits = jnp.asarray([[[5.0 if m == a else 4.0 if m == b else 0.0 for m in range(E)]
                           for a, b in pairs]])
    r = route(logits, k)
    from layers.router import switch_stats
    uniform = route(jnp.zeros((1, 4, E)), k)
    stats = switch_stats(uniform, prefix="m")
    assert float(switch_loss(stats, prefix="m")) == pytest.approx(k, abs=1e-5)
    assert float(usage_loss(usage_stats(r, prefix="m"), prefix="m")) == pytest.approx(0.0, abs=1e-6)
    one = route(jnp.asarray([[[9.0, 0, 0, 0]] * 3]), 1)
    assert float(usage_loss(usage_stats(one, prefix="m"), prefix="m")) == pytest.approx(E - 1)
    moe = _moe()
    gd, st = nnx.split(moe)
    g = jax.grad(lambda st: jnp.sum(nnx.merge(gd, st)(_x())[0] ** 2))(st)
    assert float(jnp.sum(jnp.abs(g["router"][...]))) > 0


def _chunk_moe(C=4):
    return MoE(D, H, 4, 2, rngs=nnx.Rngs(params=0), chunk=C, router_std=1.0, init_std=0.3,
               block=4)


def test_chunk_routing_uses_the_previous_chunk_mean():
    """§2.4 [spec]: every token of chunk c is routed by the mean of chunk c - 1 (chunk 0 by the
    learned m_{-1}), written out here; so a token's output ignores every later input."""
    from layers.moe import ChunkRouteState, chunk_route_features
    moe = _chunk_moe()
    x = _x(T=14)
    C = 4
    st0 = moe.init_state(2)
    pos = jnp.broadcast_to(jnp.arange(14), (2, 14))
    feats, _ = chunk_route_features(x, jnp.ones((2, 14), bool), pos, jnp.full((2,), 14), st0,
                                    moe.m_init[...], C)
    for t in range(14):
        c = t // C
        want = moe.m_init[...] if c == 0 else jnp.mean(x[:, (c - 1) * C:c * C], axis=1)
        np.testing.assert_allclose(feats[:, t], jnp.broadcast_to(want, (2, D)), atol=1e-6)
    assert isinstance(st0, ChunkRouteState)
    f = nnx.jit(lambda m, x: m(x)[0])
    y = f(moe, x)
    for t0 in (3, 4, 9):
        x2 = x.at[:, t0:].add(1.0)
        np.testing.assert_array_equal(np.asarray(f(moe, x2)[:, :t0]), np.asarray(y[:, :t0]))


def test_chunk_routing_prefill_continue_decode_and_document_starts():
    """Contract notes "Chunk-MoE decode": prefill cut inside a chunk, at a chunk edge and on a
    partial last chunk, then continue; token-by-token decode; the state after the full call
    equals the decoded one; a packed document start restarts the grid (== a fresh call)."""
    moe = _chunk_moe()
    gd, st = nnx.split(moe)
    x = _x(T=14)
    T = 14

    @jax.jit
    def run(st, x):
        m = nnx.merge(gd, st)
        full, s_full, _ = m(x)
        outs = []
        for cut in (3, 4, 6):
            a, s, _ = m(x[:, :cut])
            b, _, _ = m(x[:, cut:], s)
            outs.append(jnp.concatenate([a, b], 1))

        def step(s, xt):
            y, s, _ = nnx.merge(gd, st)(xt[:, None], s)
            return s, y[:, 0]
        s_dec, ys = jax.lax.scan(step, m.init_state(2), jnp.moveaxis(x, 1, 0))
        seg = jnp.broadcast_to((jnp.arange(T) >= 6).astype(jnp.int32), (2, T))
        packed = m(x, segment_ids=seg)[0]
        alone = m(x[:, 6:])[0]
        return full, s_full, outs, jnp.moveaxis(ys, 0, 1), s_dec, packed, alone

    full, s_full, outs, dec, s_dec, packed, alone = run(st, x)
    for o in outs:
        assert_close(o, full, atol=1e-5, rtol=1e-5, what="prefill + continue")
    assert_close(dec, full, atol=1e-5, rtol=1e-5, what="decode")
    assert_close(s_dec, s_full, atol=1e-5, rtol=1e-5, what="state")
    assert_close(packed[:, 6:], alone, atol=1e-5, rtol=1e-5, what="second document")
    assert float(jnp.max(jnp.abs(packed[:, 8:] - full[:, 8:]))) > 1e-4   # the reset matters
