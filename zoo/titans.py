"""Titans (specs/titans.md): the LMM (memory-only) model and the MAC / MAG / MAL hybrids.

Registered: "titans_lmm", "titans_mac", "titans_mag", "titans_mal". Every block is pre-RMSNorm +
residual with a SwiGLU MLP (titans.md §3.1). The memory mixer is `layers.memory.NeuralMemory`
(the shared neural-memory layer); its chunk size `chunk` (b) is part of the model.

* LMM:  [NeuralMemory, MLP] x n_layers.
* MAC:  [MACMixer, MLP] x n_layers; segments of `segment` (C) tokens of x (b divides C);
        retrieval h = W_h M_{W_start}(q(x)), attention over [P; h_{<=i}; x_{<=i}] of the current
        segment (the position-aligned mask of §3.4: h_j carries x_j's position), memory written
        from the attention output y, output RMSNorm(y) * sigmoid(RMSNorm(m)).
* MAG:  [MAGMixer, MLP] x n_layers; sliding-window attention with the persistent prefix P and
        the memory on [P; x] in parallel, combined by RMSNorm(y) * sigmoid(RMSNorm(m)).
* MAL:  alternating [memory on [P; x], MLP] and [sliding-window attention with prefix P, MLP]
        (Samba style, §3.6).
For MAG / MAL the memory's input stream starts with the N_p persistent tokens: `init_state` is
the state after them (it depends on parameters); a packed document start returns the memory to
that state (memory W, S, anchor, the conv inputs of P, position N_p).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.attention import Attention
from layers.common import doc_starts, normal, param, real_mask, token_positions
from layers.embed import Embed
from layers.linear import Dense
from layers.memory import (NeuralMemory, NeuralMemoryConfig, NeuralMemoryLayerState,
                           neural_memory_param_count)
from layers.mlp import SwiGLU, llama_ffn_dim
from layers.norms import RMSNorm, rms_norm
from layers.rope import apply_rope
from pallas_kernels.attention import attention as attention_op
from pallas_kernels.neural_memory import read as memory_read
from zoo.lm import Block, CausalLM
from zoo.registry import ConformanceSpec, register

Array = jax.Array


@dataclass(frozen=True)
class TitansConfig:
    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 2                 # memory heads
    head_dim: int | None = None      # None: dim // n_heads
    attn_heads: int | None = None    # None: n_heads
    memory: str = "mlp"              # mlp | linear
    memory_depth: int = 2
    memory_expansion: int = 4
    chunk: int = 16                  # b: memory anchor chunk (part of the model)
    momentum: bool = True
    objective: str = "l2"
    lr_max: float | None = None
    segment: int = 64                # C: MAC segment length (multiple of chunk)
    window: int = 64                 # W: sliding window of MAG / MAL (W + 1 keys)
    n_persistent: int = 4            # N_p persistent memory tokens (MAC, MAG, MAL)
    ffn_dim: int | None = None
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02
    rope_base: float = 10000.0
    max_len: int = 2048              # attention KV-cache length where it is not windowed
    mem_impl: str = "auto"
    attn_impl: str = "auto"
    max_resets: int = 4
    compute_dtype: str = "float32"
    remat: str = "none"

    @property
    def hd(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def d_ff(self) -> int:
        return self.ffn_dim or llama_ffn_dim(self.dim, 256 if self.dim >= 512 else 32)

    @property
    def n_attn_heads(self) -> int:
        return self.attn_heads or self.n_heads

    def validate(self):
        if self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        if self.memory not in ("mlp", "linear"):
            raise ValueError(f"model.memory={self.memory!r} is not one of ('mlp', 'linear')")
        if self.segment % self.chunk:
            raise ValueError(f"model.segment={self.segment} is not a multiple of "
                             f"model.chunk={self.chunk}")
        if self.dim % self.n_attn_heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by the attention heads")

    def memory_config(self) -> NeuralMemoryConfig:
        return NeuralMemoryConfig(
            dim=self.dim, n_heads=self.n_heads, head_dim=self.head_dim, memory=self.memory,
            depth=self.memory_depth, expansion=self.memory_expansion, objective=self.objective,
            chunk=self.chunk, momentum=self.momentum, lr_max=self.lr_max,
            norm_eps=self.norm_eps, init_std=self.init_std, impl=self.mem_impl,
            max_resets=self.max_resets)


def _ffn(cfg: TitansConfig, rngs):
    return SwiGLU(cfg.dim, cfg.d_ff, rngs=rngs, std=cfg.init_std)


def _norm(cfg: TitansConfig):
    return RMSNorm(cfg.dim, eps=cfg.norm_eps)


def _lm(cfg: TitansConfig, blocks, rngs) -> CausalLM:
    embed = Embed(cfg.vocab_size, cfg.dim, rngs=rngs, std=cfg.init_std)
    head = None if cfg.tie_embeddings else Dense(cfg.dim, cfg.vocab_size, rngs=rngs,
                                                 axes=("embed", "vocab"), std=cfg.init_std)
    return CausalLM(embed=embed, blocks=blocks, final_norm=_norm(cfg), head=head,
                    compute_dtype=cfg.compute_dtype, remat=cfg.remat)


def _base_count(cfg: TitansConfig) -> int:
    D = cfg.dim
    emb = cfg.vocab_size * D * (1 if cfg.tie_embeddings else 2)
    return emb + D  # + final norm


def _block_count(cfg: TitansConfig, mixer: int) -> int:
    return mixer + 3 * cfg.dim * cfg.d_ff + 2 * cfg.dim


# ----------------------------------------------------------------------------- LMM


def lmm_param_count(cfg: TitansConfig) -> int:
    return _base_count(cfg) + cfg.n_layers * _block_count(
        cfg, neural_memory_param_count(cfg.memory_config()))


_TINY = dict(vocab_size=37, dim=16, n_layers=2, n_heads=2, init_std=0.1, ffn_dim=32)


@register("titans_lmm", config=TitansConfig, param_count=lmm_param_count,
          conformance=ConformanceSpec(
              config=TitansConfig(**_TINY, chunk=4),
              length=13, cuts=(1, 4, 6, 12),
              reference={"mem_impl": "reference"}, fast=({"mem_impl": "chunked"},)))
def build_titans_lmm(cfg: TitansConfig, rngs: nnx.Rngs) -> CausalLM:
    cfg.validate()
    mcfg = cfg.memory_config()
    blocks = [Block(NeuralMemory(mcfg, rngs=rngs), _norm(cfg), _ffn(cfg, rngs), _norm(cfg))
              for _ in range(cfg.n_layers)]
    return _lm(cfg, blocks, rngs)


# ----------------------------------------------------------------------------- persistent prefix


class PrefixedMemory(nnx.Module):
    """NeuralMemory whose input stream starts with N_p learned persistent tokens P (MAG, MAL).

    `init_state(B)` is the state after writing P (memory, conv cache, position N_p), so the chunk
    grid counts from the first persistent token; outputs at P are never produced.
    """

    def __init__(self, cfg: TitansConfig, *, rngs: nnx.Rngs):
        self.memory = NeuralMemory(cfg.memory_config(), rngs=rngs)
        self.persistent = param(normal(rngs.params(), (cfg.n_persistent, cfg.dim), cfg.init_std),
                                (None, "embed"))

    def init_state(self, batch_size: int, max_len: int | None = None) -> NeuralMemoryLayerState:
        st = self.memory.init_state(batch_size)
        if self.persistent.shape[0] == 0:
            return st
        P = jnp.broadcast_to(self.persistent[...], (batch_size,) + self.persistent.shape)
        return self.memory(P, st)[1]

    def __call__(self, x, state=None, *, mask=None, segment_ids=None, context=None,
                 deterministic: bool = True, key=None):
        B = x.shape[0]
        if state is None:
            state = self.init_state(B)
        # a document start returns to the state after P (positions continue from N_p)
        reset_state = self.init_state(B) if segment_ids is not None else None
        return self.memory(x, state, mask=mask, segment_ids=segment_ids, reset_state=reset_state)


def _gate_combine(y, m, w_y, w_m, eps):
    """RMSNorm_y(y) * sigmoid(RMSNorm_m(m)) (titans.md §8 item 8)."""
    return rms_norm(y, w_y, eps) * jax.nn.sigmoid(rms_norm(m, w_m, eps))


class MAGMixer(nnx.Module):
    """Memory as a gate (titans.md §3.5): sliding-window attention with the persistent prefix P
    (always visible, unrotated) in parallel with the memory on [P; x]."""

    def __init__(self, cfg: TitansConfig, *, rngs: nnx.Rngs):
        self.eps = cfg.norm_eps
        A = cfg.n_attn_heads
        self.attn = Attention(cfg.dim, A, A, cfg.dim // A, rngs=rngs, rope_base=cfg.rope_base,
                              window=cfg.window, max_len=cfg.max_len, std=cfg.init_std,
                              impl=cfg.attn_impl)
        self.mem = PrefixedMemory(cfg, rngs=rngs)
        self.norm_y = param(jnp.ones((cfg.dim,), jnp.float32), ("norm",))
        self.norm_m = param(jnp.ones((cfg.dim,), jnp.float32), ("norm",))
        self.wo = Dense(cfg.dim, cfg.dim, rngs=rngs, axes=("embed", "embed"), std=cfg.init_std)

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
        o = _gate_combine(y, m, self.norm_y[...], self.norm_m[...], self.eps)
        return self.wo(o), {"attn": attn_state, "mem": mem_state}, {}


def _mag_mixer_count(cfg: TitansConfig) -> int:
    D = cfg.dim
    attn = 4 * D * D
    return (attn + neural_memory_param_count(cfg.memory_config()) + cfg.n_persistent * D
            + 2 * D + D * D)


def mag_param_count(cfg: TitansConfig) -> int:
    return _base_count(cfg) + cfg.n_layers * _block_count(cfg, _mag_mixer_count(cfg))


_HYBRID = dict(_TINY, memory="linear", chunk=4, window=4, n_persistent=3, max_len=32)


@register("titans_mag", config=TitansConfig, param_count=mag_param_count,
          conformance=ConformanceSpec(
              config=TitansConfig(**{**_HYBRID, "n_layers": 1}),
              length=13, cuts=(1, 5, 9, 12),
              reference={"mem_impl": "reference", "attn_impl": "reference"},
              fast=({"mem_impl": "chunked", "attn_impl": "chunked"},)))
def build_titans_mag(cfg: TitansConfig, rngs: nnx.Rngs) -> CausalLM:
    cfg.validate()
    blocks = [Block(MAGMixer(cfg, rngs=rngs), _norm(cfg), _ffn(cfg, rngs), _norm(cfg))
              for _ in range(cfg.n_layers)]
    return _lm(cfg, blocks, rngs)


# ----------------------------------------------------------------------------- MAL


def mal_param_count(cfg: TitansConfig) -> int:
    D = cfg.dim
    mem = neural_memory_param_count(cfg.memory_config()) + cfg.n_persistent * D
    attn = 4 * D * D
    n_mem = (cfg.n_layers + 1) // 2
    return (_base_count(cfg) + n_mem * _block_count(cfg, mem)
            + (cfg.n_layers - n_mem) * _block_count(cfg, attn))


@register("titans_mal", config=TitansConfig, param_count=mal_param_count,
          conformance=ConformanceSpec(
              config=TitansConfig(**_HYBRID),
              length=13, cuts=(1, 5, 9, 12),
              reference={"mem_impl": "reference", "attn_impl": "reference"},
              fast=({"mem_impl": "chunked", "attn_impl": "chunked"},)))
def build_titans_mal(cfg: TitansConfig, rngs: nnx.Rngs) -> CausalLM:
    """Even layers: memory on [P; x]; odd layers: sliding-window attention (Samba style)."""
    cfg.validate()
    A = cfg.n_attn_heads
    blocks = []
    for i in range(cfg.n_layers):
        if i % 2 == 0:
            mixer = PrefixedMemory(cfg, rngs=rngs)
        else:
            mixer = Attention(cfg.dim, A, A, cfg.dim // A, rngs=rngs, rope_base=cfg.rope_base,
                              window=cfg.window, max_len=cfg.max_len, std=cfg.init_std,
                              impl=cfg.attn_impl)
        blocks.append(Block(mixer, _norm(cfg), _ffn(cfg, rngs), _norm(cfg)))
    return _lm(cfg, blocks, rngs)


# ----------------------------------------------------------------------------- MAC


def _pieces(pos, starts, real, C: int, NP: int):
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
      m = NeuralMemory(y)               (write from y with chunk b | C, per-token read after write)
      o = RMSNorm(y) * sigmoid(RMSNorm(m))
    The call is a scan over segment pieces (a call may start or stop mid-segment); the KV cache
    holds the current segment's h and x keys (2C slots) and is cleared at every segment start;
    memory state and both conv caches (query path on x, memory paths on y) carry over.
    """

    def __init__(self, cfg: TitansConfig, *, rngs: nnx.Rngs):
        self.C, self.eps, self.max_resets = cfg.segment, cfg.norm_eps, cfg.max_resets
        D, A = cfg.dim, cfg.n_attn_heads
        self.A, self.dh, self.rope_base, self.attn_impl = A, D // A, cfg.rope_base, cfg.attn_impl
        std = cfg.init_std
        self.mem = NeuralMemory(cfg.memory_config(), rngs=rngs)
        self.w_h = Dense(cfg.n_heads * cfg.hd, D, rngs=rngs, axes=("heads", "embed"), std=std)
        self.wq = Dense(D, D, rngs=rngs, axes=("embed", "heads"), std=std)
        self.wk = Dense(D, D, rngs=rngs, axes=("embed", "heads"), std=std)
        self.wv = Dense(D, D, rngs=rngs, axes=("embed", "heads"), std=std)
        self.wo = Dense(D, D, rngs=rngs, axes=("heads", "embed"), std=std)
        self.persistent = param(normal(rngs.params(), (cfg.n_persistent, D), std), (None, "embed"))
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
                         impl=self.attn_impl)
        y = self.wo(o.reshape(B, C, D))
        # 3-4. write the memory from y, per-token read after the write; gate
        m, mem_state, _ = self.mem(y, st["mem"], mask=mask)
        out = _gate_combine(y, m, self.norm_y[...], self.norm_m[...], self.eps)
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
            start, length, _ = _pieces(pos, starts, real, C, NP)
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
            _, _, count = _pieces(pos, starts, real, C, NPr)
            if NPr == T:
                y, st = run(T)
            else:
                y, st = jax.lax.cond(jnp.all(count <= NPr), lambda: run(NPr), lambda: run(T))
        return y, st, {}


def _mac_mixer_count(cfg: TitansConfig) -> int:
    D = cfg.dim
    return (neural_memory_param_count(cfg.memory_config()) + cfg.n_heads * cfg.hd * D
            + 4 * D * D + cfg.n_persistent * D + 2 * D)


def mac_param_count(cfg: TitansConfig) -> int:
    return _base_count(cfg) + cfg.n_layers * _block_count(cfg, _mac_mixer_count(cfg))


@register("titans_mac", config=TitansConfig, param_count=mac_param_count,
          conformance=ConformanceSpec(
              config=TitansConfig(**{**_HYBRID, "n_layers": 1, "segment": 8}),
              length=13, cuts=(1, 4, 8, 12),
              reference={"mem_impl": "reference", "attn_impl": "reference"},
              fast=({"mem_impl": "chunked", "attn_impl": "chunked"},)))
def build_titans_mac(cfg: TitansConfig, rngs: nnx.Rngs) -> CausalLM:
    cfg.validate()
    blocks = [Block(MACMixer(cfg, rngs=rngs), _norm(cfg), _ffn(cfg, rngs), _norm(cfg))
              for _ in range(cfg.n_layers)]
    return _lm(cfg, blocks, rngs)
