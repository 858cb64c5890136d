"""A dropless top-k mixture of SwiGLU experts on the shared token router (layers/router.py):
the reusable MoE feed-forward (specs/hydra.md §2.4 uses it with chunk-level routing; any family
can use it per token).

    r_t      = route(x_t W_r / temperature)          top-k of the softmax, renormalised gates
    MoE(x)_t = Σ_{e ∈ top-k(t)} g_{t,e} · SwiGLU_e(x_t),   SwiGLU_e(x) = (SiLU(x W1_e) ⊙ x W3_e) W2_e

`route_from` (default: x itself) is what the router reads: Hydra routes every token of a chunk
by the previous chunk's mean (its own causal routing features), token-level MoE by the token.

Dispatch (no expert runs on a token it was not routed to): every (token, choice) copy goes to its
expert's segment of a per-row layout (layers/mom_layout.py, the reordering MoM uses: expert
segments right-padded to a multiple of `block`, laid end to end), each block of `block` slots is
computed by its one expert, and the outputs are gathered back and weighted. The work is
~ (k T + E block) slots per row, growing with k, not with E (the dense form would be E T). A
block gathers its expert's weights ([B, n, D, H] for n blocks): memory, not FLOPs; a grouped
matmul kernel (ragged_dot / megablox) is the accelerator fast path. Every token is kept
(dropless): a capacity factor would make a token's output depend on the other tokens of its
dispatch group.

Weights carry the logical axis "expert" (train.sharding.RULES: over the mesh's fsdp axis), so
experts shard over the mesh. Statistics for the auxiliary losses go out through `aux` as sums
(router.switch_stats; router.usage_stats for Hydra's E Σ u_e² − 1; the z statistic).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.common import call_flags, normal, param, token_positions
from layers.mom_layout import gather_copies, gather_slots, make_layout, n_chunks
from layers.router import Routing, route, switch_stats, usage_stats

Array = jax.Array


@struct.dataclass
class ChunkRouteState:
    """Chunk-level routing's carried state (hydra.md contract notes, "Chunk-MoE decode")."""
    acc: Array     # [B, D] float32: sum of the current chunk's real inputs so far
    route: Array   # [B, D] float32: the current chunk's routing feature (m_{c-1}, or m_{-1})
    pos: Array     # [B] int32: position of the next token in its document


def chunk_route_features(x: Array, real: Array, pos: Array, next_pos: Array,
                         state: ChunkRouteState, m_init: Array, chunk: int):
    """Causal chunk routing (specs/hydra.md §2.4 [spec]): every token of chunk c (the grid
    anchored at its document's position 0) is routed by the mean m_{c-1} of chunk c-1's inputs,
    chunk 0 by the learned m_{-1}. x [B, T, D]; real [B, T] (right padded); pos [B, T] the
    tokens' positions (restarting at document starts); next_pos [B]. Returns (features [B, T,
    D], the state after the call). A chunk that began before the call is routed by the carried
    feature; a chunk whose predecessor straddles the call's start sums the carried partial sum
    with the in-call part; a partial last chunk routes nothing yet and leaves its sum in `acc`."""
    B, T, D = x.shape
    C = chunk
    xf = x.astype(jnp.float32) * real[..., None]
    S = jnp.concatenate([jnp.zeros((B, 1, D)), jnp.cumsum(xf, axis=1)], axis=1)   # S[i]: j < i
    at = lambda i: jnp.take_along_axis(S, jnp.clip(i, 0, T)[..., None], axis=1)   # noqa: E731
    m0 = m_init.astype(jnp.float32)

    def feature(t, p):                                   # call index, position: [B, n]
        start = t - p % C                                # call index of the chunk's first token
        lo = start - C
        prev = jnp.where((lo >= 0)[..., None], at(start) - at(lo),
                         state.acc[:, None] + at(start) - at(jnp.zeros_like(start)))
        f = jnp.where((start > 0)[..., None], prev / C, state.route[:, None])
        return jnp.where((p // C == 0)[..., None], m0, f)

    feats = feature(jnp.broadcast_to(jnp.arange(T), (B, T)), pos)
    t_end = jnp.sum(real, axis=1).astype(jnp.int32)[:, None]
    p_end = next_pos[:, None]
    start = t_end - p_end % C
    acc = jnp.where((start >= 0)[..., None], at(t_end) - at(start),
                    state.acc[:, None] + at(t_end) - at(jnp.zeros_like(start)))
    new = ChunkRouteState(acc=acc[:, 0], route=feature(t_end, p_end)[:, 0], pos=next_pos)
    return feats, new


def moe_slots(T: int, k: int, n_experts: int, block: int) -> int:
    """Layout slots per row (the work the experts do): n_chunks x block."""
    return n_chunks(T, k, n_experts, block) * block


def moe_flops(dim: int, hidden: int, n_experts: int, k: int, T: int, block: int) -> float:
    """Forward FLOPs per token: the router [D, E] and the three SwiGLU products [D, H] over the
    layout's slots (`moe_slots` / T per token: k and the pad slots of the expert blocks); the
    gating, SiLU and the weighted sum are elementwise."""
    return 2.0 * dim * n_experts + moe_slots(T, k, n_experts, block) / T * 3 * 2.0 * dim * hidden


class MoE(nnx.Module):
    """Dropless top-k mixture of `n_experts` SwiGLU experts of width `hidden` (module doc).
    router_std: the router's N(0, std) init (0.02: near-uniform routing at start, hydra.md §5);
    out_scale: the output projections' std multiplier (1/sqrt(2 n_blocks) in Hydra)."""

    def __init__(self, dim: int, hidden: int, n_experts: int, k: int, *, rngs: nnx.Rngs,
                 chunk: int | None = None, temperature: float = 1.0, router_std: float = 0.02,
                 init_std: float = 0.02, out_scale: float = 1.0, block: int = 16,
                 prefix: str = "moe", z_stat: bool = False, scheduled_temperature: bool = False):
        if not 1 <= k <= n_experts:
            raise ValueError(f"top-k {k} must be in [1, {n_experts}]")
        self.n_experts, self.k, self.chunk = n_experts, k, chunk
        # scheduled_temperature: the temperature is a scalar parameter that no gradient moves
        # (stop_gradient), set by the trainer's `train.anneal` schedule (hydra.md §2.7 stage 3)
        self.temperature = (param(jnp.asarray(temperature, jnp.float32), ())
                            if scheduled_temperature else temperature)
        self.block, self.prefix, self.z_stat = block, prefix, z_stat
        self.router = param(normal(rngs.params(), (dim, n_experts), router_std), ("embed", None))
        # chunk routing: chunk 0's feature m_{-1} (learned)
        self.m_init = (param(normal(rngs.params(), (dim,), init_std), ("norm",))
                       if chunk is not None else None)
        E = n_experts
        self.w1 = param(normal(rngs.params(), (E, dim, hidden), init_std), ("expert", "embed", "mlp"))
        self.w3 = param(normal(rngs.params(), (E, dim, hidden), init_std), ("expert", "embed", "mlp"))
        self.w2 = param(normal(rngs.params(), (E, hidden, dim), init_std * out_scale),
                        ("expert", "mlp", "embed"))

    def temp(self):
        t = self.temperature
        return jax.lax.stop_gradient(t[...]) if isinstance(t, nnx.Param) else t

    def routing(self, route_from: Array, mask: Array | None = None) -> Routing:
        logits = jnp.einsum("btd,de->bte", route_from.astype(jnp.float32),
                            self.router[...].astype(jnp.float32)) / self.temp()
        return route(logits, self.k, mask)

    def experts(self, x: Array, r: Routing, mask: Array | None = None) -> Array:
        """Σ_e g_{t,e} SwiGLU_e(x_t) under the routing `r`, by the block layout (module doc)."""
        B, T, D = x.shape
        E, C = self.n_experts, self.block
        real = jnp.ones((B, T), bool) if mask is None else mask.astype(bool)
        valid = jnp.broadcast_to(real[..., None], r.index.shape)
        lay = make_layout(r.index, valid, jnp.zeros((B, T), jnp.int32), n_mem=E, chunk=C)
        n = lay.chunk_mem.shape[1]
        xs = gather_slots(x, lay.token).reshape(B, n, C, D)
        # trailing all-pad blocks carry expert id E: a zero expert
        pick = lambda w: jnp.take(jnp.concatenate([w, jnp.zeros_like(w[:1])]), lay.chunk_mem,  # noqa: E731
                                  axis=0)
        w1, w3, w2 = (pick(w[...].astype(x.dtype)) for w in (self.w1, self.w3, self.w2))
        h = jax.nn.silu(jnp.einsum("bncd,bndh->bnch", xs, w1)) * jnp.einsum("bncd,bndh->bnch", xs, w3)
        o = jnp.einsum("bnch,bnhd->bncd", h, w2)
        o = o.reshape(B, n * C, D)                                   # the layout's slots
        out = gather_copies(o, lay.copy_pos)                         # [B, T, k, D]
        return jnp.einsum("btkd,btk->btd", out, r.gates.astype(out.dtype))

    def init_state(self, batch_size: int, max_len: int | None = None):
        """None for token routing (stateless); chunk routing carries `ChunkRouteState`."""
        if self.chunk is None:
            return None
        D = self.router.shape[0]
        return ChunkRouteState(acc=jnp.zeros((batch_size, D), jnp.float32),
                               route=jnp.broadcast_to(self.m_init[...], (batch_size, D)).astype(jnp.float32),
                               pos=jnp.zeros((batch_size,), jnp.int32))

    def __call__(self, x: Array, state=None, *, mask: Array | None = None, segment_ids=None,
                 route_from: Array | None = None, key=None):
        """(MoE(x) [B, T, D], new state, aux statistics). Token routing reads `route_from`
        (default x); chunk routing (`chunk`) the previous chunk's mean of x (its state carries
        the partial chunk and the current routing across calls)."""
        B, T, _ = x.shape
        if self.chunk is not None:
            state = self.init_state(B) if state is None else state
            real, starts, next_pos = call_flags(state.pos, mask, segment_ids, B, T)
            pos = token_positions(state.pos, starts, real)[0]
            route_from, state = chunk_route_features(x, real, pos, next_pos, state,
                                                     self.m_init[...], self.chunk)
        r = self.routing(x if route_from is None else route_from, mask)
        aux = {**switch_stats(r, mask, prefix=self.prefix, z_stat=self.z_stat),
               **usage_stats(r, prefix=self.prefix)}
        return self.experts(x, r, mask), state, aux
