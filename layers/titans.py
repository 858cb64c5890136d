"""Titans' hosts (specs/titans.md §3.3–3.6): persistent memory, MAC, MAG, MAL around ANY memory.

A host takes its memory mixer as an argument: a built `layers.memory.NeuralMemory` (or a
subclass: the ATLAS / Miras memories plug in unchanged) or a factory `rngs -> memory`, called
where the host draws the memory's parameters. Attention dims, window, RoPE base, persistent
count, eps, `impl` and `block` are explicit arguments.

* `PrefixedMemory` (MAG, MAL; §3.3): the memory's input stream starts with N_p learned persistent
  tokens P. `init_state` is the state after them (it depends on parameters); a packed document
  start returns the memory to that state (memory W, S, anchor, the conv inputs of P, position
  N_p).
* `MAGMixer` (§3.5): sliding-window attention with the persistent prefix P (always visible,
  unrotated) in parallel with the memory on [P; x], combined by RMSNorm(y) * sigmoid(RMSNorm(m)).
* `MACMixer` (§3.4 and its contract notes): segments of C tokens of x (the memory chunk b
  divides C); retrieval h = W_h M_{W_start}(q(x)), attention over [P; h_{<=i}; x_{<=i}] of the
  current segment (the position-aligned mask: h_j carries x_j's position), memory written from
  the attention output y, output RMSNorm(y) * sigmoid(RMSNorm(m)).
* `MALMixer` (§3.6, the paper's literal form): x~ = [P; x], y = LMM(x~), o = SWA(y), the
  attention reading the memory's outputs at the persistent positions too.
The spec's chosen MAL layout (Samba style) needs no mixer of its own: alternating blocks of a
`PrefixedMemory` and a plain `layers.attention.Attention` (no prefix).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from layers.attention import Attention, attention_mixer_flops
from layers.common import doc_starts, normal, param, real_mask, token_positions
from layers.linear import Dense
from layers.memory import NeuralMemoryLayerState
from layers.norms import rms_norm
from layers.rope import apply_rope
from pallas_kernels.attention import attention as attention_op
from pallas_kernels.neural_memory import read as memory_read

Array = jax.Array
Memory = nnx.Module | Callable[[nnx.Rngs], nnx.Module]
"""A built memory mixer (`layers.memory.NeuralMemory` or a subclass) or a factory `rngs -> it`."""


def _built(memory: Memory, rngs: nnx.Rngs) -> nnx.Module:
    return memory if isinstance(memory, nnx.Module) else memory(rngs)


def _persistent(n_persistent: int, dim: int, rngs: nnx.Rngs, std: float) -> nnx.Param:
    """N_p learned persistent tokens P [N_p, D] (titans.md §3.3)."""
    return param(normal(rngs.params(), (n_persistent, dim), std), (None, "embed"))


def gate_combine(y, m, w_y, w_m, eps):
    """RMSNorm_y(y) * sigmoid(RMSNorm_m(m)) (titans.md §8 item 8)."""
    return rms_norm(y, w_y, eps) * jax.nn.sigmoid(rms_norm(m, w_m, eps))


# ----------------------------------------------------------------------------- FLOPs
# Forward FLOPs per token of the hosts in the convention of `zoo.lm` (2 per multiply-add; norms,
# gates, RoPE, softmax and masks are elementwise), around a memory whose own forward FLOPs per
# token (`memory`, e.g. `layers.memory_counts.neural_memory_flops`) the caller supplies.


def prefixed_memory_flops(memory: float, *, n_persistent: int, seq_len: int) -> float:
    """Forward FLOPs per token of `PrefixedMemory` on a sequence of `seq_len` tokens: the
    memory on every token, plus its write of the N_p persistent tokens that every call does
    (`init_state`), counted once per sequence: (1 + N_p / seq_len) × memory."""
    return memory * (1.0 + n_persistent / seq_len)


def mal_mixer_flops(memory: float, *, dim: int, n_heads: int, keys: int, n_persistent: int,
                    seq_len: int) -> float:
    """Forward FLOPs per token of `MALMixer` (titans.md §3.6, literal): the prefixed memory
    (`prefixed_memory_flops`; its read of P gives y_P), the attention over `keys` keys per query
    (the N_p prefix ones included; `attention_mixer_flops`) and the prefix keys and values
    W_k y_P, W_v y_P that a call computes once (counted once per sequence)."""
    D, Np = dim, n_persistent
    attn = attention_mixer_flops(D, n_heads, n_heads, D // n_heads, keys)
    return (prefixed_memory_flops(memory, n_persistent=Np, seq_len=seq_len) + attn
            + 2 * 2.0 * Np * D * D / seq_len)


def mag_mixer_flops(memory: float, *, dim: int, n_heads: int, keys: int, n_persistent: int,
                    seq_len: int) -> float:
    """Forward FLOPs per token of `MAGMixer` (titans.md §3.5): the same pieces as
    `mal_mixer_flops` (the memory on [P; x] and the attention with N_p persistent keys W_k P,
    W_v P, here on x in parallel rather than on the memory's outputs) and W_o."""
    return mal_mixer_flops(memory, dim=dim, n_heads=n_heads, keys=keys,
                           n_persistent=n_persistent, seq_len=seq_len) + 2.0 * dim * dim


def mac_pieces(seq_len: int, segment: int) -> int:
    """Segment pieces the MAC forward scans over for a call of `seq_len` tokens
    (`MACMixer.__call__` without packed resets: a call may start mid-segment, so one piece more
    than whole segments unless every token is its own piece); each piece is padded to C."""
    C = segment
    return min(seq_len, -(-(seq_len + C - 1) // C))


def mac_mixer_flops(memory: float, retrieval: float, *, dim: int, n_heads: int, segment: int,
                    n_persistent: int, retrieval_dim: int, seq_len: int) -> float:
    """Forward FLOPs per token of `MACMixer` (titans.md §3.4) on a call of `seq_len` tokens, as
    the implementation pads it: `mac_pieces` pieces of C = `segment` tokens (padding included),
    each doing per token the retrieval (`retrieval`: the memory's query path and a read without
    write; `layers.memory_counts.memory_qkv_flops` + `memory_read_flops`), W_h [retrieval_dim, D], the
    attention projections W_q x, W_k [h; x], W_v [h; x] and W_o, the attention over the
    N_p + 2C + 2C keys [P; cache; h; x] (`attention_mixer_flops`; the cache's 2C slots are
    computed and masked in a fresh call), and the memory written from y (`memory`); and per
    piece the persistent keys and values W_k P, W_v P (unbatched; counted once per sequence)."""
    D, C, Np = dim, segment, n_persistent
    pieces = mac_pieces(seq_len, C)
    keys = Np + 4 * C
    per_token = (retrieval + 2.0 * retrieval_dim * D
                 + attention_mixer_flops(D, n_heads, n_heads, D // n_heads, keys)
                 + 2 * 2.0 * D * D + memory)
    per_piece = 2 * 2.0 * Np * D * D
    return pieces * (C * per_token + per_piece) / seq_len


# ----------------------------------------------------------------------------- persistent prefix


class PrefixedMemory(nnx.Module):
    """A memory whose input stream starts with N_p learned persistent tokens P (MAG, MAL;
    titans.md §3.3).

    `init_state(B)` is the state after writing P (memory, conv cache, position N_p), so the chunk
    grid counts from the first persistent token; outputs at P are never produced. [choice] A
    memory with an Omega window c > 1 (ATLAS) keeps P in its weights but not in its window: the
    window buffer is emptied after P, so the first c - 1 tokens of x sum surprises over x only,
    exactly as after a packed document start (which returns to this state).
    """

    def __init__(self, memory: Memory, *, dim: int, n_persistent: int, rngs: nnx.Rngs,
                 init_std: float = 0.02):
        self.memory = _built(memory, rngs)
        self.persistent = _persistent(n_persistent, dim, rngs, init_std)

    def after_prefix(self, batch_size: int):
        """(the memory's outputs at the persistent positions [B, N_p, D], the state after P).
        Both are input-independent: the memory reads and writes P from its initial state."""
        st = self.memory.init_state(batch_size)
        P = jnp.broadcast_to(self.persistent[...], (batch_size,) + self.persistent.shape)
        if self.persistent.shape[0] == 0:
            return P, st
        y, st, _ = self.memory(P, st)
        if st.mem.win_valid.size:      # an Omega window (c > 1) starts at the first token of x
            st = st.replace(mem=st.mem.replace(win_valid=jnp.zeros_like(st.mem.win_valid)))
        return y, st

    def init_state(self, batch_size: int, max_len: int | None = None) -> NeuralMemoryLayerState:
        return self.after_prefix(batch_size)[1]

    def __call__(self, x, state=None, *, mask=None, segment_ids=None, context=None,
                 deterministic: bool = True, key=None):
        B = x.shape[0]
        if state is None:
            state = self.init_state(B)
        # a document start returns to the state after P (positions continue from N_p)
        reset_state = self.init_state(B) if segment_ids is not None else None
        return self.memory(x, state, mask=mask, segment_ids=segment_ids, reset_state=reset_state)


# ----------------------------------------------------------------------------- MAG


class MAGMixer(nnx.Module):
    """Memory as a gate (titans.md §3.5): sliding-window attention (`n_heads` heads of
    dim // n_heads, window W: W + 1 keys) with the persistent prefix P (always visible,
    unrotated) in parallel with the memory on [P; x]; o = W_o(RMSNorm(y) * sigmoid(RMSNorm(m)))."""

    def __init__(self, memory: Memory, *, dim: int, n_heads: int, window: int, n_persistent: int,
                 rngs: nnx.Rngs, rope_base: float = 10000.0, max_len: int = 2048,
                 norm_eps: float = 1e-6, init_std: float = 0.02, impl: str = "auto",
                 block: int = 128):
        self.eps = norm_eps
        self.attn = Attention(dim, n_heads, n_heads, dim // n_heads, rngs=rngs,
                              rope_base=rope_base, window=window, max_len=max_len, std=init_std,
                              impl=impl, block=block)
        self.mem = PrefixedMemory(memory, dim=dim, n_persistent=n_persistent, rngs=rngs,
                                  init_std=init_std)
        self.norm_y = param(jnp.ones((dim,), jnp.float32), ("norm",))
        self.norm_m = param(jnp.ones((dim,), jnp.float32), ("norm",))
        self.wo = Dense(dim, dim, rngs=rngs, axes=("embed", "embed"), std=init_std)

    def init_state(self, batch_size: int, max_len: int | None = None):
        return {"attn": self.attn.init_state(batch_size, max_len),
                "mem": self.mem.init_state(batch_size)}

    def persistent_kv(self, batch_size: int):
        P = self.mem.persistent[...]
        at = self.attn
        ek = at.wk(P).reshape(1, P.shape[0], at.n_kv_heads, at.head_dim)
        ev = at.wv(P).reshape(1, P.shape[0], at.n_kv_heads, at.head_dim)
        shape = (batch_size,) + ek.shape[1:]
        return jnp.broadcast_to(ek, shape), jnp.broadcast_to(ev, shape), None

    def __call__(self, x, state=None, *, mask=None, segment_ids=None, context=None,
                 deterministic: bool = True, key=None):
        if state is None:
            state = self.init_state(x.shape[0])
        m, mem_state, _ = self.mem(x, state["mem"], mask=mask, segment_ids=segment_ids)
        y, attn_state, _ = self.attn(x, state["attn"], mask=mask, segment_ids=segment_ids,
                                     extra_kv=self.persistent_kv(x.shape[0]))
        o = gate_combine(y, m, self.norm_y[...], self.norm_m[...], self.eps)
        return self.wo(o), {"attn": attn_state, "mem": mem_state}, {}


# ----------------------------------------------------------------------------- MAL (literal)


class MALMixer(nnx.Module):
    """Memory as a layer in the paper's literal form (titans.md §3.6): x~ = [P; x], y = LMM(x~),
    o = SWA(y), one mixer. The sliding-window attention (`n_heads` heads of dim // n_heads,
    W + 1 keys, RoPE on the x positions) reads the memory's outputs y at every position of x~:
    its outputs y_P at the N_p persistent positions are an always-visible, unrotated prefix of
    keys (input-independent — the memory's read of P from its initial state — so the state keeps
    their keys and values, and a packed document start needs no new ones); outputs at P are
    dropped. The attention takes y as the memory returns it (its per-head norm, gate and W_O;
    the paper names no norm in between).

    `zoo.titans` offers this as `mal_layout="literal"` beside the Samba-style layout the spec
    chose (alternating memory and attention blocks, the attention without any prefix)."""

    def __init__(self, memory: Memory, *, dim: int, n_heads: int, window: int, n_persistent: int,
                 rngs: nnx.Rngs, rope_base: float = 10000.0, max_len: int = 2048,
                 init_std: float = 0.02, impl: str = "auto", block: int = 128):
        self.mem = PrefixedMemory(memory, dim=dim, n_persistent=n_persistent, rngs=rngs,
                                  init_std=init_std)
        self.attn = Attention(dim, n_heads, n_heads, dim // n_heads, rngs=rngs,
                              rope_base=rope_base, window=window, max_len=max_len, std=init_std,
                              impl=impl, block=block)

    def init_state(self, batch_size: int, max_len: int | None = None):
        y_p, mem = self.mem.after_prefix(batch_size)
        at, Np = self.attn, y_p.shape[1]
        heads = lambda a: a.reshape(batch_size, Np, at.n_kv_heads, at.head_dim)  # noqa: E731
        return {"attn": at.init_state(batch_size, max_len), "mem": mem,
                "prefix_k": heads(at.wk(y_p)), "prefix_v": heads(at.wv(y_p))}

    def __call__(self, x, state=None, *, mask=None, segment_ids=None, context=None,
                 deterministic: bool = True, key=None):
        if state is None:
            state = self.init_state(x.shape[0])
        y, mem_state, _ = self.mem(x, state["mem"], mask=mask, segment_ids=segment_ids)
        o, attn_state, _ = self.attn(y, state["attn"], mask=mask, segment_ids=segment_ids,
                                     extra_kv=(state["prefix_k"], state["prefix_v"], None))
        return o, dict(state, attn=attn_state, mem=mem_state), {}


# ----------------------------------------------------------------------------- MAC


def segment_pieces(pos, starts, real, C: int, NP: int):
    """Cut each row into pieces that lie inside one segment of C tokens (segments start at
    positions 0, C, 2C, ... of each document): start index [B, NP], length [B, NP], count [B]."""
    B, T = pos.shape
    t = jnp.arange(T)[None, :]
    new = real & ((t == 0) | starts | (pos % C == 0))
    pidx = jnp.where(real, jnp.cumsum(new.astype(jnp.int32), axis=1) - 1, NP)
    b = jnp.arange(B)[:, None]
    start = jnp.full((B, NP), T, jnp.int32).at[b, pidx].min(jnp.broadcast_to(t, (B, T)),
                                                             mode="drop")
    length = jnp.zeros((B, NP), jnp.int32).at[b, pidx].add(1, mode="drop")
    count = jnp.max(jnp.where(real, pidx + 1, 0), axis=1)
    return jnp.minimum(start, T - 1), length, count


class MACMixer(nnx.Module):
    """Memory as context (titans.md §3.4 and its contract notes).

    Per segment of C tokens with memory state W_start at the segment start:
      h = W_h M_{W_start}(q(x))                                  (retrieval, no write)
      y = Attn([P; h; x])[x positions]  query x_i sees P, h_j and x_j for j <= i (h_j has x_j's
                                        RoPE position, P is unrotated and always visible)
      m = memory(y)                     (write from y with chunk b | C, per-token read after write)
      o = RMSNorm(y) * sigmoid(RMSNorm(m))
    The call is a scan over segment pieces (a call may start or stop mid-segment); the KV cache
    holds the current segment's h and x keys (2C slots) and is cleared at every segment start;
    memory state and both conv caches (query path on x, memory paths on y) carry over.

    The memory must offer what retrieval needs beside the mixer contract (a `NeuralMemory` or a
    subclass): `qkv`, `rule`, `outer`, its `conv`, and its state's `mem.W`. `max_resets`: static
    bound on packed document starts per row beyond the segment pieces (more falls back exactly).
    """

    def __init__(self, memory: Memory, *, dim: int, n_heads: int, segment: int,
                 n_persistent: int, rngs: nnx.Rngs, rope_base: float = 10000.0,
                 norm_eps: float = 1e-6, init_std: float = 0.02, max_resets: int = 4,
                 impl: str = "auto", block: int = 128):
        self.C, self.eps, self.max_resets = segment, norm_eps, max_resets
        D, A = dim, n_heads
        self.A, self.dh, self.rope_base = A, D // A, rope_base
        self.impl, self.block = impl, block
        std = init_std
        self.mem = _built(memory, rngs)
        mcfg = self.mem.cfg
        self.w_h = Dense(mcfg.n_heads * mcfg.hd, D, rngs=rngs, axes=("heads", "embed"), std=std)
        self.wq = Dense(D, D, rngs=rngs, axes=("embed", "heads"), std=std)
        self.wk = Dense(D, D, rngs=rngs, axes=("embed", "heads"), std=std)
        self.wv = Dense(D, D, rngs=rngs, axes=("embed", "heads"), std=std)
        self.wo = Dense(D, D, rngs=rngs, axes=("heads", "embed"), std=std)
        self.persistent = _persistent(n_persistent, D, rngs, std)
        self.norm_y = param(jnp.ones((D,), jnp.float32), ("norm",))
        self.norm_m = param(jnp.ones((D,), jnp.float32), ("norm",))

    def init_state(self, batch_size: int, max_len: int | None = None):
        B, S = batch_size, 2 * self.C
        mem = self.mem.init_state(B)
        return {"mem": mem, "conv_x": self.mem.conv.init_state(B), "w_start": mem.mem.W,
                "k": jnp.zeros((B, S, self.A, self.dh), jnp.float32),
                "v": jnp.zeros((B, S, self.A, self.dh), jnp.float32),
                "kpos": jnp.zeros((B, S), jnp.int32), "kvalid": jnp.zeros((B, S), bool)}

    def _retrieve(self, w_start, q):
        """M_{W_start}(q) per token and head, no write: q [B, C, H, dk] -> [B, C, H, dv]."""
        rule, outer = self.mem.rule(), self.mem.outer()
        per_tok = jax.vmap(lambda o, W, qq: memory_read(rule, o, W, qq), in_axes=(None, None, 0))
        per_head = jax.vmap(per_tok, in_axes=(0, 0, 1), out_axes=1)
        return jax.vmap(per_head, in_axes=(None, 0, 0))(outer, w_start, q)

    def _segment_piece(self, st, x, mask, reset, pos0):
        """One piece (all tokens in one segment, right padded): x [B, C, D], mask [B, C]."""
        B, C, D = x.shape
        fresh = self.init_state(B)
        sel = lambda c, a, b: jax.tree.map(
            lambda u, w: jnp.where(c.reshape((B,) + (1,) * (u.ndim - 1)), u, w), a, b)
        live = mask.any(axis=1)
        st0 = st
        st = sel(reset & live, fresh, st)
        seg_start = live & (pos0 % C == 0)
        st = dict(st, w_start=sel(seg_start, st["mem"].mem.W, st["w_start"]),
                  kvalid=st["kvalid"] & ~seg_start[:, None])
        # 1. retrieval with the segment-start memory (query path on x, its own conv cache)
        q_x, _, _, conv_x = self.mem.qkv(x, st["conv_x"], mask, None)
        h = self.w_h(self._retrieve(st["w_start"], q_x).reshape(B, C, -1).astype(x.dtype))
        # 2. attention over [P; cache; h; x] with the position-aligned causal mask
        pos = pos0[:, None] + jnp.arange(C, dtype=jnp.int32)[None, :]
        heads = lambda a: a.reshape(B, -1, self.A, self.dh)
        rope = lambda a: apply_rope(heads(a), pos, base=self.rope_base)
        q = rope(self.wq(x))
        k_h, v_h, k_x, v_x = rope(self.wk(h)), heads(self.wv(h)), rope(self.wk(x)), heads(self.wv(x))
        P = self.persistent[...]
        Np = P.shape[0]
        kv_p = lambda a: jnp.broadcast_to(a.reshape(1, Np, self.A, self.dh), (B, Np, self.A, self.dh))
        k_p, v_p = kv_p(self.wk(P)), kv_p(self.wv(P))
        ks = jnp.concatenate([k_p, st["k"].astype(x.dtype), k_h, k_x], axis=1)
        vs = jnp.concatenate([v_p, st["v"].astype(x.dtype), v_h, v_x], axis=1)
        zp = jnp.zeros((B, Np), jnp.int32)
        kpos = jnp.concatenate([zp, st["kpos"], pos, pos], axis=1)
        kval = jnp.concatenate([jnp.ones((B, Np), bool), st["kvalid"], mask, mask], axis=1)
        kalw = jnp.concatenate([jnp.ones((B, Np), bool), jnp.zeros((B, 2 * C + 2 * C), bool)], 1)
        grp = jnp.zeros((B, ks.shape[1]), jnp.int32)
        o = attention_op(q, ks, vs, q_pos=pos, k_pos=kpos, q_group=jnp.zeros((B, C), jnp.int32),
                         k_group=grp, k_valid=kval, k_always=kalw, causal=True,
                         impl=self.impl, block=self.block)
        y = self.wo(o.reshape(B, C, D))
        # 3-4. write the memory from y, per-token read after the write; gate
        m, mem_state, _ = self.mem(y, st["mem"], mask=mask)
        out = gate_combine(y, m, self.norm_y[...], self.norm_m[...], self.eps)
        # cache this piece's keys: h at slot 2*(pos mod C), x at slot 2*(pos mod C) + 1
        slot = jnp.where(mask, 2 * (pos % C), 2 * C)
        bi = jnp.arange(B)[:, None]
        put = lambda arr, a, b_: arr.at[bi, slot].set(a, mode="drop").at[bi, slot + 1].set(
            b_, mode="drop")
        new = dict(st, mem=mem_state, conv_x=conv_x, k=put(st["k"], k_h, k_x),
                   v=put(st["v"], v_h, v_x), kpos=put(st["kpos"], pos, pos),
                   kvalid=put(st["kvalid"], mask, mask))
        return sel(live, new, st0), out

    def __call__(self, x, state=None, *, mask=None, segment_ids=None, context=None,
                 deterministic: bool = True, key=None):
        B, T, D = x.shape
        C = self.C
        if state is None:
            state = self.init_state(B)
        real = real_mask(mask, B, T)
        starts = doc_starts(segment_ids, B, T) & real
        pos, _, _ = token_positions(state["mem"].pos, starts, real)

        def run(NP):
            start, length, _ = segment_pieces(pos, starts, real, C, NP)
            idx = jnp.minimum(start[:, :, None] + jnp.arange(C)[None, None, :], T - 1)  # [B,NP,C]
            pmask = jnp.arange(C)[None, None, :] < length[:, :, None]
            xp = jnp.take_along_axis(x[:, None], idx[..., None], axis=2)  # [B, NP, C, D]
            b = jnp.arange(B)[:, None]
            resets = starts[b, start] & (length > 0)
            pos0 = pos[b, start]

            def body(st, inp):
                xx, mm, rr, pp = inp
                return self._segment_piece(st, xx, mm, rr, pp)

            mv = lambda a: jnp.moveaxis(a, 1, 0)
            st, outs = jax.lax.scan(body, state, (mv(xp), mv(pmask), mv(resets), mv(pos0)))
            outs = jnp.moveaxis(outs, 0, 1)  # [B, NP, C, D]
            dest = jnp.where(pmask, idx, T).reshape(B, -1)
            y = jnp.zeros((B, T, D), outs.dtype).at[b, dest].set(outs.reshape(B, -1, D),
                                                                 mode="drop")
            return y, st

        NP = min(T, -(-(T + C - 1) // C))
        if segment_ids is None:
            y, st = run(NP)
        else:
            NPr = min(T, NP + self.max_resets)
            _, _, count = segment_pieces(pos, starts, real, C, NPr)
            if NPr == T:
                y, st = run(T)
            else:
                y, st = jax.lax.cond(jnp.all(count <= NPr), lambda: run(NPr), lambda: run(T))
        return y, st, {}
