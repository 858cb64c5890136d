"""The diagonal scan's specification (specs/hydra.md §2.2, Hydra's SSM path): one state per
channel, read before the update,

    s_read_t = 0 if reset_t else s_t;   s_{t+1} = alpha_t * s_read_t + inp_t

a token loop in float32. alpha, inp [B, T, D]; s0 [B, D]; reset [B, T] bool. Returns (s_read
[B, T, D], the final state [B, D])."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def diag_scan(alpha, inp, s0, reset):
    def step(s, xs):
        a, b, r = xs
        read = jnp.where(r[:, None], 0.0, s)
        return a * read + b, read

    xs = (jnp.moveaxis(alpha.astype(jnp.float32), 1, 0), jnp.moveaxis(inp.astype(jnp.float32), 1, 0),
          jnp.moveaxis(reset, 1, 0))
    final, reads = jax.lax.scan(step, s0.astype(jnp.float32), xs)
    return jnp.moveaxis(reads, 0, 1), final
