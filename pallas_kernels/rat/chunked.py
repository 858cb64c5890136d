"""RAT chunk-parallel form (specs/rat.md §5): the same function as `reference.py`.

1. Recurrence (§5.1): h_t = a_t h_{t-1} + (1 - f_t) [x_t | k_t] over the call's time axis,
   with a_t = 0 at chunk starts (document position mod L == 0, document starts included) and
   a_t = f_t elsewhere; the carried running state enters through the first step, so a call may
   start mid-chunk (DESIGN's chunk-aligned contract). Two levels over tiles of L call tokens: a
   `lax.scan` over the L in-tile steps (vectorised over tiles, from zero), then a `lax.scan` over
   the tiles carrying the incoming state (h = h_local + (prod of a so far) h_in). Cheaper to
   trace and to run on CPU than an associative scan over T.
2. Chunk summaries: chunk ends (position mod L == L-1) are at least L tokens apart, even across
   document starts, so each tile of L consecutive call tokens holds at most one: tile i's
   summary is the masked sum over its tokens (no gather, no dynamic shapes).
3. Inter-chunk attention (§5.2): one float32 softmax over [carried summaries of finished chunks
   (slots < c0, the call's first document only), the call's summaries that end strictly before
   the query in its document, the query's own running state]. No row is empty (§8.1).
Memory is O(B H T (S + T / L)).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import float_type, n_chunks
from pallas_kernels.rat.reference import NEG, Rotate

Array = jax.Array


def _linear_scan(a: Array, bs: tuple[Array, ...], n: int, L: int) -> tuple[Array, ...]:
    """h_t = a_t h_{t-1} + b_t from h_{-1} = 0 along axis 1 of [B, T, ...] arrays, in tiles."""
    T = a.shape[1]
    at = jnp.moveaxis(_tiles(a, n, L), 2, 0)                    # [L, B, n, ...]
    bt = tuple(jnp.moveaxis(_tiles(b, n, L), 2, 0) for b in bs)

    def inner(c, x):
        A, hs = c
        ai, bi = x
        c = (A * ai, tuple(ai * h + b for h, b in zip(hs, bi)))
        return c, c

    zero = jnp.zeros_like(at[0])
    _, (A, hs) = jax.lax.scan(inner, (jnp.ones_like(zero), (zero,) * len(bs)), (at, bt))

    def outer(h_in, x):                                          # over tiles: [B, ...]
        A_last, h_last = x
        return tuple(A_last * hi + hl for hi, hl in zip(h_in, h_last)), h_in

    _, h_in = jax.lax.scan(outer, tuple(jnp.zeros_like(zero[:, 0]) for _ in bs),
                           (jnp.moveaxis(A[-1], 1, 0), tuple(jnp.moveaxis(h[-1], 1, 0)
                                                             for h in hs)))
    out = []
    for h, hi in zip(hs, h_in):                                  # h [L, B, n, ...], hi [n, B, ...]
        full = h + A * jnp.moveaxis(hi, 0, 1)[None]
        full = jnp.moveaxis(full, 0, 2)                          # [B, n, L, ...]
        out.append(full.reshape((full.shape[0], n * L) + full.shape[3:])[:, :T])
    return tuple(out)


def _tiles(a: Array, n: int, L: int) -> Array:
    """[B, T, ...] zero-padded to n L steps, as [B, n, L, ...]."""
    B, T = a.shape[:2]
    a = jnp.pad(a, [(0, 0), (0, n * L - T)] + [(0, 0)] * (a.ndim - 2))
    return a.reshape((B, n, L) + a.shape[2:])


def rat(q: Array, k: Array, v: Array, f: Array, carry: tuple[Array, Array, Array, Array], *,
        chunk: int, pos: Array, doc: Array, mask: Array, rotate: Rotate | None = None,
        fresh: bool = False):
    """Arguments as `reference.rat`, plus doc [B, T] int (documents started inside the call up
    to each token) and `fresh` (static: the carry is the empty state, skip its slots)."""
    B, T, H, d = q.shape
    dt = float_type(jnp.result_type(q, k, v, f))
    q, k, v, f = (a.astype(dt) for a in (q, k, v, f))
    k_sum, v_sum, k_run, v_run = (a.astype(dt) for a in carry)
    S = k_sum.shape[1]
    L = chunk
    scale = d ** -0.5
    b = jnp.arange(B)
    t = jnp.arange(T)
    mask = mask.astype(bool)

    # 1. the intra-chunk recurrence, keys and values driven by one gate (§8.6)
    a = jnp.where((pos % L == 0)[..., None, None], 0.0, f)
    bv, bk = (1.0 - f) * v, (1.0 - f) * k
    bv = bv.at[:, 0].add(a[:, 0] * v_run)
    bk = bk.at[:, 0].add(a[:, 0] * k_run)
    n = n_chunks(T, L)
    vbar, kbar = _linear_scan(a, (bv, bk), n, L)
    kr = kbar if rotate is None else rotate(kbar, pos // L)

    # 2. one summary per tile of L call tokens
    is_end = pos % L == L - 1
    e = _tiles(is_end, n, L)                                     # [B, n, L]
    K = jnp.einsum("bnl,bnlhd->bnhd", e.astype(dt), _tiles(kr, n, L))
    V = jnp.einsum("bnl,bnlhd->bnhd", e.astype(dt), _tiles(vbar, n, L))
    has = jnp.any(e, axis=-1)
    pick = lambda x: jnp.sum(jnp.where(e, _tiles(x, n, L), 0), axis=-1)
    end_t, end_doc, end_pos = pick(jnp.broadcast_to(t, (B, T))), pick(doc), pick(pos)

    # 3. one softmax over [carried slots, call summaries, self]
    vis = [has[:, None, :] & (end_t[:, None, :] < t[None, :, None])
           & (end_doc[:, None, :] == doc[:, :, None])]           # [B, T, n]
    s = [jnp.einsum("bthd,bnhd->bhtn", q, K) * scale]
    vals = [V]
    if not fresh:
        c0 = pos[:, 0] // L
        vis.insert(0, (jnp.arange(S)[None, None, :] < c0[:, None, None]) & (doc[:, :, None] == 0))
        s.insert(0, jnp.einsum("bthd,bshd->bhts", q, k_sum) * scale)
        vals.insert(0, v_sum)
    vis = jnp.concatenate(vis, axis=-1)[:, None]                 # [B, 1, T, S + n]
    s = jnp.where(vis, jnp.concatenate(s, axis=-1), NEG)
    s_self = jnp.moveaxis(jnp.sum(q * kr, axis=-1) * scale, 1, 2)  # [B, H, T]
    m = jnp.maximum(jnp.max(s, axis=-1), s_self)
    p = jnp.where(vis, jnp.exp(s - m[..., None]), 0.0)
    p_self = jnp.exp(s_self - m)
    den = jnp.sum(p, axis=-1) + p_self
    y = (jnp.einsum("bhtj,bjhd->bthd", p, jnp.concatenate(vals, axis=1))
         + jnp.moveaxis(p_self, 1, 2)[..., None] * vbar) / jnp.moveaxis(den, 1, 2)[..., None]

    # the carry after the last real token: its running state, the summaries of its document
    n_real = jnp.sum(mask, axis=1).astype(jnp.int32)
    last = jnp.maximum(n_real - 1, 0)
    real = n_real > 0
    at_last = lambda x: x[b, last]
    k_run = jnp.where(real[:, None, None], at_last(kbar), k_run)
    v_run = jnp.where(real[:, None, None], at_last(vbar), v_run)
    write = has & (end_t < n_real[:, None]) & (end_doc == at_last(doc)[:, None])
    slot = jnp.where(write, end_pos // L, S)
    k_sum = k_sum.at[b[:, None], slot].set(K, mode="drop")
    v_sum = v_sum.at[b[:, None], slot].set(V, mode="drop")
    slot = jnp.where(real, at_last(pos) // L, S)
    k_sum = k_sum.at[b, slot].set(at_last(kr), mode="drop")
    v_sum = v_sum.at[b, slot].set(at_last(vbar), mode="drop")
    return y, (k_sum, v_sum, k_run, v_run)
