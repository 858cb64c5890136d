"""Hydra (specs/hydra.md: the 1.6B hybrid proposal, arXiv 2508.15099; not the bidirectional
Hydra of 2024), registered as "hydra": tri-path blocks (layers.hydra.HydraBlock) of the
diagonal SSM in every block, sparse global attention every `sga_every`-th block, the causal
chunk-routed MoE every `moe_every`-th block and one product-key memory, in the shared LM
scaffold (embedding, final RMSNorm, tied head).

Layers are numbered l = 1..n_layers: SGA at l % sga_every == 0 (§8: every 3rd), MoE at
l % moe_every == 0 (even blocks), the PKM after block `pkm_layer` (1-based; 0: none).
With `workspace` the model is `HydraLM`: the causal workspace (layers.workspace, §2.5) of
`ws_slots` slots written once per completed chunk of `ws_chunk` tokens from the final-norm
outputs, read by every SGA block as extra keys and values; the forward is a scan over workspace
chunks with the block stack inside (the contract note). Not built: the prototype `hydra_toy`.
`hydra_param_count` is §3.2's formula evaluated on this layout (the built model's exact count);
`hydra_1p6b()` is §3.2's layout (eval_shape only). The staged curriculum is configs/hydra.py.

Discrete decisions (MoE top-k, the global test r_j > 0, PKM top-k) are asserted clear of ties
on the conformance runs (`check_margins`, the contract notes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from layers.common import check_block, check_heads, check_impl, fold, real_mask, token_positions
from layers.hydra import HydraBlock
from layers.hydra_ssm import HydraSSM, hydra_ssm_params
from layers.moe import MoE, chunk_route_features, moe_flops
from layers.norms import RMSNorm
from layers.pkm import ProductKeyMemory, pkm_params
from layers.router import margins, usage_loss, z_loss
from layers.sga import SparseGlobalAttention
from layers.workspace import Workspace, workspace_params, workspace_write_flops
from zoo.lm import CausalLM, build_lm, lm_flops, lm_param_count, sum_aux
from zoo.registry import ConformanceSpec, register

AUX = "hydra_moe"
MARGIN = 1e-4


@dataclass(frozen=True)
class HydraConfig:
    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 3
    n_heads: int = 4
    sga_every: int = 3
    window: int = 255               # W: the local window holds W + 1 = w keys (256)
    n_global: int = 512
    moe_every: int = 2
    n_experts: int = 8
    top_k: int = 2
    moe_hidden: int = 1408
    moe_chunk: int = 32             # C: the MoE routing chunk (part of the model)
    moe_temperature: float = 1.0
    moe_scheduled_temperature: bool = False   # the temperature is a parameter the trainer's
                                              # train.anneal sets (no gradient; §2.7 stage 3)
    router_std: float = 0.02
    pkm_layer: int = 0              # 1-based block hosting the PKM (0: none; -1: the middle
                                    # block, n_layers // 2, §8)
    pkm_sub: int = 256
    pkm_key: int = 128
    pkm_value: int = 512
    pkm_heads: int = 4
    pkm_topk: int = 32
    g_ssm: float = 0.8
    g_sga: float = 0.2
    g_moe: float = 0.5
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    tie_embeddings: bool = True
    z_stat: bool = False
    workspace: bool = False         # the causal workspace (§2.5), read by every SGA block
    ws_slots: int = 64              # S
    ws_rank: int = 128              # r
    ws_chunk: int = 64              # C_w: the workspace chunk (part of the model)
    ws_slot_std: float = 0.01
    impl: str = "auto"              # op diag_scan (the SSM path): auto | reference | chunked
    block: int = 16                 # the scan's chunk and the MoE dispatch block (never change
                                    # the function)

    def validate(self):
        check_impl(self.impl, ("diag_scan",))
        check_block(self.block)
        for key in ("sga_every", "moe_every", "n_experts", "moe_hidden", "moe_chunk", "pkm_sub",
                    "pkm_key", "pkm_value", "pkm_heads", "pkm_topk", "block", "ws_slots",
                    "ws_rank", "ws_chunk"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"model.{key}={v!r} must be a positive integer")
        check_heads(self.dim, self.n_heads, rope=True)
        if self.window < 0 or self.n_global < 0:
            raise ValueError(f"model.window={self.window} and model.n_global={self.n_global} "
                             "must be >= 0")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"model.top_k={self.top_k} must be in [1, model.n_experts="
                             f"{self.n_experts}]")
        if not -1 <= self.pkm_layer <= self.n_layers:
            raise ValueError(f"model.pkm_layer={self.pkm_layer} must be in [-1, model.n_layers="
                             f"{self.n_layers}] (1-based; 0: no PKM; -1: the middle block)")
        if self.pkm_layer and not 1 <= self.pkm_topk <= self.pkm_sub:
            raise ValueError(f"model.pkm_topk={self.pkm_topk} must be in [1, model.pkm_sub="
                             f"{self.pkm_sub}]")
        if self.workspace and not any(self.has_sga(i) for i in range(self.n_layers)):
            raise ValueError(f"model.workspace=True needs an SGA block to read it (model.sga_every="
                             f"{self.sga_every} > model.n_layers={self.n_layers})")
        if self.moe_temperature <= 0:
            raise ValueError(f"model.moe_temperature={self.moe_temperature} must be > 0")

    def has_sga(self, i: int) -> bool:
        return (i + 1) % self.sga_every == 0

    def has_moe(self, i: int) -> bool:
        return (i + 1) % self.moe_every == 0

    @property
    def pkm_block(self) -> int:
        """The 1-based block hosting the PKM (0: none)."""
        return max(1, self.n_layers // 2) if self.pkm_layer == -1 else self.pkm_layer

    def has_pkm(self, i: int) -> bool:
        return self.pkm_block == i + 1

    @property
    def out_scale(self) -> float:
        return 1.0 / math.sqrt(2 * self.n_layers)        # SGA and MoE outputs (§5)

    def block_(self, i: int, rngs: nnx.Rngs) -> HydraBlock:
        D = self.dim
        sga = moe = pkm = None
        ssm = HydraSSM(D, rngs=rngs, init_std=self.init_std, impl=self.impl, block=self.block)
        if self.has_sga(i):
            sga = SparseGlobalAttention(D, self.n_heads, rngs=rngs, window=self.window,
                                        n_global=self.n_global, rope_base=self.rope_base,
                                        init_std=self.init_std, out_scale=self.out_scale)
        if self.has_moe(i):
            moe = MoE(D, self.moe_hidden, self.n_experts, self.top_k, rngs=rngs,
                      chunk=self.moe_chunk, temperature=self.moe_temperature,
                      router_std=self.router_std, init_std=self.init_std,
                      out_scale=self.out_scale, block=self.block, prefix=AUX, z_stat=self.z_stat,
                      scheduled_temperature=self.moe_scheduled_temperature)
        if self.has_pkm(i):
            pkm = ProductKeyMemory(D, rngs=rngs, n_sub=self.pkm_sub, d_key=self.pkm_key,
                                   d_value=self.pkm_value, n_heads=self.pkm_heads,
                                   topk=self.pkm_topk, reselect=True, init_std=self.init_std)
        return HydraBlock(D, ssm=ssm, sga=sga, moe=moe, pkm=pkm,
                          g_init=(self.g_ssm, self.g_sga, self.g_moe), norm_eps=self.norm_eps)

    def aux_terms(self, aux) -> dict:
        """Hydra's load balance E Σ u_e² − 1 over every MoE block's gates (weight 0.01 in the
        prototype, `train.aux_weights.load_balance`); the router z statistic with `z_stat`."""
        if f"{AUX}/gate_sum" not in aux:
            return {}
        out = {"load_balance": usage_loss(aux, prefix=AUX)}
        if self.z_stat:
            out["router_z"] = z_loss(aux, prefix=AUX)
        return out


def hydra_param_count(cfg: HydraConfig) -> int:
    """hydra.md §3.2's accounting on this layout: V d + blocks (the SSM's 5d² + d and its norm,
    3 g scalars) + SGA blocks (4 d² + the controller's d + 1 + norm) + MoE blocks (E 3 d h +
    router E d + m_{-1} d + norm, + 1 with a scheduled temperature) + the PKM (pkm_params + gate d + 1 + norm) + final norm."""
    D = cfg.dim
    n = cfg.n_layers
    blocks = n * (hydra_ssm_params(D) + D + 3)
    blocks += sum(4 * D * D + D + 1 + D for i in range(n) if cfg.has_sga(i))
    blocks += sum(cfg.n_experts * 3 * D * cfg.moe_hidden + cfg.n_experts * D + D + D
                  + cfg.moe_scheduled_temperature for i in range(n) if cfg.has_moe(i))
    if cfg.pkm_block:
        blocks += pkm_params(D, cfg.pkm_sub, cfg.pkm_key, cfg.pkm_value, cfg.pkm_heads) + 2 * D + 1
    if cfg.workspace:
        blocks += workspace_params(D, cfg.ws_slots, cfg.ws_rank)
    return lm_param_count(blocks, vocab_size=cfg.vocab_size, dim=D,
                          tie_embeddings=cfg.tie_embeddings)


def hydra_flops(cfg: HydraConfig, seq_len: int) -> float:
    """Training FLOPs per token (`zoo.lm`'s convention, 3 x forward). SSM: W_param, W_skip and
    C s (2·4d² + 2d² + 2d). SGA: q, k, v, o (4 · 2d²) and the dense scores and values over
    its keys (the state's G + W + 1 slots and the call's tokens: 4 d (G + W + 1 + T) per
    query). MoE: `layers.moe.moe_flops`. PKM: W_q, both halves' sub-key scores, the value
    reads (top-k re-selected per head) and W_o. With the workspace the blocks run on the scan's
    slices (`workspace_steps` slices of L = min(C_w, T) tokens, pads included, in place of one
    call of T), every SGA query also scores and reads the S slots (4 d S), and every step
    projects the slots to keys and values in every SGA (2 · 2d² S) and computes a write."""
    D, T = cfg.dim, seq_len
    L, steps = T, 1
    if cfg.workspace:
        L, steps = min(cfg.ws_chunk, T), workspace_steps(T, cfg.ws_chunk, aligned=True)
    n_sga = sum(cfg.has_sga(i) for i in range(cfg.n_layers))
    f = cfg.n_layers * (2.0 * D * 4 * D + 2.0 * D * D + 2.0 * D)
    f += n_sga * (4 * 2.0 * D * D + 4.0 * D * (cfg.n_global + cfg.window + 1 + L))
    f += sum(moe_flops(D, cfg.moe_hidden, cfg.n_experts, cfg.top_k, L, cfg.block)
             for i in range(cfg.n_layers) if cfg.has_moe(i))
    if cfg.pkm_block:
        H, dk, dv, n, k = cfg.pkm_heads, cfg.pkm_key, cfg.pkm_value, cfg.pkm_sub, cfg.pkm_topk
        f += 2.0 * D * H * 2 * dk + 2.0 * H * 2 * n * dk + 2.0 * H * k * dv + 2.0 * dv * D
    if cfg.workspace:
        S = cfg.ws_slots
        f += n_sga * 4.0 * D * S
        per_step = n_sga * 2 * 2.0 * D * D * S + workspace_write_flops(D, S, cfg.ws_rank)
        f = f * steps * L / T + steps * per_step / T
    return lm_flops(f, vocab_size=cfg.vocab_size, dim=D)


def workspace_steps(T: int, chunk: int, *, aligned: bool) -> int:
    """Chunk steps of HydraLM's scan for a call of T tokens, slices of min(chunk, T): one per
    chunk the call touches (`aligned`: the call starts at a chunk edge, as a call without state
    does); a call that may start inside a chunk needs one more (its first, partial chunk)."""
    L = min(chunk, T)
    if T == 1:
        return 1
    return -(-T // L) if aligned else -(-(T - 1) // L) + 1


class HydraLM(CausalLM):
    """Hydra with its workspace (§2.5, the contract note): a scan over workspace chunks. Each
    step takes, per row, the call's tokens up to the next chunk edge (a slice of min(C_w, T),
    right padded), runs the whole block stack on it with that row's slots M_c as the SGA
    `context` (the blocks carry their states from slice to slice, as across calls), applies the
    final norm and adds the slice to the chunk's mean; a completed chunk writes M_{c+1}, read by
    the next slice. Rows may sit at different chunk offsets (a carried state): the slices are
    gathered per row. State: {"pos", "layers", "workspace": WorkspaceState}. Packed documents
    (segment_ids) are rejected: a document start inside a chunk would need its own slice."""

    def __init__(self, *, workspace: Workspace, **kw):
        super().__init__(**kw)
        self.workspace = workspace

    def init_state(self, batch_size: int, max_len: int | None = None):
        return {**super().init_state(batch_size, max_len),
                "workspace": self.workspace.init_state(batch_size)}

    def __call__(self, tokens, state=None, *, mask=None, segment_ids=None, key=None):
        if segment_ids is not None:
            raise ValueError("hydra with model.workspace=True takes no packed documents "
                             "(segment_ids): train it on unpacked sequences")
        B, T = tokens.shape
        aligned = state is None
        state = self.init_state(B) if state is None else state
        m = real_mask(mask, B, T)
        pos, _, next_pos = token_positions(state["pos"], jnp.zeros((B, T), bool), m)
        h = self.embed_tokens(tokens, pos, fold(key, 0))
        C, L = self.workspace.chunk, min(self.workspace.chunk, T)
        n_real = jnp.sum(m, axis=1).astype(jnp.int32)
        b = jnp.arange(B)[:, None]
        j = jnp.arange(L)[None, :]

        def step(carry, k):
            ptr, layers, ws, out = carry
            start = state["pos"] + ptr                     # position of the slice's first token
            n = jnp.clip(jnp.minimum(C - start % C, n_real - ptr), 0, L)
            idx, valid = ptr[:, None] + j, j < n[:, None]
            x = jnp.take_along_axis(h, jnp.minimum(idx, T - 1)[..., None], axis=1)
            new_layers, auxes = [], []
            for i in range(len(self.blocks)):
                x, s, a = self.call_block(i, x, layers[i], mask=valid, segment_ids=None,
                                          key=fold(key, 1000 + k), context=ws.slots)
                new_layers.append(s)
                auxes.append(a)
            z = self.final_norm(x)
            ws = self.workspace.absorb(ws, z, valid, (n > 0) & ((start + n) % C == 0))
            out = out.at[b, jnp.where(valid, idx, T)].set(z.astype(out.dtype), mode="drop")
            return (ptr + n, tuple(new_layers), ws, out), sum_aux(auxes)

        layers = tuple(s if s is not None else blk.init_state(B)
                       for s, blk in zip(state["layers"], self.blocks))
        carry = (jnp.zeros((B,), jnp.int32), layers, state["workspace"],
                 jnp.zeros(h.shape, jnp.float32))
        steps = workspace_steps(T, C, aligned=aligned)
        if steps == 1:
            carry, aux = step(carry, 0)
        else:
            carry, auxes = jax.lax.scan(step, carry, jnp.arange(steps))
            aux = jax.tree.map(lambda a: jnp.sum(a, axis=0), auxes)
        _, layers, ws, z = carry
        logits = self.embed.attend(z) if self.head is None else self.head(z)
        return (logits.astype(jnp.float32),
                {"pos": next_pos, "layers": layers, "workspace": ws}, aux)


def decision_margins(model: CausalLM, tokens, mask=None) -> list:
    """Per discrete decision of the forward of `tokens`, a [B, T] margin: each MoE block's
    top-k gap (on its chunk routing features), each SGA block's |r_j|, the PKM's top-k gaps of
    both halves (the smaller, per head)."""
    B, T = tokens.shape
    h = model.embed_tokens(tokens, jnp.zeros((B, T), jnp.int32))
    real = jnp.ones((B, T), bool) if mask is None else mask.astype(bool)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    out = []
    for blk in model.blocks:
        if blk.moe is not None:
            a = blk.norm_moe(h)
            feats, _ = chunk_route_features(a, real, pos, jnp.sum(real, 1).astype(jnp.int32),
                                            blk.moe.init_state(B), blk.moe.m_init[...],
                                            blk.moe.chunk)
            out.append(margins(blk.moe.routing(feats, real)))
        if blk.sga is not None:
            out.append(jnp.abs(blk.sga.scores(blk.norm_sga(h))))
        if blk.pkm is not None:
            a = blk.norm_pkm(blk.paths(h, None, mask=mask)[0])
            q = blk.pkm.wq(a.astype(jnp.float32)).reshape(B, T, blk.pkm.n_heads, -1)
            dk, k = blk.pkm.d_key, blk.pkm.topk
            for half, keys in ((q[..., :dk], blk.pkm.k1[...]), (q[..., dk:], blk.pkm.k2[...])):
                s = jnp.einsum("bthd,hnd->bthn", half, keys)
                if k < s.shape[-1]:
                    top = jax.lax.top_k(s, k + 1)[0]
                    out.append(jnp.min(top[..., k - 1] - top[..., k], axis=-1))
        h = blk(h, None, mask=mask)[0]
    return out


def check_margins(model: CausalLM, tokens, mask=None) -> None:
    for i, m in enumerate(decision_margins(model, tokens, mask)):
        if mask is not None:
            m = jnp.where(mask, m, jnp.inf)
        low = float(jnp.min(m))
        assert low > MARGIN, f"decision {i}: a margin of {low:.3g} <= {MARGIN}"


# The conformance config: 3 blocks (SGA at block 2, MoE in every block, the PKM after block 1),
# a window of 3 keys + 2 globals and MoE chunks of 4 so that length 13 crosses both several
# times; 4 experts top-2 with a wide router (router std 1) and init std 0.25: every decision of the
# conformance runs clears MARGIN (tests/test_hydra.py; std 0.3 left a PKM gap at 4.5e-5).
_TINY = dict(vocab_size=37, dim=16, n_layers=3, n_heads=2, sga_every=2, window=3, n_global=2,
             moe_every=1, n_experts=4, top_k=2, moe_hidden=24, moe_chunk=4, router_std=1.0,
             pkm_layer=1, pkm_sub=6, pkm_key=4, pkm_value=8, pkm_heads=2, pkm_topk=2,
             init_std=0.25, block=4, impl="reference")


@register("hydra", config=HydraConfig, param_count=hydra_param_count, flops=hydra_flops,
          conformance=ConformanceSpec(config=HydraConfig(**_TINY), length=13,
                                      cuts=(1, 3, 4, 8, 12), check_margins=check_margins,
                                      reference={"impl": "reference"},
                                      fast=({"impl": "chunked", "block": 4},
                                            {"impl": "pallas_interpret", "block": 8}),
                                      flops_config=HydraConfig(**{**_TINY, "dim": 128,
                                                                  "n_heads": 4,
                                                                  "moe_hidden": 256})))
def build_hydra(cfg: HydraConfig, rngs: nnx.Rngs) -> CausalLM:
    cfg.validate()
    ws = {}
    if cfg.workspace:
        ws = dict(lm_cls=HydraLM, workspace=Workspace(
            cfg.dim, rngs=rngs, n_slots=cfg.ws_slots, rank=cfg.ws_rank, chunk=cfg.ws_chunk,
            slot_std=cfg.ws_slot_std, init_std=cfg.init_std))
    return build_lm(lambda: [cfg.block_(i, rngs) for i in range(cfg.n_layers)],
                    vocab_size=cfg.vocab_size, dim=cfg.dim,
                    final_norm=RMSNorm(cfg.dim, eps=cfg.norm_eps), rngs=rngs,
                    tie_embeddings=cfg.tie_embeddings, init_std=cfg.init_std,
                    aux_terms=cfg.aux_terms, **ws)


def hydra_1p6b(**kw) -> HydraConfig:
    """§3.2's layout: d 2048, 24 blocks, GPT-NeoX vocabulary (50,280, tied), 16 heads x 128,
    SGA at blocks 3, 6, ..., 24 (W 255 + 512 globals), MoE at even blocks (E 8, top-2, hidden
    1408, C 32), one PKM after the middle block 12 (256 x 256 keys, d_k 128, d_v 512, 4 heads,
    top-32) and the workspace (64 slots, rank 128, C_w 64) shared by the SGA blocks."""
    return HydraConfig(**{**dict(vocab_size=50280, dim=2048, n_layers=24, n_heads=16,
                                 pkm_layer=-1, workspace=True), **kw})


PRESETS = {"hydra_1p6b": hydra_1p6b}
