"""Hydra's tri-path block (specs/hydra.md §2.1, §3.3 [spec]): per-path pre-RMSNorms, the sum
scaled by LayerScale scalars g = (g1, g2, g3) (init 0.8, 0.2, 0.5, §8), no post-norm:

    x = h + g1 SSM(RMSNorm_ssm(h)) + g2 SGA(RMSNorm_attn(h); slots) + g3 MoE(RMSNorm_moe(h))
    with PKM:  x = x + σ(RMSNorm_pkm(x) · w_g + b_g) · PKM(RMSNorm_pkm(x))

An absent path contributes 0 (its module is not built). The SSM is layers.hydra_ssm.HydraSSM,
the SGA layers.sga.SparseGlobalAttention (the workspace slots arrive as `context`), the MoE
layers.moe.MoE with causal chunk routing, the PKM layers.pkm.ProductKeyMemory. The block's
state is the tuple of its stateful paths' states (SSM, SGA or None, MoE or None).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.common import param
from layers.norms import RMSNorm

Array = jax.Array


class HydraBlock(nnx.Module):
    def __init__(self, dim: int, *, ssm: nnx.Module, sga: nnx.Module | None = None,
                 moe: nnx.Module | None = None, pkm: nnx.Module | None = None,
                 g_init: tuple[float, float, float] = (0.8, 0.2, 0.5), norm_eps: float = 1e-6):
        self.ssm, self.sga, self.moe, self.pkm = ssm, sga, moe, pkm
        self.norm_ssm = RMSNorm(dim, eps=norm_eps)
        self.norm_sga = RMSNorm(dim, eps=norm_eps) if sga is not None else None
        self.norm_moe = RMSNorm(dim, eps=norm_eps) if moe is not None else None
        self.norm_pkm = RMSNorm(dim, eps=norm_eps) if pkm is not None else None
        self.g = param(jnp.asarray(g_init, jnp.float32), (None,))
        if pkm is not None:
            self.pkm_gate_w = param(jnp.zeros((dim,), jnp.float32), ("norm",))
            self.pkm_gate_b = param(jnp.zeros((), jnp.float32), ())

    def init_state(self, batch_size: int, max_len: int | None = None):
        return (self.ssm.init_state(batch_size),
                None if self.sga is None else self.sga.init_state(batch_size),
                None if self.moe is None else self.moe.init_state(batch_size))

    def paths(self, x: Array, state=None, *, mask=None, segment_ids=None, context=None):
        """x + g1 SSM + g2 SGA + g3 MoE (float32), the new states and the MoE's aux."""
        B = x.shape[0]
        s_ssm, s_sga, s_moe = self.init_state(B) if state is None else state
        g = self.g[...].astype(jnp.float32)
        y1, s_ssm, _ = self.ssm(self.norm_ssm(x), s_ssm, mask=mask, segment_ids=segment_ids)
        out = x.astype(jnp.float32) + g[0] * y1.astype(jnp.float32)
        aux: dict = {}
        if self.sga is not None:
            y2, s_sga, _ = self.sga(self.norm_sga(x), s_sga, mask=mask, segment_ids=segment_ids,
                                    context=context)
            out = out + g[1] * y2.astype(jnp.float32)
        if self.moe is not None:
            y3, s_moe, aux = self.moe(self.norm_moe(x), s_moe, mask=mask, segment_ids=segment_ids)
            out = out + g[2] * y3.astype(jnp.float32)
        return out, (s_ssm, s_sga, s_moe), aux

    def __call__(self, x: Array, state=None, *, mask=None, segment_ids=None, context=None,
                 key=None):
        out, states, aux = self.paths(x, state, mask=mask, segment_ids=segment_ids,
                                      context=context)
        if self.pkm is not None:
            a = self.norm_pkm(out)
            gate = jax.nn.sigmoid(a.astype(jnp.float32) @ self.pkm_gate_w[...] + self.pkm_gate_b[...])
            out = out + gate[..., None] * self.pkm(a).astype(jnp.float32)
        return out.astype(x.dtype), states, aux
