"""RAT reference form: the one-token decode step of specs/rat.md §6.2, scanned over the tokens.

Per token at document position p (chunk c = p // L, offset l = p mod L), per channel:
    k_run = (1 - f) k            if l == 0, else  f k_run + (1 - f) k      (§3.5; same for v)
    slot c <- (rotate(k_run, c), v_run)           (overwritten on every step of the chunk, §8.8)
    y = softmax(q . slots[0..c] / sqrt(d)) slots_v[0..c]                   (§6.2 step 4)
so chunk 0 gives y = v_run exactly (§8.1) and the running state is the self term (§3.9). The
chunk grid is anchored at document position 0 (the state carries the position; a document start
has p = 0, which resets the recurrence). Pads (`mask` False) leave the carry unchanged.
Maths in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.common import float_type

Array = jax.Array
NEG = -1e30
Rotate = Callable[[Array, Array], Array]  # (x [B, T, H, d], chunk positions [B, T]) -> x


def rat(q: Array, k: Array, v: Array, f: Array, carry: tuple[Array, Array, Array, Array], *,
        chunk: int, pos: Array, mask: Array, rotate: Rotate | None = None):
    """q [B, T, H, d]: queries already rotated at their chunk index (tiled groups, §3.4);
    k, v [B, T, H, d]: raw keys (tiled) and values; f [B, T, H, d]: the forget gate in (0, 1);
    carry: see `pallas_kernels.rat`; pos [B, T] int: document positions of the tokens;
    mask [B, T]: real tokens; rotate: chunk-index RoPE (None: no positional encoding).

    Returns y [B, T, H, d] and the carry after the last real token."""
    B, T, H, d = q.shape
    dt = float_type(jnp.result_type(q, k, v, f))
    k_sum, v_sum, k_run, v_run = (a.astype(dt) for a in carry)
    S = k_sum.shape[1]
    L = chunk
    scale = d ** -0.5
    b = jnp.arange(B)

    def step(c, inp):
        k_sum, v_sum, k_run, v_run = c
        qt, kt, vt, ft, pt, mt = inp
        ci = pt // L
        keep = (pt % L != 0)[:, None, None]
        kr = jnp.where(keep, ft * k_run, 0.0) + (1.0 - ft) * kt
        vr = jnp.where(keep, ft * v_run, 0.0) + (1.0 - ft) * vt
        krot = kr if rotate is None else rotate(kr[:, None], ci[:, None])[:, 0]
        ks = k_sum.at[b, ci].set(krot, mode="drop")
        vs = v_sum.at[b, ci].set(vr, mode="drop")
        s = jnp.einsum("bhd,bshd->bhs", qt, ks) * scale
        vis = (jnp.arange(S)[None, :] <= ci[:, None])[:, None, :]
        s = jnp.where(vis, s, NEG)
        p = jnp.where(vis, jnp.exp(s - jnp.max(s, axis=-1, keepdims=True)), 0.0)
        y = jnp.einsum("bhs,bshd->bhd", p / jnp.sum(p, axis=-1, keepdims=True), vs)
        m2, m4 = mt[:, None, None], mt[:, None, None, None]
        new = (jnp.where(m4, ks, k_sum), jnp.where(m4, vs, v_sum), jnp.where(m2, kr, k_run),
               jnp.where(m2, vr, v_run))
        return new, y

    xs = tuple(jnp.moveaxis(a.astype(dt), 1, 0) for a in (q, k, v, f)) + (
        jnp.moveaxis(pos, 1, 0), jnp.moveaxis(mask.astype(bool), 1, 0))
    carry, y = jax.lax.scan(step, (k_sum, v_sum, k_run, v_run), xs)
    return jnp.moveaxis(y, 0, 1), carry
