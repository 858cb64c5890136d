"""The RAT mixer (specs/rat.md §3): gated intra-chunk recurrence + softmax attention over the
chunk summaries, with chunk-index RoPE applied after the recurrence.

Level 1 is the `pallas_kernels.rat` op (reference: the decode step of §6.2 scanned; chunked: §5).
Level 3 is `RATMixer`, the parameters (§3.2-3.3, §7) and the mixer contract. The block's
pre-RMSNorm and residual (§3.1, §3.10) are `zoo.lm.Block`'s.

State (`RATState`, §6.1): per chunk slot the rotated key and the value summary (the slot of the
current chunk holds its running state), the running in-chunk states before RoPE, and the document
position of the next token. The chunk grid is anchored at document position 0, so a prefill may
stop anywhere and decoding resets at the same boundaries as training. Everything in float32
(§8.3: the official code casts the scan output to bf16; keeping float32 only helps). No q/k norm
and no short convolution (§8.7).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.common import doc_starts, param, real_mask, token_positions
from layers.linear import Dense
from layers.rope import apply_rope
from pallas_kernels.rat import rat as rat_op

Array = jax.Array


@struct.dataclass
class RATState:
    k_sum: Array   # [B, S, H, d] float32 chunk keys, RoPE'd at their chunk index
    v_sum: Array   # [B, S, H, d] float32 chunk values
    k_run: Array   # [B, H, d] float32 running key of the current chunk (before RoPE)
    v_run: Array   # [B, H, d] float32 running value of the current chunk
    pos: Array     # [B] int32 position of the next token in its document

    @property
    def slots(self) -> int:
        return self.k_sum.shape[1]


def gate_bias_init(key: Array, dim: int, chunk: int) -> Array:
    """b_f = log u, u ~ U(1, L-1) (§7), so sigmoid(b_f) is in [1/2, (L-1)/L]; 0 for L <= 2, where
    U(1, L-1) is degenerate (§7, §11: the official code leaves it uninitialised for L = 1)."""
    if chunk <= 2:
        return jnp.zeros((dim,), jnp.float32)
    return jnp.log(jax.random.uniform(key, (dim,), jnp.float32, 1.0, float(chunk - 1)))


def tile_groups(a: Array, n_heads: int, head_dim: int) -> Array:
    """[B, T, G d] -> [B, T, H, d] by tiling H / G copies (§3.4): head h uses group h mod G (not
    Llama's h // (H / G), §8.2)."""
    B, T, Gd = a.shape
    return jnp.tile(a, (1, 1, n_heads * head_dim // Gd)).reshape(B, T, n_heads, head_dim)


def rat_mixer_flops(dim: int, n_heads: int, n_groups: int, chunk: int, seq_len: int) -> float:
    """Forward FLOPs per token of `RATMixer` (§3, §5.3; 2 per multiply-add, the convention of
    `zoo.lm`): W_in [D, 3D + 2 G d], W_out [D, D], the recurrence over the 2D key and value
    channels (the gate product, the input product and the add: 3 each) and the attention over
    ceil(T / L) chunk slots per query (the running state being the current chunk's slot, no
    causal halving): scores and values, 4 H d each. Sigmoids, RoPE and the output gate are
    elementwise: not counted."""
    D, H, G = dim, n_heads, n_groups
    d = D // H
    slots = math.ceil(seq_len / chunk)
    return 2.0 * D * (3 * D + 2 * G * d) + 2.0 * D * D + 3.0 * 2 * D + 4.0 * H * d * slots


def rat_mixer_count(dim: int, n_heads: int, n_groups: int) -> int:
    """Parameters of `RATMixer`: W_in, b_f and W_out (§3; the block adds its RMSNorm's D)."""
    d = dim // n_heads
    return dim * (3 * dim + 2 * n_groups * d) + dim + dim * dim


class RATMixer(nnx.Module):
    """RAT with `n_heads` heads of width dim / n_heads, `n_groups` query/key groups and chunk
    `chunk` (part of the model). pe: "inter_rope" (RoPE over chunk indices, §3.7) or "none"
    (NoPE, §4.2). `max_len` sizes the decode cache (ceil(max_len / chunk) slots). `impl` chooses
    the `rat` op's form (neither changes the function)."""

    def __init__(self, dim: int, n_heads: int, n_groups: int, chunk: int, *, rngs: nnx.Rngs,
                 pe: str = "inter_rope", rope_base: float = 10000.0, max_len: int = 4096,
                 std: float = 0.02, impl: str = "auto"):
        if dim % n_heads or n_heads % n_groups:
            raise ValueError(f"dim={dim} must split into n_heads={n_heads} heads, a multiple of "
                             f"n_groups={n_groups}")
        if pe not in ("inter_rope", "none"):
            raise ValueError(f"pe must be 'inter_rope' or 'none', got {pe!r}")
        self.dim, self.n_heads, self.n_groups, self.chunk = dim, n_heads, n_groups, chunk
        self.head_dim = dim // n_heads
        self.pe, self.rope_base, self.max_len, self.impl = pe, rope_base, max_len, impl
        gd = n_groups * self.head_dim
        self.w_in = Dense(dim, 3 * dim + 2 * gd, rngs=rngs, axes=("embed", "heads"), std=std)
        self.b_f = param(gate_bias_init(rngs.params(), dim, chunk), ("heads",))
        self.w_out = Dense(dim, dim, rngs=rngs, axes=("heads", "embed"), std=std)

    def init_state(self, batch_size: int, max_len: int | None = None) -> RATState:
        S = -(-(max_len or self.max_len) // self.chunk)
        z = jnp.zeros((batch_size, self.n_heads, self.head_dim), jnp.float32)
        zs = jnp.zeros((batch_size, S, self.n_heads, self.head_dim), jnp.float32)
        return RATState(k_sum=zs, v_sum=zs, k_run=z, v_run=z,
                        pos=jnp.zeros((batch_size,), jnp.int32))

    def rotate(self, x: Array, chunk_pos: Array) -> Array:
        return apply_rope(x, chunk_pos, base=self.rope_base)

    def __call__(self, x: Array, state: RATState | None = None, *, mask=None, segment_ids=None,
                 context=None, deterministic: bool = True, key=None):
        B, T, D = x.shape
        fresh = state is None
        if fresh:
            state = self.init_state(B, max(T, self.max_len))
        mask = real_mask(mask, B, T)
        pos, doc, next_pos = token_positions(state.pos, doc_starts(segment_ids, B, T), mask)
        if not isinstance(next_pos, jax.core.Tracer):
            need = -(-int(jnp.max(next_pos)) // self.chunk)
            if need > state.slots:
                raise ValueError(f"RAT cache overrun: {need} chunks for a cache of "
                                 f"{state.slots} slots (max_len / chunk)")
        H, d, gd = self.n_heads, self.head_dim, self.n_groups * self.head_dim
        h = self.w_in(x)
        z, xv, g = h[..., :D], h[..., D:2 * D], h[..., 2 * D:3 * D]
        q = tile_groups(h[..., 3 * D:3 * D + gd], H, d)
        k = tile_groups(h[..., 3 * D + gd:], H, d)
        f = jax.nn.sigmoid(g.astype(jnp.float32) + self.b_f[...].astype(jnp.float32))
        rotate = self.rotate if self.pe == "inter_rope" else None
        q = q.astype(jnp.float32)
        if rotate is not None:
            q = rotate(q, pos // self.chunk)
        y, carry = rat_op(q, k, xv.reshape(B, T, H, d), f.reshape(B, T, H, d),
                          (state.k_sum, state.v_sum, state.k_run, state.v_run),
                          chunk=self.chunk, pos=pos, doc=doc, mask=mask, rotate=rotate,
                          fresh=fresh, impl=self.impl)
        y = jax.nn.sigmoid(z.astype(jnp.float32)) * y.reshape(B, T, D)
        out = self.w_out(y.astype(x.dtype))
        new = RATState(k_sum=carry[0], v_sum=carry[1], k_run=carry[2], v_run=carry[3],
                       pos=next_pos)
        return out, new, {}
