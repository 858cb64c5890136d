"""Linear-memory language models (specs/mom.md §2.6, §2.8, §3): `linear_attention`, `gla`,
`deltanet` and `gated_deltanet`, the bases of MoM, each a stack of MoM's block (§3)

    h = h + LinearMemoryMixer(RMSNorm(h));  h = h + SwiGLU(RMSNorm(h))     (RMSNorm eps 1e-6)

between a N(0, 0.02) embedding and a final RMSNorm with the head tied to the embedding; no
positional encoding. The mixer is `layers.linear_memory.LinearMemoryMixer`.

Config fields (one dataclass per model, the same fields, per-model defaults; stable: MoM's tests
build `linear_attention` and `gated_deltanet` through `zoo.build`):
  vocab_size, dim, n_layers    the LM
  n_heads                      memory heads H
  expand_k, head_dim           key/query head dim dk = head_dim, or int(dim * expand_k) // H
  expand_v                     value head dim dv = int(dk * expand_v)
  conv_size                    short causal conv kernel on q, k, v (SiLU); None: no convs
  output_gate                  per-head RMSNorm x SiLU(x W_G) (True) or plain RMSNorm (False)
  feature_map, normalize       linear attention only: phi in {identity, elu1, relu}; fla's
                               normaliser o / (scale q.sum(k) + 1e-10)
  hidden_ratio, ffn_dim        SwiGLU width: ffn_dim, or 256 ceil(dim hidden_ratio 2/3 / 256)
  norm_eps                     every RMSNorm (1e-6)
  tie_embeddings, init_std     head tied to the embedding; N(0, init_std) embedding and MLP
  impl, block                  the op's implementation (`gla` or `gated_delta`: auto |
                               reference | chunked) and chunk block size (never changes the
                               function)
  compute_dtype, remat         as every zoo LM
Defaults follow flash-linear-attention's layers: linear attention without convs or gate
(identity feature map, no normaliser), GLA with expand_k 0.5 and the output gate, DeltaNet with
convs and no gate, Gated DeltaNet with convs, the gate and expand_v 2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from flax import nnx

from layers.common import check_block, check_impl
from layers.linear_memory import (
    FEATURE_MAPS,
    LinearMemoryMixer,
    linear_memory_mixer_flops,
    linear_memory_param_count,
    op_name,
)
from layers.norms import RMSNorm
from zoo.lm import (
    CausalLM,
    build_lm,
    lm_flops,
    lm_param_count,
    swiglu_block,
    swiglu_block_count,
    swiglu_block_flops,
)
from zoo.registry import ConformanceSpec, register


@dataclass(frozen=True)
class LinearMemoryConfig:
    """The fields of every linear-memory LM (module docstring); `kind` is the model's."""
    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    expand_k: float = 1.0
    head_dim: int | None = None
    expand_v: float = 1.0
    conv_size: int | None = 4
    output_gate: bool = True
    feature_map: str = "identity"
    normalize: bool = False
    hidden_ratio: float = 4.0
    ffn_dim: int | None = None
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    init_std: float = 0.02
    impl: str = "auto"
    block: int = 64
    compute_dtype: str = "float32"
    remat: str = "none"

    kind = "gated_deltanet"

    @property
    def dk(self) -> int:
        return self.head_dim or int(self.dim * self.expand_k) // self.n_heads

    @property
    def dv(self) -> int:
        return int(self.dk * self.expand_v)

    @property
    def d_ff(self) -> int:
        return self.ffn_dim or 256 * math.ceil(self.dim * self.hidden_ratio * 2 / 3 / 256)

    def validate(self):
        check_impl(self.impl, (op_name(self.kind),))
        check_block(self.block)
        if self.dk < 1 or self.dv < 1:
            raise ValueError(f"model.head_dim: key/value head dims {self.dk}/{self.dv} must be "
                             f">= 1 (dim={self.dim}, n_heads={self.n_heads})")
        if self.conv_size is not None and self.conv_size < 1:
            raise ValueError(f"model.conv_size={self.conv_size!r} must be None or >= 1")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"model.feature_map={self.feature_map!r} is not one of "
                             f"{FEATURE_MAPS}")
        if (self.normalize or self.feature_map != "identity") and self.kind != "linear_attention":
            raise ValueError(f"model.feature_map/model.normalize apply to linear_attention only, "
                             f"not {self.kind}")

    def mixer(self, rngs: nnx.Rngs) -> LinearMemoryMixer:
        return LinearMemoryMixer(self.dim, rngs=rngs, kind=self.kind, n_heads=self.n_heads,
                                 head_dim_k=self.dk, head_dim_v=self.dv, conv_size=self.conv_size,
                                 output_gate=self.output_gate, feature_map=self.feature_map,
                                 normalize=self.normalize, norm_eps=self.norm_eps,
                                 impl=self.impl, block=self.block)

    def param_count(self) -> int:
        mixer = linear_memory_param_count(self.kind, self.dim, self.n_heads, self.dk, self.dv,
                                          conv_size=self.conv_size, output_gate=self.output_gate)
        block = swiglu_block_count(mixer, dim=self.dim, ffn_dim=self.d_ff)
        return lm_param_count(self.n_layers * block, vocab_size=self.vocab_size, dim=self.dim,
                              tie_embeddings=self.tie_embeddings)

    def flops(self, seq_len: int) -> float:
        """Training FLOPs per token (`zoo.lm`'s convention): 3 x (L [mixer + SwiGLU] + 2 D V),
        the mixer's count being `linear_memory_mixer_flops` (independent of the length)."""
        mixer = linear_memory_mixer_flops(self.kind, self.dim, self.n_heads, self.dk, self.dv,
                                          conv_size=self.conv_size, output_gate=self.output_gate,
                                          normalize=self.normalize)
        block = swiglu_block_flops(mixer, dim=self.dim, ffn_dim=self.d_ff)
        return lm_flops(self.n_layers * block, vocab_size=self.vocab_size, dim=self.dim)


@dataclass(frozen=True)
class LinearAttentionConfig(LinearMemoryConfig):
    conv_size: int | None = None
    output_gate: bool = False
    kind = "linear_attention"


@dataclass(frozen=True)
class GLAConfig(LinearMemoryConfig):
    expand_k: float = 0.5
    conv_size: int | None = None
    kind = "gla"


@dataclass(frozen=True)
class DeltaNetConfig(LinearMemoryConfig):
    output_gate: bool = False
    kind = "deltanet"


@dataclass(frozen=True)
class GatedDeltaNetConfig(LinearMemoryConfig):
    expand_v: float = 2.0
    kind = "gated_deltanet"


def build_linear_memory_lm(cfg: LinearMemoryConfig, rngs: nnx.Rngs) -> CausalLM:
    cfg.validate()

    def blocks():
        for _ in range(cfg.n_layers):
            yield swiglu_block(cfg.mixer(rngs), dim=cfg.dim, ffn_dim=cfg.d_ff,
                               norm_eps=cfg.norm_eps, init_std=cfg.init_std, rngs=rngs)

    return build_lm(blocks, vocab_size=cfg.vocab_size, dim=cfg.dim,
                    final_norm=RMSNorm(cfg.dim, eps=cfg.norm_eps), rngs=rngs,
                    tie_embeddings=cfg.tie_embeddings, init_std=cfg.init_std,
                    compute_dtype=cfg.compute_dtype, remat=cfg.remat)


# Conformance: T = 13 with block 4 (not a multiple), cuts inside and at block edges; the tiny
# linear attention turns on the convs, the elu+1 map and the normaliser to cover those paths.
_TINY = dict(vocab_size=37, dim=16, n_layers=2, n_heads=2, head_dim=8, ffn_dim=32, block=4,
             init_std=0.5, impl="reference")
_TINY_EXTRA = {"linear_attention": dict(conv_size=4, feature_map="elu1", normalize=True)}
_FLOPS = dict(vocab_size=37, dim=64, n_layers=1, n_heads=2, head_dim=16, ffn_dim=128,
              impl="reference")
CONFIGS = {"linear_attention": LinearAttentionConfig, "gla": GLAConfig,
           "deltanet": DeltaNetConfig, "gated_deltanet": GatedDeltaNetConfig}

for _name, _cls in CONFIGS.items():
    register(_name, config=_cls, param_count=_cls.param_count, flops=_cls.flops,
             conformance=ConformanceSpec(
                 config=_cls(**_TINY, **_TINY_EXTRA.get(_name, {})), length=13,
                 cuts=(1, 3, 4, 8, 12), reference={"impl": "reference"},
                 # and the kernels in interpret mode (the gated delta rule; GLA's for GLA and
                 # plain linear attention)
                 fast=({"impl": "chunked", "block": 4}, {"impl": "pallas_interpret", "block": 4}),
                 flops_config=_cls(**_FLOPS)))(build_linear_memory_lm)


# ----------------------------------------------------------------------------- presets

def preset(name: str, size: str = "380m", **kw) -> LinearMemoryConfig:
    """The base models at MoM's scales (specs/mom.md §3 table: "380M" = D 1024, 24 layers,
    SwiGLU hidden_ratio 3; "1.3B" = D 2048, 24 layers, hidden_ratio 4; vocab 32000, tied):
    4 heads of dk 256 for linear attention, DeltaNet and Gated DeltaNet (MoM's memory shape,
    expand_v 1), GLA with fla's expand_k 0.5 (dk = D / 8)."""
    dim, ratio = {"380m": (1024, 3.0), "1.3b": (2048, 4.0)}[size]
    cls = CONFIGS[name]
    shape = dict(vocab_size=32000, dim=dim, n_layers=24, n_heads=4, hidden_ratio=ratio)
    if name != "gla":
        shape.update(head_dim=256, expand_v=1.0)
    return cls(**{**shape, **kw})


PRESETS = {f"{n}_{s}": (lambda n=n, s=s: preset(n, s))
           for n in CONFIGS for s in ("380m", "1.3b")}
