"""MoM's token reordering (specs/mom.md §4.1): every token copy goes to its memory's segment.

Each real token t has S slots (its k routed memories, plus the shared memory when it is on); a
slot's copy belongs to memory `mem[b, t, s]`. Per batch row the copies are placed in the order
of the key (memory, t) (the stable sort of §4.1 and §6.2, computed as each copy's rank among
the earlier copies of its memory; invalid copies, i.e. masked tokens, go nowhere), so each
memory's tokens form one time-ordered contiguous segment. Each segment is
right padded to a multiple of the chunk C and segments are laid end to end:

    row layout  | mem 0: C | C | C(pad) | mem 2: C(pad) | mem 3: C | ... | trailing empty chunks |

The layout length is static: n C slots with n = ceil((S T + min(G, S T)(C - 1)) / C) chunks
(every non-empty memory adds fewer than C pad slots), i.e. ~ S T / C + G chunks: the work grows
with the slots per token (k + shared), not with the number of memories G (the padded
[G, capacity = T] layout would cost G / S times more). Every chunk holds the tokens of exactly
one memory, anchored at that memory's own first token, so a memory's chunk partition does not
depend on the other memories' counts. Trailing chunks past the last segment (all pads) carry the
memory id G (a scratch slot).

Document starts: `reset` marks a layout slot whose token lies in a later document than the
memory's previous copy (or than the carried state, for a segment's first copy); `stale` marks the
memories whose last copy precedes the call's last document start (their state must be cleared).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array


@struct.dataclass
class Layout:
    token: Array       # [B, L] int32 source token t of each slot (0 at pads)
    valid: Array       # [B, L] bool: a real copy (False: pad)
    reset: Array       # [B, L] bool: the slot starts a new document for its memory
    chunk_mem: Array   # [B, n] int32 memory of each chunk (G: trailing, all pads)
    copy_pos: Array    # [B, T, S] int32 slot of each copy (L for masked tokens)
    stale: Array       # [B, G] bool: memory whose state a later document start clears


def n_chunks(T: int, S: int, G: int, C: int) -> int:
    """Static number of chunks of the layout (module doc)."""
    N = S * T
    return -(-(N + min(G, N) * (C - 1)) // C)


def make_layout(mem: Array, valid: Array, doc: Array, *, n_mem: int, chunk: int) -> Layout:
    """mem, valid [B, T, S] (memory id of each copy, whether the token is real); doc [B, T]
    int32 documents started inside the call up to t (0: the carried document).

    A copy's rank in its memory's segment is the number of earlier valid copies of that memory
    (a token never selects a memory twice), so the time-ordered placement needs no sort; the
    slots' source copies are then one scatter, everything else gathers."""
    B, T, S = mem.shape
    G, C = n_mem, chunk
    N = T * S
    n = n_chunks(T, S, G, C)
    L = n * C
    memf = jnp.where(valid, mem, 0).reshape(B, N).astype(jnp.int32)
    vf = valid.reshape(B, N)
    onehot = jax.nn.one_hot(memf, G, dtype=jnp.int32) * vf[..., None]   # copies are t-major
    seen = jnp.cumsum(onehot, axis=1)                                     # [B, N, G]
    counts = seen[:, -1]                                                  # [B, G]
    rank = jnp.take_along_axis(seen, memf[..., None], axis=2)[..., 0] - 1
    padded = -(-counts // C) * C
    seg_end = jnp.cumsum(padded, axis=1)
    seg_start = seg_end - padded
    pos = jnp.where(vf, jnp.take_along_axis(seg_start, memf, axis=1) + rank, L)   # [B, N]
    src = jnp.full((B, L), -1, jnp.int32).at[jnp.arange(B)[:, None], pos].set(
        jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (B, N)), mode="drop")
    lvalid = src >= 0
    token = jnp.where(lvalid, src // S, 0)
    starts = jnp.arange(n, dtype=jnp.int32) * C
    chunk_mem = jnp.sum(seg_end[:, None, :] <= starts[None, :, None], axis=-1).astype(jnp.int32)
    # documents: a copy resets its memory when its document is later than the previous copy's
    # (the carried state's, document 0, for a segment's first copy)
    slot_mem = jnp.minimum(jnp.repeat(chunk_mem, C, axis=1), G - 1)
    first = jnp.arange(L)[None] == jnp.take_along_axis(seg_start, slot_mem, axis=1)
    sdoc = jnp.where(lvalid, jnp.take_along_axis(doc, token, axis=1), 0)
    prev = jnp.where(first, 0, jnp.concatenate([jnp.zeros((B, 1), sdoc.dtype), sdoc[:, :-1]], 1))
    reset = lvalid & (sdoc > prev)
    last = jnp.take_along_axis(sdoc, jnp.clip(seg_start + counts - 1, 0, L - 1), axis=1)
    last = jnp.where(counts > 0, last, 0)
    final_doc = jnp.max(jnp.where(valid[..., 0], doc, 0), axis=1)
    return Layout(token=token, valid=lvalid, reset=reset, chunk_mem=chunk_mem,
                  copy_pos=pos.reshape(B, T, S), stale=final_doc[:, None] > last)


def to_chunks(a: Array, n: int) -> Array:
    """[B, n C, ...] -> [n, B, C, ...] (the scan's leading axis)."""
    B, L = a.shape[:2]
    return jnp.moveaxis(a.reshape((B, n, L // n) + a.shape[2:]), 1, 0)


def from_chunks(a: Array) -> Array:
    """[n, B, C, ...] -> [B, n C, ...]."""
    n, B, C = a.shape[:3]
    return jnp.moveaxis(a, 0, 1).reshape((B, n * C) + a.shape[3:])


def gather_slots(x: Array, token: Array) -> Array:
    """x [B, T, ...] at the layout's source tokens: [B, L, ...]."""
    idx = token.reshape(token.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def gather_copies(o: Array, copy_pos: Array) -> Array:
    """Layout outputs o [B, L, ...] back at each copy: [B, T, S, ...] (0 for masked tokens)."""
    B, T, S = copy_pos.shape
    L = o.shape[1]
    pos = copy_pos.reshape(B, T * S)
    idx = jnp.minimum(pos, L - 1).reshape((B, T * S) + (1,) * (o.ndim - 2))
    out = jnp.take_along_axis(o, idx, axis=1)
    out = jnp.where((pos < L).reshape((B, T * S) + (1,) * (o.ndim - 2)), out, 0)
    return out.reshape((B, T, S) + o.shape[2:])
