"""Mixture-of-Memories mixer (specs/mom.md §2.2-2.8, §4): routed linear memories + a shared one.

    routing   p_t, S_t, g_t = TopKRouter(x_t)                                   (§2.2)
    memories  q_t = x_t W_Q (shared); k_t^m = x_t W_K^m, v_t^m = x_t W_V^m and the base's gate
              projections per memory (§2.3); each memory m runs the base recurrence over the
              time-ordered subsequence of its tokens, with memory-local short convolutions
              (one set of conv weights, per-memory caches, §2.6 / §8.2); unrouted memories are
              untouched (no write, no decay, no conv shift, §6.3)
    mixing    o_t = sum_{m in S_t} g_{t,m} o_t^m  (+ o_t^shared, weight 1)            (§2.4, §2.5)
    output    [per-head RMSNorm(o_t) w (x SiLU(x_t W_G))] W_O                        (§2.6, §8.11)

Bases (`kind`, the memories of `layers.linear_memory`): "gated_deltanet" (§2.6: l2-normalised
q, k, beta = sigmoid(x W_b^m), g = -exp(A_log) softplus(x W_a^m + dt_bias) with A_log and
dt_bias shared by all memories, §8.5), "deltanet" (the same with g = 0) and "linear_attention"
(§2.8: S <- S + k^T v with a feature map, optionally fla's normaliser). GLA is not a MoM base here.

Parallel form (§4.1; the reordering is `layers.mom_layout`): the k routed copies (+ the shared
copy) of every token are sorted per batch row into chunk-aligned per-memory segments of ~S T
slots; one `lax.scan` runs over the chunks: a chunk loads its memory's state and conv caches
from the carried per-memory arrays, projects its tokens with *that memory's* W_K, W_V and gate
weights (gathered for the chunk only: no memory runs on a token not routed to it), runs the
base op (`pallas_kernels.gated_delta` / `gla`, `impl`, one chunk of C = min(block, T) tokens)
from that state and writes the state back. The cost grows with k (+ shared), not with the
number of memories; no per-token state is materialised (the op keeps its state per chunk).
Decoding is the same path at T = 1 (C = 1: exactly the k + 1 selected memories take a step).
Pad slots are inert (k = v = 0, beta = 0, log-decay 0), so a segment's state is the one after
its last real token; a memory's conv cache is the last K-1 real inputs of (cache || its tokens).

State (`MoMState`): per memory (routed, then shared) the float32 memory and the q/k/v conv
caches, and the next position. Document starts (`segment_ids`) clear every memory: a memory's
first copy in a new document decays its state by `RESET_LOG_DECAY` and restarts its conv
windows; memories with no copy after the call's last document start are cleared at the end.
`aux` carries the router's Switch statistics (`layers.router.switch_stats`, prefix "mom").
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.common import call_flags, param, uniform
from layers.conv import CausalConv1d, causal_conv1d
from layers.linear_memory import (
    RESET_LOG_DECAY,
    feature_map,
    memory_state_flops,
    normalized_linear_attention,
    read_out,
    xavier_dense,
)
from layers.mom_layout import (
    from_chunks,
    gather_copies,
    gather_slots,
    make_layout,
    n_chunks,
    to_chunks,
)
from layers.norms import l2_norm
from layers.router import TopKRouter, route, router_flops, switch_stats
from layers.ssm import dt_bias_init
from pallas_kernels.gated_delta import gated_delta
from pallas_kernels.gla import gla

Array = jax.Array

KINDS = ("gated_deltanet", "deltanet", "linear_attention")
AUX_PREFIX = "mom"


@struct.dataclass
class MoMState:
    memory: Array   # float32 [B, G, H, dk, dv (+1 normaliser)]; G = memories (+ shared, last)
    conv_q: Array   # [B, G, K-1, H dk] last K-1 real pre-conv inputs of each memory
    conv_k: Array   # [B, G, K-1, H dk]
    conv_v: Array   # [B, G, K-1, H dv]
    pos: Array      # [B] int32 position of the next token


def uses_delta(kind: str) -> bool:
    return kind in ("deltanet", "gated_deltanet")


def op_name(kind: str) -> str:
    return "gated_delta" if uses_delta(kind) else "gla"


def gate_names(kind: str) -> tuple[str, ...]:
    """The per-memory gate projections [D, H] of a base."""
    return {"gated_deltanet": ("b_proj", "a_proj"), "deltanet": ("b_proj",),
            "linear_attention": ()}[kind]


def memory_chunk(p, e: Array, q: Array, valid: Array, reset: Array, S: Array, conv: Array, *,
                 kind: str, H: int, dk: int, dv: int, fmap: str, normalize: bool, resets: bool,
                 impl: str):
    """One chunk of one memory per batch row (§2.6 / §2.8 on the memory's subsequence).
    e [B, C, H(dk + dv) + H n_gates]: the memory's own projections of the chunk's tokens;
    q [B, C, H dk]: their shared pre-conv queries; valid, reset [B, C]; S, conv: the memory's
    carried state and its q|k|v conv caches [B, K-1, H(2dk + dv)] (the three depthwise convs
    run as one over the concatenated streams). Returns o [B, C, H, dv], S, conv."""
    B, C, _ = e.shape
    qkv = jnp.concatenate([q, e[..., :H * (dk + dv)]], axis=-1)
    gates = e[..., H * (dk + dv):].astype(jnp.float32)
    if p["conv"] is not None:
        qkv, conv = causal_conv1d(qkv, p["conv"], None, conv, valid, reset)
        qkv = jax.nn.silu(qkv)
    q, k, v = jnp.split(qkv, [H * dk, 2 * H * dk], axis=-1)
    q, k, v = (a.astype(jnp.float32).reshape(B, C, H, -1) for a in (q, k, v))
    real = valid[..., None, None]
    k, v = jnp.where(real, k, 0.0), jnp.where(real, v, 0.0)             # inert pads
    rs = (reset & valid)[..., None]
    scale = dk ** -0.5
    if uses_delta(kind):
        q, k = l2_norm(q), l2_norm(k)
        beta = jnp.where(valid[..., None], jax.nn.sigmoid(gates[..., :H]), 0.0)
        if kind == "gated_deltanet":
            g = -jnp.exp(p["A_log"].astype(jnp.float32)) * jax.nn.softplus(
                gates[..., H:2 * H] + p["dt_bias"].astype(jnp.float32))
            g = jnp.where(valid[..., None], g, 0.0)
        else:
            g = jnp.zeros((B, C, H), jnp.float32)
        if resets:
            g = jnp.where(rs, RESET_LOG_DECAY, g)
        o, S = gated_delta(q, k, v, g, beta, scale=scale, initial_state=S, impl=impl, block=C)
    else:
        q, k = feature_map(q, fmap), jnp.where(real, feature_map(k, fmap), 0.0)
        g = None
        if resets:
            g = jnp.where(rs[..., None], RESET_LOG_DECAY, jnp.zeros((B, C, H, dk), jnp.float32))
        if normalize:
            o, S = normalized_linear_attention(q, k, v, g, scale=scale, initial_state=S,
                                               impl=impl, block=C)
        else:
            o, S = gla(q, k, v, g, scale=scale, initial_state=S, impl=impl, block=C)
    return o, S, conv


def _rows(a: Array, m: Array) -> Array:
    return a[jnp.arange(a.shape[0]), m]


@functools.partial(jax.jit, static_argnames=("kind", "n_heads", "top_k", "shared", "fmap",
                                             "normalize", "norm_eps", "resets", "z_stat",
                                             "impl", "block"))
def mom_mixer(p: dict, x: Array, state: MoMState, mask: Array, starts: Array, *, kind: str,
              n_heads: int, top_k: int, shared: bool, fmap: str = "identity",
              normalize: bool = False, norm_eps: float = 1e-6, resets: bool = False,
              z_stat: bool = False, impl: str = "auto", block: int = 64):
    """One MoM mixer (module docstring). p: router [D, M], q_proj [D, H dk], k_proj
    [G, D, H dk], v_proj [G, D, H dv], the kind's gates [G, D, H] (b_proj, a_proj), A_log and
    dt_bias [H], conv_q/conv_k/conv_v [C, K] or None, g_proj [D, H dv] or None, norm [dv],
    o_proj [H dv, D]. x [B, T, D]; mask, starts [B, T] bool. Returns (y, state, aux)."""
    B, T, _ = x.shape
    H = n_heads
    M = p["router"].shape[1]
    G = p["k_proj"].shape[0]
    dk, dv = p["q_proj"].shape[1] // H, p["v_proj"].shape[2] // H
    r = route(jnp.einsum("btd,dm->btm", x.astype(jnp.float32), p["router"].astype(jnp.float32)),
              top_k, mask)
    aux = switch_stats(r, mask, prefix=AUX_PREFIX, z_stat=z_stat)
    mem, w = r.index, r.gates
    if shared:
        mem = jnp.concatenate([mem, jnp.full((B, T, 1), M, jnp.int32)], axis=-1)
        w = jnp.concatenate([w, mask[..., None].astype(w.dtype)], axis=-1)
    S_slots = mem.shape[-1]
    C = max(1, min(block, T))
    n = n_chunks(T, S_slots, G, C)
    doc = jnp.cumsum(starts.astype(jnp.int32), axis=1)
    lay = make_layout(mem, jnp.broadcast_to(mask[..., None], mem.shape), doc, n_mem=G, chunk=C)
    q_pre = jnp.einsum("btd,de->bte", x, p["q_proj"].astype(x.dtype))
    W = jnp.concatenate([p["k_proj"], p["v_proj"]] + [p[g] for g in gate_names(kind)], axis=-1)
    xs = (to_chunks(gather_slots(x, lay.token), n), to_chunks(gather_slots(q_pre, lay.token), n),
          to_chunks(lay.valid, n), to_chunks(lay.reset, n), jnp.moveaxis(lay.chunk_mem, 1, 0))
    scratch = lambda a: jnp.concatenate([a, jnp.zeros_like(a[:, :1])], axis=1)  # noqa: E731
    conv = jnp.concatenate([state.conv_q, state.conv_k, state.conv_v], axis=-1)
    carry = (scratch(state.memory), scratch(conv))
    pc = dict(p, conv=None if p["conv_q"] is None else
              jnp.concatenate([p["conv_q"], p["conv_k"], p["conv_v"]], axis=0))

    def body(carry, inp):
        xc, qc, valid, reset, m = inp
        e = jnp.einsum("bcd,bde->bce", xc, W[jnp.minimum(m, G - 1)].astype(xc.dtype))
        o, *new = memory_chunk(pc, e, qc, valid, reset, *(_rows(a, m) for a in carry),
                               kind=kind, H=H, dk=dk, dv=dv, fmap=fmap, normalize=normalize,
                               resets=resets, impl=impl)
        rows = jnp.arange(B)
        carry = tuple(a.at[rows, m].set(s.astype(a.dtype)) for a, s in zip(carry, new))
        return carry, o

    carry, o = jax.lax.scan(body, carry, xs)
    final = [a[:, :G] for a in carry]
    if resets:
        keep = ~lay.stale
        final = [jnp.where(keep.reshape(keep.shape + (1,) * (a.ndim - 2)), a, 0) for a in final]
    oc = gather_copies(from_chunks(o), lay.copy_pos)                     # [B, T, S, H, dv]
    y = jnp.einsum("btshv,bts->bthv", oc, w)
    out = read_out(p, y, x, norm_eps)
    cq, ck, cv = jnp.split(final[1], [H * dk, 2 * H * dk], axis=-1)
    new = MoMState(memory=final[0], conv_q=cq, conv_k=ck, conv_v=cv, pos=state.pos)
    return out, new, aux


# ----------------------------------------------------------------------------- counts

def mom_mixer_flops(kind: str, dim: int, n_heads: int, dk: int, dv: int, *, n_memories: int,
                    top_k: int, shared: bool, conv_size: int | None, output_gate: bool,
                    normalize: bool = False) -> float:
    """Forward FLOPs per token of `mom_mixer`: the router [D, M], the shared W_Q, and for each of
    the k routed memories (+ the shared one) only: its W_K, W_V and gate projections, the three
    memory-local convs and the recurrence (`layers.linear_memory.memory_state_flops`); then the
    output gate [D, H dv] and W_O. Routing, sorting, gathers and the weighted mixing are
    selections / elementwise: not counted."""
    H = n_heads
    slots = top_k + (1 if shared else 0)
    per_slot = 2.0 * dim * H * (dk + dv + len(gate_names(kind)))
    per_slot += 2.0 * conv_size * H * (2 * dk + dv) if conv_size else 0.0
    per_slot += memory_state_flops(kind, H, dk, dv + (1 if normalize else 0))
    gate = 2.0 * dim * H * dv if output_gate else 0.0
    return (router_flops(dim, n_memories) + 2.0 * dim * H * dk + slots * per_slot + gate
            + 2.0 * H * dv * dim)


def mom_param_count(kind: str, dim: int, n_heads: int, dk: int, dv: int, *, n_memories: int,
                    shared: bool, conv_size: int | None, output_gate: bool) -> int:
    """Parameters of one `MoMMixer`: router [D, M], W_Q, per memory (+ shared) W_K, W_V and the
    kind's gates [D, H]; A_log, dt_bias [H] (gated_deltanet); the three shared bias-free convs;
    W_G (if gated), the per-head norm weight [dv], W_O."""
    H = n_heads
    G = n_memories + (1 if shared else 0)
    n = dim * n_memories + dim * H * dk
    n += G * dim * H * (dk + dv + len(gate_names(kind)))
    n += 2 * H if kind == "gated_deltanet" else 0
    n += conv_size * H * (2 * dk + dv) if conv_size else 0
    n += dim * H * dv if output_gate else 0
    return n + dv + H * dv * dim


# ----------------------------------------------------------------------------- module

class MoMMixer(nnx.Module):
    """The MoM mixer following the mixer contract (module docstring).

    n_memories routed memories, top_k of them per token, `shared`: the always-on shared memory;
    the base (`kind`, conv_size, output_gate, feature_map, normalize) as
    `layers.linear_memory.LinearMemoryMixer`. Initialisation §6.9: every projection
    xavier-uniform with `gain` (each memory's matrices separately), the router with
    `router_gain`, A = U(0, 16), dt_bias = softplus^{-1}(dt); convs U(+-1/sqrt(K)); norm 1.
    `z_stat` adds the router z statistic to `aux`. `impl`, `block`: the op's form and chunk
    (neither changes the function)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, kind: str, n_memories: int, top_k: int,
                 shared: bool, n_heads: int, head_dim_k: int, head_dim_v: int,
                 conv_size: int | None = 4, output_gate: bool = True,
                 feature_map: str = "identity", normalize: bool = False, norm_eps: float = 1e-6,
                 gain: float = 2 ** -2.5, router_gain: float = 2 ** -2.5, dt_min: float = 1e-3,
                 dt_max: float = 0.1, dt_floor: float = 1e-4, z_stat: bool = False,
                 impl: str = "auto", block: int = 64):
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} is not one of {KINDS}")
        H, dk, dv = n_heads, head_dim_k, head_dim_v
        G = n_memories + (1 if shared else 0)
        self.kind, self.n_heads, self.dk, self.dv = kind, H, dk, dv
        self.n_memories, self.top_k, self.shared = n_memories, top_k, shared
        self.feature_map, self.normalize = feature_map, normalize and kind == "linear_attention"
        self.norm_eps, self.z_stat, self.impl, self.block = norm_eps, z_stat, impl, block
        self.conv_size = conv_size
        self.router = TopKRouter(dim, n_memories, top_k, rngs=rngs, gain=router_gain)
        self.q_proj = xavier_dense(dim, H * dk, rngs, ("embed", "heads"), gain)

        def stack(width):
            bound = gain * (6.0 / (dim + width)) ** 0.5
            return param(uniform(rngs.params(), (G, dim, width), bound), (None, "embed", "heads"))

        self.k_proj, self.v_proj = stack(H * dk), stack(H * dv)
        if uses_delta(kind):
            self.b_proj = stack(H)
        if kind == "gated_deltanet":
            self.a_proj = stack(H)
            A = jax.random.uniform(rngs.params(), (H,), jnp.float32, 0.0, 16.0)
            self.A_log = param(jnp.log(A), ("heads",))
            self.dt_bias = param(dt_bias_init(rngs.params(), H, dt_min, dt_max, dt_floor),
                                 ("heads",))
        convs = [CausalConv1d(c, conv_size, rngs=rngs, use_bias=False) if conv_size else None
                 for c in (H * dk, H * dk, H * dv)]
        self.conv_q, self.conv_k, self.conv_v = convs
        self.g_proj = (xavier_dense(dim, H * dv, rngs, ("embed", "heads"), gain)
                       if output_gate else None)
        self.norm = param(jnp.ones((dv,), jnp.float32), ("norm",))
        self.o_proj = xavier_dense(H * dv, dim, rngs, ("heads", "embed"), gain)

    @property
    def n_slots(self) -> int:
        return self.n_memories + (1 if self.shared else 0)

    def arrays(self) -> dict:
        w = lambda m: None if m is None else m.weight[...]  # noqa: E731
        p = {"router": self.router.weight[...], "q_proj": w(self.q_proj),
             "k_proj": self.k_proj[...], "v_proj": self.v_proj[...], "conv_q": w(self.conv_q),
             "conv_k": w(self.conv_k), "conv_v": w(self.conv_v), "g_proj": w(self.g_proj),
             "norm": self.norm[...], "o_proj": w(self.o_proj)}
        for g in gate_names(self.kind):
            p[g] = getattr(self, g)[...]
        if self.kind == "gated_deltanet":
            p.update(A_log=self.A_log[...], dt_bias=self.dt_bias[...])
        return p

    def routing(self, x: Array, mask: Array | None = None):
        """The router's decisions on x [B, T, D] (`layers.router.Routing`)."""
        return self.router(x, mask)

    def init_state(self, batch_size: int, max_len: int | None = None) -> MoMState:
        K1 = (self.conv_size or 1) - 1
        B, G, H, dk, dv = batch_size, self.n_slots, self.n_heads, self.dk, self.dv
        z = lambda c: jnp.zeros((B, G, K1, c), jnp.float32)  # noqa: E731
        return MoMState(
            memory=jnp.zeros((B, G, H, dk, dv + (1 if self.normalize else 0)), jnp.float32),
            conv_q=z(H * dk), conv_k=z(H * dk), conv_v=z(H * dv),
            pos=jnp.zeros((B,), jnp.int32))

    def __call__(self, x: Array, state: MoMState | None = None, *, mask=None, segment_ids=None,
                 context=None, deterministic: bool = True, key=None):
        B, T, _ = x.shape
        state = self.init_state(B) if state is None else state
        real, starts, next_pos = call_flags(state.pos, mask, segment_ids, B, T)
        y, new, aux = mom_mixer(self.arrays(), x, state, real, starts, kind=self.kind,
                                n_heads=self.n_heads, top_k=self.top_k, shared=self.shared,
                                fmap=self.feature_map, normalize=self.normalize,
                                norm_eps=self.norm_eps, resets=segment_ids is not None,
                                z_stat=self.z_stat, impl=self.impl, block=self.block)
        return y, new.replace(pos=next_pos), aux
