"""Chunked SSD in plain XLA (the state-space dual form, specs/mamba.md §9.2).

A `lax.scan` over chunks of `block` steps carries the state [B, H, P, N]; inside a chunk the
outputs are the masked "linear attention" form

    y_t = sum_{s<=t} (C_t . B_s) exp(A seg[t, s]) dt_s x_s  +  exp(A cum[t]) S_in C_t,

with seg the stable segment sum of dt (masked increments, not differences of a global cumsum),
every exponent clamped <= 0 (nothing overflows for any decay), and terms masked where a document
starts in (s, t]. Ragged lengths are padded with dt = 0 and x = B = C = 0 (decay 1, no input),
so the returned state is the state after the last real step. The chunk body is rematerialised
in the backward pass. The chunk length never changes the function.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import pad_chunks, reset_masks, segsum, unpad_chunks, upcast
from pallas_kernels.ssd.reference import heads_of_groups

Array = jax.Array


def ssd(x: Array, dt: Array, A: Array, Bm: Array, C: Array, *, h0: Array | None = None,
        reset: Array | None = None, block: int = 64) -> tuple[Array, Array]:
    """Same signature and result as `reference.ssd`; `block` never changes the function."""
    Bsz, T, H, P = x.shape
    N = Bm.shape[-1]
    x, dt, A, Bm, C = upcast(x, dt, A, Bm, C)
    Bh, Ch = heads_of_groups(Bm, H), heads_of_groups(C, H)
    h0 = jnp.zeros((Bsz, H, P, N), x.dtype) if h0 is None else upcast(h0)
    reset = jnp.zeros((Bsz, T), bool) if reset is None else reset.astype(bool)
    Q = max(1, min(block, T))
    xs = pad_chunks([x, dt, Bh, Ch, reset], T, Q)

    @jax.checkpoint
    def body(s_in, blk):
        xc, dtc, bc, cc, rc = blk                       # [B, Q, ...]
        same, clean = reset_masks(rc)
        expo = jnp.minimum(segsum(dtc, axis=1) * A, 0.0)            # [B, Q, Q, H]
        L = jnp.where(same[..., None], jnp.exp(expo), 0.0)
        scores = jnp.einsum("bthn,bshn->btsh", cc, bc) * L
        xdt = xc * dtc[..., None]                                    # [B, Q, H, P]
        y = jnp.einsum("btsh,bshp->bthp", scores, xdt)
        cum = jnp.cumsum(dtc, axis=1)                                # [B, Q, H]
        dec = jnp.where(clean[..., None], jnp.exp(jnp.minimum(cum * A, 0.0)), 0.0)
        y = y + jnp.einsum("bthn,bhpn->bthp", cc, s_in) * dec[..., None]
        s_out = dec[:, -1, :, None, None] * s_in + jnp.einsum(
            "bsh,bshp,bshn->bhpn", L[:, -1], xdt, bc)
        return s_out, y

    hT, y = jax.lax.scan(body, h0, tuple(xs))
    y = unpad_chunks(y, T)
    return y, hT
