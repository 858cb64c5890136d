"""The kernelised delta rule op (pallas_kernels/kernel_delta, Dot: specs/atlas.md §2.7, Eqs.
30–31): the chunked form (one triangular solve) against the reference token scan, forward and
gradients, at a length that is no block multiple, with cached keys and packed documents; the
reference against the closed form of tests/memory_reference.py (`dot_solve`, float64) and the
token loop of the Omega rule on φ* (`dot_token_loop`, c = 1)."""
import jax
import jax.numpy as jnp
import memory_reference as ref
import numpy as np

from layers.norms import l2_norm
from pallas_kernels.kernel_delta import kernel_delta

B, T, H, d, S = 2, 9, 2, 4, 5
SCALE = 0.5


def inputs(seed=0, length=T):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = l2_norm(jax.random.normal(ks[0], (B, length, H, d)))
    k = l2_norm(jax.random.normal(ks[1], (B, length, H, d)))
    v = jax.random.normal(ks[2], (B, length, H, d))
    eta = jax.nn.sigmoid(jax.random.normal(ks[3], (B, length, H)))
    return q, k, v, eta


def test_reference_is_the_closed_form_and_the_omega_token_loop():
    """One document, no cache: the reference scan == U = (I + diag(η) strict_tril(K))^{-1}
    diag(η) V, Y = tril(Q_κ) U (float64 closed form) == the Omega rule's token loop on φ* at
    c = 1 (the memory written from the error at M_{t-1})."""
    q, k, v, eta = inputs()
    doc, valid = jnp.zeros((B, T), jnp.int32), jnp.ones((B, T), bool)
    y, _ = jax.jit(lambda *a: kernel_delta(*a, scale=SCALE, doc=doc, valid=valid,
                                           impl="reference"))(q, k, v, eta)
    with jax.enable_x64():
        for b in range(B):
            for h in range(H):
                sel = lambda a: jnp.asarray(np.asarray(a[b, :, h]), jnp.float64)  # noqa: E731
                want = ref.dot_solve(sel(q), sel(k), sel(v), sel(eta), scale=SCALE)
                loop = ref.dot_token_loop(sel(q), sel(k), sel(v), sel(eta),
                                          jnp.ones((T, 1), jnp.float64), scale=SCALE)
                np.testing.assert_allclose(np.asarray(want), np.asarray(loop), rtol=1e-10)
                np.testing.assert_allclose(np.asarray(y[b, :, h]), np.asarray(want), rtol=2e-5,
                                           atol=2e-5)


def test_chunked_equals_reference_with_cache_documents_and_padding_forward_and_grads():
    """A call of T = 9 after S = 5 cached keys (one of them empty), a document start at 4 in
    row 0 (the cache belongs to the first document only), right padding of 2 in row 1:
    chunked == reference in y, u and the gradients of a loss on y w.r.t. every input."""
    q, k, v, eta = inputs(1)
    cq, ck, cv, ce = inputs(2, S)
    cdoc = jnp.zeros((B, S), jnp.int32)
    cval = jnp.ones((B, S), bool).at[:, 3].set(False)
    _, cu = kernel_delta(cq, ck, cv, ce, scale=SCALE, doc=cdoc, valid=cval, impl="reference")
    doc = jnp.stack([(jnp.arange(T) >= 4).astype(jnp.int32), jnp.zeros(T, jnp.int32)])
    valid = jnp.stack([jnp.ones(T, bool), jnp.arange(T) < T - 2])
    w = jax.random.normal(jax.random.key(9), (B, T, H, d))

    def run(impl):
        def loss(q, k, v, eta, ck, cu):
            y, u = kernel_delta(q, k, v, eta, scale=SCALE, doc=doc, valid=valid,
                                cache=(ck, cu, cdoc, cval), impl=impl)
            return jnp.sum(y * w) + jnp.sum(u * w), (y, u)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5), has_aux=True))(
            q, k, v, eta, ck, cu)

    (_, (y_r, u_r)), g_r = run("reference")
    (_, (y_c, u_c)), g_c = run("chunked")
    np.testing.assert_allclose(y_c, y_r, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(u_c, u_r, rtol=2e-5, atol=2e-5)
    for a, b_ in zip(g_c, g_r):
        np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-4)
    assert np.all(np.asarray(u_r)[1, T - 2:] == 0)                       # padding writes nothing
    # the second document of row 0 sees neither the cache nor the first document
    y_alone, _ = kernel_delta(q[:1, 4:], k[:1, 4:], v[:1, 4:], eta[:1, 4:], scale=SCALE,
                              doc=jnp.zeros((1, T - 4), jnp.int32),
                              valid=jnp.ones((1, T - 4), bool), impl="reference")
    np.testing.assert_allclose(y_r[:1, 4:], y_alone, rtol=2e-5, atol=2e-5)
