"""Token-level top-k routing and its Switch-style statistics (specs/mom.md §2.2, §2.7, contract
notes "Aux loss"); generic: MoM routes tokens to memories with it, a mixture of experts to experts.

    p_t = softmax(x_t W_r)                     (float32)
    S_t = top-k indices of p_t                 (lax.top_k: on ties the lowest index wins, §8.7)
    g_{t,m} = p_{t,m} / sum_{m' in S_t} p_{t,m'}  for m in S_t        (renormalised gates)

Routing is per token from x_t alone and never drops a token (dropless, §8.6). Masked tokens
(right padding) are routed nowhere: their gates are 0 and they count in no statistic.

The auxiliary loss is a product of batch-wide means over *all* routed layers jointly, so a layer
returns sufficient statistics that add across layers, micro-batches and shards (the LM scaffold
sums every layer's `aux` dict; `zoo.lm.sum_aux`):

    <prefix>/prob_sum     [M]     sum over real rows of p_t
    <prefix>/choice_count [k, M]  number of real rows whose j-th choice is m
    <prefix>/rows         []      number of real rows
    <prefix>/z_sum        []      sum over real rows of logsumexp(logits)^2   (optional)

and `switch_loss` / `z_loss` form the terms from the summed statistics:

    L_aux = M sum_j sum_m (choice_count[j, m] / rows) (prob_sum[m] / rows)   (= k when balanced)
    L_z   = z_sum / rows

and, for Hydra's balance term (specs/hydra.md §2.4), `usage_stats` / `usage_loss`:
<prefix>/gate_sum [M], L_bal = M sum_m u_m^2 - 1 with u = gate_sum / sum(gate_sum).
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.common import param, uniform

Array = jax.Array


@struct.dataclass
class Routing:
    logits: Array   # [B, T, M] float32 router logits
    probs: Array    # [B, T, M] float32 softmax of the logits (full, not renormalised)
    index: Array    # [B, T, k] int32 selected experts, best first
    gates: Array    # [B, T, k] float32 renormalised weights (0 at masked tokens)


def route(logits: Array, k: int, mask: Array | None = None) -> Routing:
    """Top-k routing of router logits [B, T, M] (§2.2); `mask` [B, T] marks real tokens."""
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    top, index = jax.lax.top_k(probs, k)
    gates = top / jnp.sum(top, axis=-1, keepdims=True)
    if mask is not None:
        gates = jnp.where(mask[..., None], gates, 0.0)
    return Routing(logits=logits, probs=probs, index=index.astype(jnp.int32), gates=gates)


def dense_gates(r: Routing) -> Array:
    """The gates as a dense [B, T, M] array (g_{t,m}, zero off the selection)."""
    M = r.probs.shape[-1]
    return jnp.sum(jax.nn.one_hot(r.index, M, dtype=r.gates.dtype) * r.gates[..., None], axis=-2)


def margins(r: Routing) -> Array:
    """[B, T] gap between the k-th and the (k+1)-th router probability (inf when k = M): how far
    each token's selection is from flipping (contract notes, "Discrete top-k")."""
    M, k = r.probs.shape[-1], r.index.shape[-1]
    if k >= M:
        return jnp.full(r.probs.shape[:-1], jnp.inf, jnp.float32)
    top = jax.lax.top_k(r.probs, k + 1)[0]
    return top[..., k - 1] - top[..., k]


def switch_stats(r: Routing, mask: Array | None = None, *, prefix: str,
                 z_stat: bool = False) -> dict[str, Array]:
    """The additive statistics of §2.7 over the real rows of one routed layer (module doc)."""
    B, T, M = r.probs.shape
    real = (jnp.ones((B, T), bool) if mask is None else mask.astype(bool)).astype(jnp.float32)
    onehot = jax.nn.one_hot(r.index, M, dtype=jnp.float32)                    # [B, T, k, M]
    out = {f"{prefix}/prob_sum": jnp.einsum("btm,bt->m", r.probs, real),
           f"{prefix}/choice_count": jnp.einsum("btjm,bt->jm", onehot, real),
           f"{prefix}/rows": jnp.sum(real)}
    if z_stat:
        z = jax.nn.logsumexp(r.logits, axis=-1)
        out[f"{prefix}/z_sum"] = jnp.sum(real * z * z)
    return out


def switch_loss(stats: Mapping[str, Array], *, prefix: str) -> Array:
    """L_aux = M sum_j sum_m f_{j,m} P_m from summed statistics (§2.7; k at perfect balance)."""
    rows = jnp.maximum(stats[f"{prefix}/rows"], 1.0)
    P = stats[f"{prefix}/prob_sum"] / rows
    f = stats[f"{prefix}/choice_count"] / rows
    return P.shape[-1] * jnp.sum(f * P[None, :])


def z_loss(stats: Mapping[str, Array], *, prefix: str) -> Array:
    """The router z statistic's mean, mean_rows logsumexp(logits)^2."""
    return stats[f"{prefix}/z_sum"] / jnp.maximum(stats[f"{prefix}/rows"], 1.0)


def usage_stats(r: Routing, *, prefix: str) -> dict[str, Array]:
    """<prefix>/gate_sum [M]: the sum over real rows of each expert's gate (specs/hydra.md §2.4's
    usage u_e = gate_sum_e / Σ gate_sum; masked rows have zero gates)."""
    return {f"{prefix}/gate_sum": jnp.sum(dense_gates(r), axis=(0, 1))}


def usage_loss(stats: Mapping[str, Array], *, prefix: str) -> Array:
    """Hydra's load balance, E Σ_e u_e² − 1 (0 at uniform usage, E − 1 when one expert takes
    every weight), from summed `usage_stats`."""
    g = stats[f"{prefix}/gate_sum"]
    u = g / jnp.maximum(jnp.sum(g), 1e-30)
    return g.shape[-1] * jnp.sum(u * u) - 1.0


def router_flops(dim: int, n_experts: int) -> float:
    """Forward FLOPs per token of the router's [dim, n_experts] product (softmax, top-k and the
    renormalisation are elementwise / selections: not counted)."""
    return 2.0 * dim * n_experts


class TopKRouter(nnx.Module):
    """x W_r (no bias, W_r [dim, n_experts]) followed by `route`; xavier-uniform init with
    `gain` (specs/mom.md §6.9: 2^-2.5 for MoM's router)."""

    def __init__(self, dim: int, n_experts: int, k: int, *, rngs: nnx.Rngs,
                 gain: float = 2 ** -2.5):
        if not 1 <= k <= n_experts:
            raise ValueError(f"top-k {k} must be in [1, {n_experts}]")
        self.n_experts, self.k = n_experts, k
        bound = gain * (6.0 / (dim + n_experts)) ** 0.5
        self.weight = param(uniform(rngs.params(), (dim, n_experts), bound), ("embed", None))

    def __call__(self, x: Array, mask: Array | None = None) -> Routing:
        logits = jnp.einsum("btd,dm->btm", x.astype(jnp.float32),
                            self.weight[...].astype(jnp.float32))
        return route(logits, self.k, mask)
