"""Multi-head attention with GQA, RoPE, causal / sliding-window masks and an explicit KV cache.

The cache stores post-RoPE keys and raw values. With a sliding window of W it is a ring buffer of
W + 1 slots written at slot `idx mod (W + 1)`; otherwise it has `max_len` slots and a call that
would write past them is rejected (eagerly; under `jit`, callers such as `zoo.lm.generate` check
lengths up front, since a traced index cannot raise).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.common import doc_starts, real_mask, token_positions
from layers.linear import Dense
from layers.rope import apply_rope
from pallas_kernels.attention import attention as attention_op

Array = jax.Array


@struct.dataclass
class KVCache:
    k: Array          # [B, S, Hkv, d] post-RoPE keys
    v: Array          # [B, S, Hkv, d]
    slot_pos: Array   # [B, S] position of the key in its document (-1: empty)
    slot_doc: Array   # [B, S] document counter of the key
    pos: Array        # [B] position of the next token in its document
    doc: Array        # [B] document counter of the next token
    idx: Array        # [B] stream index of the next token (slots, length checks)

    @property
    def capacity(self) -> int:
        return self.k.shape[1]


def init_kv_cache(batch_size: int, slots: int, kv_heads: int, head_dim: int,
                  dtype=jnp.float32) -> KVCache:
    z = jnp.zeros((batch_size,), jnp.int32)
    return KVCache(
        k=jnp.zeros((batch_size, slots, kv_heads, head_dim), dtype),
        v=jnp.zeros((batch_size, slots, kv_heads, head_dim), dtype),
        slot_pos=jnp.full((batch_size, slots), -1, jnp.int32),
        slot_doc=jnp.zeros((batch_size, slots), jnp.int32), pos=z, doc=z, idx=z)


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def cache_write(cache: KVCache, k: Array, v: Array, pos: Array, doc: Array, mask: Array,
                next_pos: Array, window: int | None) -> KVCache:
    """Write the real tokens of a call (right padded) into the cache."""
    B, T = mask.shape
    S = cache.capacity
    n_real = mask.sum(axis=1).astype(jnp.int32)
    idx = cache.idx[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    if window is not None:
        # only the last W+1 real tokens are kept; older ones would collide in the ring
        keep = mask & (jnp.arange(T)[None, :] >= (n_real - S)[:, None])
        slot = idx % S
    else:
        if _concrete(cache.idx) and _concrete(n_real):
            need = int(jnp.max(cache.idx + n_real))
            if need > S:
                raise ValueError(f"KV cache overrun: {need} tokens for a cache of max_len {S}")
        keep = mask
        slot = idx
    slot = jnp.where(keep, slot, S)  # out of range: dropped
    b = jnp.arange(B)[:, None]
    upd = lambda arr, val: arr.at[b, slot].set(val.astype(arr.dtype), mode="drop")
    return KVCache(
        k=upd(cache.k, k), v=upd(cache.v, v), slot_pos=upd(cache.slot_pos, pos),
        slot_doc=upd(cache.slot_doc, doc), pos=next_pos,
        doc=jnp.where(n_real > 0, jnp.take_along_axis(doc, jnp.maximum(n_real - 1, 0)[:, None], 1)[:, 0], cache.doc),
        idx=cache.idx + n_real)


def call_positions(state: KVCache, mask, segment_ids, B: int, T: int):
    """(real mask [B, T], positions [B, T], document ids [B, T], next position [B]) of a call
    that continues `state`: positions restart at document starts (packed rows), document ids
    count on from the cache's."""
    mask = real_mask(mask, B, T)
    starts = doc_starts(segment_ids, B, T)
    pos, dcount, next_pos = token_positions(state.pos, starts, mask)
    return mask, pos, state.doc[:, None] + dcount, next_pos


def cached_keys(state: KVCache, k, v, pos, doc, mask, fresh: bool):
    """(keys, values, positions, document ids, validity) a call attends over: the cache's slots
    followed by this call's tokens, or this call's alone when nothing was cached (`fresh`)."""
    if fresh:
        return k, v, pos, doc, mask
    return (jnp.concatenate([state.k.astype(k.dtype), k], axis=1),
            jnp.concatenate([state.v.astype(v.dtype), v], axis=1),
            jnp.concatenate([state.slot_pos, pos], axis=1),
            jnp.concatenate([state.slot_doc, doc], axis=1),
            jnp.concatenate([state.slot_pos >= 0, mask], axis=1))


def attention_mixer_flops(dim: int, n_heads: int, n_kv_heads: int, head_dim: int,
                          keys: int) -> float:
    """Forward FLOPs per token of `Attention` (specs/transformer.md §2.2; 2 per multiply-add, the
    convention of `zoo.lm`): the q, k, v projections [dim, (H + 2 Hkv) dh], the scores q.k and
    the weighted sum of values over `keys` keys per query for each of the H query heads, and the
    output projection [H dh, dim]. RoPE, masks, softmax, dropout and biases are elementwise: not
    counted."""
    H, Hkv, dh = n_heads, n_kv_heads, head_dim
    projections = 2.0 * dim * (H + 2 * Hkv) * dh + 2.0 * H * dh * dim
    return projections + 2.0 * H * keys * (dh + dh)


class Attention(nnx.Module):
    """Causal multi-head attention (GQA when n_kv_heads < n_heads) with an optional window.

    `rope_base=None` disables RoPE (learned-position presets). `extra_kv` lets a caller add keys
    that every query sees, unrotated, with an optional additive bias (persistent memory tokens,
    workspace slots).
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, *,
                 rngs: nnx.Rngs, rope_base: float | None = 10000.0, window: int | None = None,
                 max_len: int = 2048, qkv_bias: bool = False, out_bias: bool = False,
                 init: str = "normal", std: float = 0.02, out_std: float | None = None,
                 attn_dropout: float = 0.0, impl: str = "auto", block: int = 128):
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.rope_base, self.window, self.max_len = rope_base, window, max_len
        self.attn_dropout, self.impl, self.block = attn_dropout, impl, block
        mk = lambda o, ax: Dense(dim, o, rngs=rngs, use_bias=qkv_bias, axes=ax, init=init, std=std)
        self.wq = mk(n_heads * head_dim, ("embed", "heads"))
        self.wk = mk(n_kv_heads * head_dim, ("embed", "kv_heads"))
        self.wv = mk(n_kv_heads * head_dim, ("embed", "kv_heads"))
        self.wo = Dense(n_heads * head_dim, dim, rngs=rngs, use_bias=out_bias,
                        axes=("heads", "embed"), init=init, std=out_std or std)

    def init_state(self, batch_size: int, max_len: int | None = None) -> KVCache:
        slots = max_len or self.max_len
        if self.window is not None:
            slots = min(slots, self.window + 1)
        return init_kv_cache(batch_size, slots, self.n_kv_heads, self.head_dim)

    def __call__(self, x: Array, state: KVCache | None = None, *, mask=None, segment_ids=None,
                 context=None, deterministic: bool = True, key=None,
                 extra_kv: tuple[Array, Array, Array | None] | None = None):
        B, T, _ = x.shape
        fresh = state is None
        if fresh:
            state = self.init_state(B)
        mask, pos, doc, next_pos = call_positions(state, mask, segment_ids, B, T)
        q = self.wq(x).reshape(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).reshape(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).reshape(B, T, self.n_kv_heads, self.head_dim)
        if self.rope_base is not None:
            q = apply_rope(q, pos, base=self.rope_base)
            k = apply_rope(k, pos, base=self.rope_base)
        new_state = cache_write(state, k, v, pos, doc, mask, next_pos, self.window)
        ks, vs, kpos, kdoc, kval = cached_keys(state, k, v, pos, doc, mask, fresh)
        kalw, kbias = None, None
        if extra_kv is not None:
            ek, ev, eb = extra_kv
            P = ek.shape[1]
            S = ks.shape[1]
            ks = jnp.concatenate([ek.astype(ks.dtype), ks], axis=1)
            vs = jnp.concatenate([ev.astype(vs.dtype), vs], axis=1)
            kpos = jnp.concatenate([jnp.zeros((B, P), jnp.int32), kpos], axis=1)
            kdoc = jnp.concatenate([jnp.zeros((B, P), jnp.int32), kdoc], axis=1)
            kval = jnp.concatenate([jnp.ones((B, P), bool), kval], axis=1)
            kalw = jnp.concatenate([jnp.ones((B, P), bool), jnp.zeros((B, S), bool)], axis=1)
            if eb is not None:
                kbias = jnp.concatenate([jnp.broadcast_to(eb, (B, eb.shape[1], P)),
                                         jnp.zeros((B, eb.shape[1], S), eb.dtype)], axis=2)
        drop_key = None if deterministic else key
        o = attention_op(q, ks, vs, q_pos=pos, k_pos=kpos, q_group=doc, k_group=kdoc,
                         k_valid=kval, k_always=kalw, k_bias=kbias, causal=True,
                         window=self.window, impl=self.impl, block=self.block,
                         dropout_rate=self.attn_dropout, dropout_key=drop_key)
        y = self.wo(o.reshape(B, T, self.n_heads * self.head_dim))
        return y, new_state, {}
