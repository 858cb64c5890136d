"""Product-key memory (Lample et al. 2019; specs/hydra.md §2.5, "Factual product-key memory").

Per query head h (q = x W_q, each head's query split into halves q1, q2 of d_k):

    s1 = q1 K1_hᵀ (n1 sub-keys),  s2 = q2 K2_hᵀ (n2 sub-keys)
    the top-k of s1 and of s2 -> k² candidate keys (i, j) scored s1_i + s2_j
    reselect: keep the top-k of the k² candidates (Lample et al.; the prototype keeps all k²)
    w = softmax over the kept candidates;  r_h = Σ w · V[i n2 + j]      V [n1 n2, d_v] shared
    PKM(x) = (Σ_h r_h) W_o                                               W_o: d_v -> d

Per token (no mixing across time): causal by construction, no state. The value table is read
with `jnp.take`, so its gradient touches only the selected rows. Sub-keys N(0, d_k^-1/2),
values N(0, d_v^-1/2) (hydra.md §5 [spec]); `prefix`/aux: none.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.common import normal, param
from layers.linear import Dense

Array = jax.Array


def pkm_read(q: Array, k1: Array, k2: Array, values: Array, topk: int, reselect: bool):
    """q [..., H, 2 d_k]; k1 [H, n1, d_k], k2 [H, n2, d_k]; values [n1 n2, d_v]. Returns
    (the heads' summed read [..., d_v], the selected value rows [..., H, m], their weights)."""
    d_k = k1.shape[-1]
    n2 = k2.shape[1]
    q1, q2 = q[..., :d_k], q[..., d_k:]
    s1 = jnp.einsum("...hd,hnd->...hn", q1, k1)
    s2 = jnp.einsum("...hd,hnd->...hn", q2, k2)
    t1, i1 = jax.lax.top_k(s1, topk)
    t2, i2 = jax.lax.top_k(s2, topk)
    scores = (t1[..., :, None] + t2[..., None, :]).reshape(*t1.shape[:-1], topk * topk)
    rows = (i1[..., :, None] * n2 + i2[..., None, :]).reshape(scores.shape)
    if reselect:
        scores, pick = jax.lax.top_k(scores, topk)
        rows = jnp.take_along_axis(rows, pick, axis=-1)
    w = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
    v = jnp.take(values, rows, axis=0)                           # [..., H, m, d_v]
    return jnp.einsum("...hm,...hmv->...v", w, v.astype(jnp.float32)), rows, w


class ProductKeyMemory(nnx.Module):
    """`n_heads` query heads over n_sub x n_sub product keys of size d_k, values of d_v, top-k
    per half (module doc)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, n_sub: int = 64, d_key: int = 64,
                 d_value: int = 128, n_heads: int = 1, topk: int = 4, reselect: bool = False,
                 init_std: float = 0.02):
        if not 1 <= topk <= n_sub:
            raise ValueError(f"PKM top-k {topk} must be in [1, n_sub={n_sub}]")
        self.n_heads, self.d_key, self.topk, self.reselect = n_heads, d_key, topk, reselect
        self.wq = Dense(dim, n_heads * 2 * d_key, rngs=rngs, axes=("embed", None), std=init_std)
        self.k1 = param(normal(rngs.params(), (n_heads, n_sub, d_key), d_key ** -0.5),
                        (None, None, None))
        self.k2 = param(normal(rngs.params(), (n_heads, n_sub, d_key), d_key ** -0.5),
                        (None, None, None))
        self.values = param(normal(rngs.params(), (n_sub * n_sub, d_value), d_value ** -0.5),
                            (None, None))
        self.wo = Dense(d_value, dim, rngs=rngs, axes=(None, "embed"), std=init_std)

    def __call__(self, x: Array) -> Array:
        q = self.wq(x.astype(jnp.float32))
        q = q.reshape(*q.shape[:-1], self.n_heads, 2 * self.d_key)
        r, _, _ = pkm_read(q, self.k1[...], self.k2[...], self.values[...], self.topk,
                           self.reselect)
        return self.wo(r.astype(x.dtype))


def pkm_params(dim: int, n_sub: int, d_key: int, d_value: int, n_heads: int) -> int:
    """W_q [d, H 2 d_k], sub-keys 2 H n d_k, values n² d_v, W_o [d_v, d] (hydra.md §3.2's
    terms: heads (n1 + n2) d_k + d heads 2 d_k + n1 n2 d_v + d_v d)."""
    return dim * n_heads * 2 * d_key + 2 * n_heads * n_sub * d_key + n_sub * n_sub * d_value \
        + d_value * dim
