"""The diagonal scan chunk-parallel (the same function as reference.py): within chunks of
`block` tokens an associative scan over (a, b) pairs, (a1, b1)∘(a2, b2) = (a1 a2, a2 b1 + b2)
(products of alpha in [0, 1]: no exp of cumulative sums), then one scan over the chunks' totals
for the carried states. A reset zeroes the factor a of its token, which cuts the carry."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _comb(left, right):
    return left[0] * right[0], right[0] * left[1] + right[1]


def diag_scan(alpha, inp, s0, reset, *, block: int = 64):
    B, T, D = alpha.shape
    C = block
    n = -(-T // C)
    pad = n * C - T
    keep = 1.0 - reset[..., None].astype(jnp.float32)
    a = jnp.pad(alpha.astype(jnp.float32) * keep, ((0, 0), (0, pad), (0, 0)), constant_values=1.0)
    b = jnp.pad(inp.astype(jnp.float32), ((0, 0), (0, pad), (0, 0)))
    a, b = a.reshape(B, n, C, D), b.reshape(B, n, C, D)
    A, Hl = jax.lax.associative_scan(_comb, (a, b), axis=2)     # from a zero state per chunk

    def carry(s, xs):
        At, Ht = xs
        return At * s + Ht, s

    final, s_in = jax.lax.scan(carry, s0.astype(jnp.float32),
                               (jnp.moveaxis(A[:, :, -1], 1, 0), jnp.moveaxis(Hl[:, :, -1], 1, 0)))
    s_in = jnp.moveaxis(s_in, 0, 1)                              # [B, n, D]: state into chunk
    h = A * s_in[:, :, None] + Hl                                # the state after each token
    h = h.reshape(B, n * C, D)[:, :T]
    prev = jnp.concatenate([s0.astype(jnp.float32)[:, None], h[:, :-1]], axis=1)
    return prev * keep, final
