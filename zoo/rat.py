"""RAT (specs/rat.md): chunked recurrence + inter-chunk softmax attention, and the paper's hybrid
with sliding-window attention.

Registered as "rat" (every layer RAT, §4.1) and "rat_hybrid" (RAT at even layers, SWA at odd
layers, §4.2). Blocks: [mixer, FFN] with pre-RMSNorms (eps 1e-6); the FFN is the paper's GELU-4D
(`ffn="swiglu"` is the explicit option of §11). Tied embeddings, N(0, 0.02) weights (§7).
`chunk` is part of the model (§10 contract notes); `impl` chooses the `rat` op's form (and the
attention op's on the SWA layers), `block` the SWA attention's key block (neither changes the
function). The paper's attention baselines are `zoo.transformer`'s `rat_attention` presets.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from flax import nnx

from layers.attention import Attention, attention_mixer_flops
from layers.common import check_block, check_heads, check_impl, check_rope_head_dim
from layers.mlp import GeluMLP, SwiGLU, gelu_mlp_flops, swiglu_flops
from layers.norms import RMSNorm
from layers.rat import RATMixer, rat_mixer_count, rat_mixer_flops
from zoo.lm import Block, CausalLM, build_lm, causal_keys, lm_flops, lm_param_count
from zoo.registry import ConformanceSpec, register


@dataclass(frozen=True)
class RATConfig:
    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_groups: int = 2                 # G query/key groups, tiled (h mod G)
    chunk: int = 16                   # L, part of the model
    pe: str = "inter_rope"            # inter_rope | none (RAT layers)
    rope_base: float = 10000.0
    ffn: str = "gelu"                 # gelu (paper) | swiglu
    ffn_dim: int | None = None        # None: 4 * dim
    norm_eps: float = 1e-6
    window: int = 1024                # W of the hybrid's SWA layers (W + 1 keys)
    max_len: int = 4096               # decode cache: ceil(max_len / chunk) RAT slots
    init_std: float = 0.02
    impl: str = "auto"                # rat (and attention) op: auto | reference | chunked
    block: int = 128                  # SWA attention key block (never changes the function)
    compute_dtype: str = "float32"
    remat: str = "none"

    def validate(self):
        check_heads(self.dim, self.n_heads)
        if self.n_heads % self.n_groups:
            raise ValueError(f"model.n_heads={self.n_heads} is not a multiple of "
                             f"model.n_groups={self.n_groups}")
        if self.pe == "inter_rope":
            check_rope_head_dim(self.dim // self.n_heads,
                                f"model.dim={self.dim} / model.n_heads={self.n_heads}",
                                " (or model.pe='none')")
        for key, val in (("chunk", self.chunk), ("window", self.window), ("max_len", self.max_len)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"model.{key}={val!r} must be an integer >= 1")
        for key, val, ok in (("pe", self.pe, ("inter_rope", "none")),
                             ("ffn", self.ffn, ("gelu", "swiglu"))):
            if val not in ok:
                raise ValueError(f"model.{key}={val!r} is not one of {ok}")
        check_impl(self.impl, ("rat", "attention"))
        check_block(self.block)

    @property
    def d_ff(self) -> int:
        return self.ffn_dim or 4 * self.dim

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def _ffn(cfg: RATConfig, rngs: nnx.Rngs):
    if cfg.ffn == "gelu":
        return GeluMLP(cfg.dim, cfg.d_ff, rngs=rngs, std=cfg.init_std)
    return SwiGLU(cfg.dim, cfg.d_ff, rngs=rngs, std=cfg.init_std)


def is_rat_layer(i: int, hybrid: bool) -> bool:
    """RAT at every layer, or at even (0-based) layers of the hybrid (§4.2, §11)."""
    return not hybrid or i % 2 == 0


def build_block(cfg: RATConfig, i: int, hybrid: bool, rngs: nnx.Rngs) -> Block:
    if is_rat_layer(i, hybrid):
        mixer = RATMixer(cfg.dim, cfg.n_heads, cfg.n_groups, cfg.chunk, rngs=rngs, pe=cfg.pe,
                         rope_base=cfg.rope_base, max_len=cfg.max_len, std=cfg.init_std,
                         impl=cfg.impl)
    else:  # §4.2: causal MHA, token RoPE, window W, no biases, no output gate
        mixer = Attention(cfg.dim, cfg.n_heads, cfg.n_heads, cfg.head_dim, rngs=rngs,
                          rope_base=cfg.rope_base, window=cfg.window, max_len=cfg.max_len,
                          std=cfg.init_std, impl=cfg.impl, block=cfg.block)
    return Block(mixer, RMSNorm(cfg.dim, eps=cfg.norm_eps), _ffn(cfg, rngs),
                 RMSNorm(cfg.dim, eps=cfg.norm_eps))


def build(cfg: RATConfig, rngs: nnx.Rngs, hybrid: bool) -> CausalLM:
    cfg.validate()
    return build_lm(lambda: [build_block(cfg, i, hybrid, rngs) for i in range(cfg.n_layers)],
                    vocab_size=cfg.vocab_size, dim=cfg.dim,
                    final_norm=RMSNorm(cfg.dim, eps=cfg.norm_eps), rngs=rngs,
                    tie_embeddings=True, init_std=cfg.init_std,
                    compute_dtype=cfg.compute_dtype, remat=cfg.remat)


def _param_count(cfg: RATConfig, hybrid: bool) -> int:
    """§3 and §9: RAT layer D(3D + 2G d) + D (b_f) + D^2 + D (norm); SWA layer 4D^2 + D; FFN
    GELU 2DF or SwiGLU 3DF, + D (norm); tied embedding VD; final norm D."""
    D, F = cfg.dim, cfg.d_ff
    ffn = (2 if cfg.ffn == "gelu" else 3) * D * F + D
    blocks = [(rat_mixer_count(D, cfg.n_heads, cfg.n_groups) if is_rat_layer(i, hybrid)
               else 4 * D * D) + D + ffn for i in range(cfg.n_layers)]
    return lm_param_count(blocks, vocab_size=cfg.vocab_size, dim=D)


def _flops(cfg: RATConfig, seq_len: int, hybrid: bool) -> float:
    """Training FLOPs per token (`zoo.lm` convention): 3 x (per layer the RAT mixer
    (`rat_mixer_flops`: projections, recurrence, ceil(T / L) chunk slots per query) or the SWA
    mixer (window + 1 keys), + the FFN) + the tied head."""
    ffn = gelu_mlp_flops if cfg.ffn == "gelu" else swiglu_flops
    blocks = [(rat_mixer_flops(cfg.dim, cfg.n_heads, cfg.n_groups, cfg.chunk, seq_len)
               if is_rat_layer(i, hybrid) else
               attention_mixer_flops(cfg.dim, cfg.n_heads, cfg.n_heads, cfg.head_dim,
                                     causal_keys(seq_len, cfg.window)))
              + ffn(cfg.dim, cfg.d_ff) for i in range(cfg.n_layers)]
    return lm_flops(blocks, vocab_size=cfg.vocab_size, dim=cfg.dim)


def cache_size(cfg: RATConfig, seq_len: int) -> int:
    """Numbers held per RAT layer for a context of `seq_len` (§10 item 10):
    2 H ceil(T / L) d chunk slots + 2 D running states."""
    return 2 * cfg.n_heads * math.ceil(seq_len / cfg.chunk) * cfg.head_dim + 2 * cfg.dim


# Tiny test configs (§9.2): L = 4, length 13 (not a multiple of 4), cuts inside and at chunk
# edges (1, 3, 4, 8, 11); the hybrid's window 5 is shorter than the sequence. One RAT layer for
# "rat" (CI budget), two for the hybrid (RAT, SWA).
_TINY = RATConfig(vocab_size=37, dim=32, n_layers=2, n_heads=4, n_groups=2, chunk=4, ffn_dim=64,
                  window=5, max_len=16, init_std=0.1)
_CUTS = (1, 3, 4, 8, 11)


@register("rat", config=RATConfig, param_count=lambda c: _param_count(c, False),
          flops=lambda c, t: _flops(c, t, False),
          conformance=ConformanceSpec(config=dataclasses.replace(_TINY, n_layers=1), length=13,
                                      cuts=_CUTS, reference={"impl": "reference"},
                                      fast=({"impl": "chunked"},)))
def build_rat(cfg: RATConfig, rngs: nnx.Rngs) -> CausalLM:
    return build(cfg, rngs, hybrid=False)


@register("rat_hybrid", config=RATConfig, param_count=lambda c: _param_count(c, True),
          flops=lambda c, t: _flops(c, t, True),
          conformance=ConformanceSpec(config=_TINY, length=13, cuts=_CUTS,
                                      reference={"impl": "reference"},
                                      fast=({"impl": "chunked", "block": 4},)))
def build_rat_hybrid(cfg: RATConfig, rngs: nnx.Rngs) -> CausalLM:
    return build(cfg, rngs, hybrid=True)


# ----------------------------------------------------------------------------- presets

def rat_xl(chunk: int = 16, **kw) -> RATConfig:
    """The paper's 1.3B layout (§9.1): 24 layers, D 2048, 16 heads of 128, G 2, GELU-4D,
    vocabulary 32000, context 4096; for the hybrid, SWA window 1024 on odd layers."""
    base = dict(vocab_size=32000, dim=2048, n_layers=24, n_heads=16, n_groups=2, chunk=chunk,
                window=1024, max_len=4096)
    return dataclasses.replace(RATConfig(), **{**base, **kw})


PRESETS = {
    "rat_xl": rat_xl,
    "rat_xl_l64": lambda: rat_xl(64),
    "rat_xl_l128": lambda: rat_xl(128),
    "rat_xl_nope": lambda: rat_xl(pe="none"),
}
