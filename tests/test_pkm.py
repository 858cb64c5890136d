"""Product-key memory (layers/pkm.py; specs/hydra.md §2.5, §7.6): with top-k = n (every
sub-key) the read is exactly softmax attention over all n1 n2 product keys scored s1_i + s2_j,
written out here; gradients reach only the selected value rows; re-selection keeps the best k of
the k² candidates; per-token (causal); the parameter formula."""
import jax
import jax.numpy as jnp
import numpy as np
from asserts import assert_close
from flax import nnx

from layers.pkm import ProductKeyMemory, pkm_params, pkm_read

D = 8


def _pkm(**kw):
    args = dict(n_sub=5, d_key=4, d_value=6, n_heads=2, topk=2, init_std=0.5)
    args.update(kw)
    return ProductKeyMemory(D, rngs=nnx.Rngs(params=0), **args)


def _x():
    return jax.random.normal(jax.random.key(1), (2, 7, D))


def test_full_topk_is_softmax_attention_over_every_product_key():
    m = _pkm(topk=5)
    x = _x()
    q = m.wq(x).reshape(2, 7, 2, 8)
    k1, k2, V = m.k1[...], m.k2[...], m.values[...]
    # every (i, j): key score s1_i + s2_j, value V[i n2 + j]
    s = (jnp.einsum("bthd,hnd->bthn", q[..., :4], k1)[..., :, None]
         + jnp.einsum("bthd,hnd->bthn", q[..., 4:], k2)[..., None, :]).reshape(2, 7, 2, 25)
    r = jnp.einsum("bthm,mv->btv", jax.nn.softmax(s, axis=-1), V)
    assert_close(m(x), m.wo(r), atol=1e-5, rtol=1e-5, what="PKM at top-k = n")


def test_gradient_reaches_only_the_selected_value_rows():
    m = _pkm(n_sub=8)
    x = _x()[:, :2]
    gd, st = nnx.split(m)
    g = jax.grad(lambda st: jnp.sum(nnx.merge(gd, st)(x) ** 2))(st)["values"][...]
    q = m.wq(x).reshape(2, 2, 2, 8)
    _, rows, _ = pkm_read(q, m.k1[...], m.k2[...], m.values[...], 2, False)
    used = np.zeros(64, bool)
    used[np.asarray(rows).ravel()] = True
    touched = np.any(np.asarray(g) != 0, axis=1)
    np.testing.assert_array_equal(touched, used)
    assert 0 < used.sum() < 64


def test_reselect_keeps_the_best_k_of_the_candidates():
    m = _pkm(topk=3)
    x = _x()
    q = m.wq(x).reshape(2, 7, 2, 8)
    _, all_rows, all_w = pkm_read(q, m.k1[...], m.k2[...], m.values[...], 3, False)
    _, rows, w = pkm_read(q, m.k1[...], m.k2[...], m.values[...], 3, True)
    assert rows.shape[-1] == 3 and all_rows.shape[-1] == 9
    # the kept rows are the 3 most weighted of the 9 candidates
    best = jnp.take_along_axis(all_rows, jax.lax.top_k(all_w, 3)[1], axis=-1)
    np.testing.assert_array_equal(np.sort(np.asarray(rows), -1), np.sort(np.asarray(best), -1))


def test_per_token_and_parameter_count():
    m = _pkm()
    x = _x()
    y = m(x)
    np.testing.assert_allclose(m(x.at[:, 4:].set(0.0))[:, :4], y[:, :4], atol=1e-6)
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert n == pkm_params(D, 5, 4, 6, 2)
    # hydra.md §3.2's PKM row: n1 = n2 = 256, d_k 128, d_v 512, 4 heads at d 2048: ≈ 37.0 M
    assert abs(pkm_params(2048, 256, 128, 512, 4) / 37.0e6 - 1) < 0.01
