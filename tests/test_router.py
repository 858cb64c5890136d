"""The generic top-k router (layers/router.py, specs/mom.md §2.2, §2.7, §7 items 8-9): gates,
tie-breaking, margins, and the Switch statistics as additive sums that reduce across layers,
micro-batches and masks."""
import jax
import jax.numpy as jnp
import numpy as np
from asserts import assert_close
from flax import nnx

from layers.router import (
    Routing,
    TopKRouter,
    dense_gates,
    margins,
    route,
    switch_loss,
    switch_stats,
    z_loss,
)

P = "r"


def _logits(B=3, T=7, M=5, seed=0):
    return 2.0 * jax.random.normal(jax.random.key(seed), (B, T, M))


def test_gates_are_renormalised_top_k():
    """§7.8: sum_m g = 1, g >= 0, exactly k non-zeros; g = p / sum of the selected p."""
    logits = _logits()
    r = route(logits, 2)
    p = np.asarray(jax.nn.softmax(logits, -1), np.float64)
    dense = np.asarray(dense_gates(r))
    assert_close(dense.sum(-1), np.ones(dense.shape[:-1]), atol=1e-6, what="gates sum")
    assert (dense >= 0).all() and ((dense > 0).sum(-1) == 2).all()
    top = np.sort(p, -1)[..., ::-1][..., :2]
    assert_close(np.sort(dense, -1)[..., ::-1][..., :2], top / top.sum(-1, keepdims=True),
                 atol=1e-6, what="renormalised")
    assert_close(r.probs, p, atol=1e-6, what="full softmax")


def test_ties_pick_the_lowest_index_and_masked_tokens_route_nowhere():
    r = route(jnp.zeros((1, 2, 4)), 2, mask=jnp.array([[True, False]]))
    np.testing.assert_array_equal(np.asarray(r.index[0, 0]), [0, 1])      # §8.7
    np.testing.assert_array_equal(np.asarray(r.gates[0, 1]), [0.0, 0.0])
    np.testing.assert_array_equal(np.asarray(margins(r))[0], [0.0, 0.0])


def test_margins_are_the_gap_after_the_kth_probability():
    r = route(_logits(), 2)
    p = np.sort(np.asarray(r.probs), -1)[..., ::-1]
    assert_close(margins(r), p[..., 1] - p[..., 2], atol=1e-7, what="margin")
    assert np.isinf(np.asarray(margins(route(_logits(), 5)))).all()


def test_switch_loss_is_k_at_perfect_balance():
    """§7.9: uniform probabilities and uniform assignments of every rank give L_aux = k."""
    B, T, M, k = 2, 8, 4, 2
    probs = jnp.full((B, T, M), 1.0 / M)
    t = jnp.arange(B * T).reshape(B, T)
    index = jnp.stack([t % M, (t + 1) % M], -1).astype(jnp.int32)
    r = Routing(logits=jnp.zeros((B, T, M)), probs=probs, index=index,
                gates=jnp.full((B, T, k), 0.5))
    assert_close(switch_loss(switch_stats(r, prefix=P), prefix=P), np.float32(k), atol=1e-6)


def test_statistics_add_across_layers_and_batches_and_skip_masked_rows():
    """Summing two parts' statistics gives the whole batch's; masked rows count nowhere."""
    logits = _logits(B=4, T=6)
    mask = jnp.arange(6)[None, :] < jnp.array([[6], [4], [6], [1]])
    whole = switch_stats(route(logits, 2, mask), mask, prefix=P, z_stat=True)
    parts = [switch_stats(route(logits[s], 2, mask[s]), mask[s], prefix=P, z_stat=True)
             for s in (slice(0, 1), slice(1, 4))]
    summed = {key: parts[0][key] + parts[1][key] for key in whole}
    assert_close(summed, whole, atol=1e-5, what="additive statistics")
    assert float(whole[f"{P}/rows"]) == 17.0
    assert_close(whole[f"{P}/choice_count"].sum(-1), np.full(2, 17.0), what="one choice per rank")
    # the same statistics from the real rows alone
    lg = np.asarray(logits)[np.asarray(mask)]
    p = jax.nn.softmax(jnp.asarray(lg), -1)
    assert_close(whole[f"{P}/prob_sum"], p.sum(0), atol=1e-5, what="prob_sum over real rows")
    lse = np.log(np.exp(lg.astype(np.float64)).sum(-1))
    assert_close(z_loss(whole, prefix=P), np.float32((lse ** 2).mean()), atol=1e-4, rtol=1e-5)


def test_load_balance_gradient_reaches_the_router_weight():
    router = TopKRouter(8, 4, 2, rngs=nnx.Rngs(params=0), gain=1.0)
    graphdef, params = nnx.split(router)
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))

    def loss(params):
        r = nnx.merge(graphdef, params)(x)
        return switch_loss(switch_stats(r, prefix=P), prefix=P)

    g = jax.grad(loss)(params)
    assert float(jnp.sum(jnp.abs(g["weight"][...]))) > 0
