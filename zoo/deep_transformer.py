"""The attention-like members of the ATLAS family (specs/atlas.md §2.7), on the exponential
feature map φ*'s kernel form:

* "deep_transformer" / "swdt": DeepTransformer (Eq. 25) with a linear memory on φ* in its
  normalised form (§8.10): causal softmax attention whose keys carry the write rate η_i, i.e.
  weights η_i·exp(s q_t·k_i) / Σ_j η_j·exp(s q_t·k_j); η ≡ 1 is softmax attention exactly. SWDT
  keeps the last c tokens: the shared sliding-window op with W = c − 1. They decode through the
  shared KV cache (the rate enters as one extra key channel, log η_i, met by a constant query
  channel 1/s). `memory_depth=2` is the spec's flagged two-layer construction (§2.7 "Deep
  versions", not the paper's: `layers.deep_phi.DeepPhiMixer`, the exact online model b = 1).
* "dot":       Dot, the Deep Omega Transformer (Eq. 27) at c = 1 on a linear memory over φ*: the
               kernelised delta rule of Eqs. 30–31 (`layers.dot.DotMixer`, op
               `pallas_kernels.kernel_delta`), unnormalised as Eq. 27 defines it; its window
               c > 1 token loop stays a test reference (`tests/memory_reference.py`).

Each replaces attention in a Llama-style block (zoo.lm.swiglu_block), RoPE on q, k (§3 [choice]).
"""
from __future__ import annotations

from dataclasses import dataclass

from flax import nnx

from layers.common import check_block, check_heads, check_impl
from layers.deep_phi import DeepPhiMixer, deep_phi_extra_params, deep_phi_mixer_flops
from layers.deep_transformer import DeepTransformerMixer, deep_transformer_mixer_flops
from layers.dot import DotMixer, dot_mixer_flops
from layers.mlp import llama_ffn_dim
from layers.norms import RMSNorm
from zoo.lm import (
    CausalLM,
    build_lm,
    causal_keys,
    lm_flops,
    lm_param_count,
    swiglu_block,
    swiglu_block_count,
    swiglu_block_flops,
)
from zoo.registry import ConformanceSpec, register

# ----------------------------------------------------------------------------- DeepTransformer / SWDT


@dataclass(frozen=True)
class DeepTransformerConfig:
    """DeepTransformer (window None) / SWDT (window c: the last c tokens, W = c − 1) with a linear
    memory on φ*, normalised (atlas.md §2.7, §8.10), α ≡ 1. rate_gate: the write rate
    η_i = sigmoid(x_i w_η + b_η) per head (False: η ≡ 1, exactly softmax attention with RoPE).
    Llama-style blocks; kernel scale s = 1/sqrt(d) on the RoPE'd q, k. The mixer is
    `layers.deep_transformer.DeepTransformerMixer`; impl / block: the attention op's."""
    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    window: int | None = None
    rate_gate: bool = True
    rate_bias: float = 2.0
    rope_base: float = 10000.0
    max_len: int = 2048             # KV-cache length
    ffn_dim: int | None = None
    norm_eps: float = 1e-6
    init_std: float = 0.02
    tie_embeddings: bool = True
    impl: str = "auto"              # op attention
    block: int = 128                # attention key block (never changes the function)
    # 2: the two-layer memory on φ* (layers.deep_phi; atlas.md §2.7 "Deep versions", a
    # construction the spec flags as its own choice, not the paper's); 1: the linear memory
    memory_depth: int = 1
    memory_hidden: int | None = None    # h of the two-layer memory (None: the head dim)

    def validate(self):
        check_impl(self.impl, ("attention",))
        check_block(self.block)
        if self.memory_depth not in (1, 2):
            raise ValueError(f"model.memory_depth={self.memory_depth!r} is not 1 (linear memory "
                             "on φ*) or 2 (the flagged two-layer construction)")
        if self.memory_hidden is not None and self.memory_hidden < 1:
            raise ValueError(f"model.memory_hidden={self.memory_hidden} must be >= 1")
        if self.window is not None and self.window < 1:
            raise ValueError(f"model.window={self.window} must be >= 1 (tokens kept, c)")
        check_heads(self.dim, self.n_heads, rope=True)

    @property
    def hd(self) -> int:
        return self.dim // self.n_heads

    @property
    def d_ff(self) -> int:
        return self.ffn_dim or llama_ffn_dim(self.dim, 256 if self.dim >= 512 else 64)


def deep_transformer_param_count(cfg: DeepTransformerConfig) -> int:
    """Blocks of q, k, v, o [D, H d], the rate gate [D, H] + bias, (depth 2) W_1^0 [H, h, d],
    and the SwiGLU."""
    D, Hd = cfg.dim, cfg.n_heads * cfg.hd
    mixer = 4 * D * Hd + ((D + 1) * cfg.n_heads if cfg.rate_gate else 0)
    if cfg.memory_depth == 2:
        mixer += deep_phi_extra_params(cfg.n_heads, cfg.memory_hidden or cfg.hd, cfg.hd)
    block = swiglu_block_count(mixer, dim=D, ffn_dim=cfg.d_ff)
    return lm_param_count([block] * cfg.n_layers, vocab_size=cfg.vocab_size, dim=D,
                          tie_embeddings=cfg.tie_embeddings)


def deep_transformer_flops(cfg: DeepTransformerConfig, seq_len: int) -> float:
    """Training FLOPs per token (`zoo.lm`'s convention): 3 x (n_layers x [8 D H d + 2 D H (rate
    gate) + 4 H keys (d + 1) + 6 D F] + 2 D V) (`deep_transformer_mixer_flops` in a
    `swiglu_block`), keys = seq_len (DeepTransformer) or the c = window tokens kept (SWDT:
    window W = c − 1, W + 1 keys; the reference op computes every key and masks them)."""
    keys = causal_keys(seq_len, None if cfg.window is None else cfg.window - 1)
    if cfg.memory_depth == 2:
        mixer = deep_phi_mixer_flops(cfg.dim, cfg.n_heads, cfg.memory_hidden or cfg.hd,
                                     min(cfg.max_len, keys + 1), cfg.rate_gate)
    else:
        mixer = deep_transformer_mixer_flops(cfg.dim, cfg.n_heads, keys, cfg.rate_gate)
    block = swiglu_block_flops(mixer, dim=cfg.dim, ffn_dim=cfg.d_ff)
    return lm_flops([block] * cfg.n_layers, vocab_size=cfg.vocab_size, dim=cfg.dim)


def build_deep_transformer_lm(cfg: DeepTransformerConfig, rngs: nnx.Rngs) -> CausalLM:
    """[DeepTransformerMixer, SwiGLU] blocks (`zoo.lm.swiglu_block`) in the shared LM scaffold."""
    cfg.validate()
    kw = dict(rngs=rngs, window=cfg.window, rate_gate=cfg.rate_gate, rate_bias=cfg.rate_bias,
              rope_base=cfg.rope_base, max_len=cfg.max_len, init_std=cfg.init_std,
              impl=cfg.impl, block=cfg.block)
    if cfg.memory_depth == 2:
        mixer = lambda: DeepPhiMixer(cfg.dim, cfg.n_heads, hidden=cfg.memory_hidden, **kw)
    else:
        mixer = lambda: DeepTransformerMixer(cfg.dim, cfg.n_heads, **kw)
    blocks = [swiglu_block(mixer(), dim=cfg.dim, ffn_dim=cfg.d_ff, norm_eps=cfg.norm_eps,
                           init_std=cfg.init_std, rngs=rngs) for _ in range(cfg.n_layers)]
    return build_lm(blocks, vocab_size=cfg.vocab_size, dim=cfg.dim,
                    final_norm=RMSNorm(cfg.dim, eps=cfg.norm_eps), rngs=rngs,
                    tie_embeddings=cfg.tie_embeddings, init_std=cfg.init_std)


_TINY_DT = dict(vocab_size=37, dim=16, n_layers=2, n_heads=2, max_len=64, init_std=0.1,
                rate_bias=0.0)


@register("deep_transformer", config=DeepTransformerConfig, param_count=deep_transformer_param_count,
          flops=deep_transformer_flops,
          conformance=ConformanceSpec(
              config=DeepTransformerConfig(**_TINY_DT), length=13, cuts=(1, 6, 7, 12),
              reference={"impl": "reference"}, fast=({"impl": "chunked", "block": 4}, {"impl": "pallas_interpret", "block": 8})))
def build_deep_transformer(cfg: DeepTransformerConfig, rngs: nnx.Rngs) -> CausalLM:
    return build_deep_transformer_lm(cfg, rngs)


@dataclass(frozen=True)
class SWDTConfig(DeepTransformerConfig):
    """SWDT: DeepTransformer over the last c tokens (window c, attention op W = c − 1)."""
    window: int | None = 512


@register("swdt", config=SWDTConfig, param_count=deep_transformer_param_count,
          flops=deep_transformer_flops,
          conformance=ConformanceSpec(
              config=SWDTConfig(**_TINY_DT, window=4), length=13, cuts=(1, 6, 7, 12),
              reference={"impl": "reference"}, fast=({"impl": "chunked", "block": 4}, {"impl": "pallas_interpret", "block": 8})))
def build_swdt(cfg: SWDTConfig, rngs: nnx.Rngs) -> CausalLM:
    if cfg.window is None:
        raise ValueError("model.window=None is the full DeepTransformer; use 'deep_transformer'")
    return build_deep_transformer_lm(cfg, rngs)


# ----------------------------------------------------------------------------- Dot


@dataclass(frozen=True)
class DotConfig:
    """Dot, the Deep Omega Transformer (atlas.md §2.7, Eq. 27; Eqs. 30–31 in closed form): the
    kernelised delta rule on φ* with c = 1, M_0 = 0, α ≡ 1 (`layers.dot.DotMixer`, whose
    docstring states the choices: RoPE then ℓ2-normalised q, k, kernel scale s, write rate
    η = sigmoid per head) in Llama-style blocks. impl: the kernel_delta op's."""
    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    rate_bias: float = 0.0
    kernel_scale: float = 0.5       # s of κ(a, b) = exp(s a·b)
    rope_base: float = 10000.0
    max_len: int = 2048             # KV-cache length
    ffn_dim: int | None = None
    norm_eps: float = 1e-6
    init_std: float = 0.02
    tie_embeddings: bool = True
    impl: str = "auto"              # op kernel_delta

    def validate(self):
        check_impl(self.impl, ("kernel_delta",))
        check_heads(self.dim, self.n_heads, rope=True)
        if not 0 < self.kernel_scale <= 0.69:
            raise ValueError(f"model.kernel_scale={self.kernel_scale} must be in (0, 0.69]: a "
                             "write is contractive only while η·exp(s) <= 2 (η <= 1)")

    @property
    def d_ff(self) -> int:
        return self.ffn_dim or llama_ffn_dim(self.dim, 256 if self.dim >= 512 else 64)


def dot_param_count(cfg: DotConfig) -> int:
    D = cfg.dim
    block = swiglu_block_count(4 * D * D + (D + 1) * cfg.n_heads, dim=D, ffn_dim=cfg.d_ff)
    return lm_param_count([block] * cfg.n_layers, vocab_size=cfg.vocab_size, dim=D,
                          tie_embeddings=cfg.tie_embeddings)


def dot_flops(cfg: DotConfig, seq_len: int) -> float:
    """Training FLOPs per token: 3 x (n_layers x [`dot_mixer_flops` over the seq_len keys the
    forms compute (masked to the causal triangle) + 6 D F] + 2 D V)."""
    mixer = dot_mixer_flops(cfg.dim, cfg.n_heads, causal_keys(seq_len))
    block = swiglu_block_flops(mixer, dim=cfg.dim, ffn_dim=cfg.d_ff)
    return lm_flops([block] * cfg.n_layers, vocab_size=cfg.vocab_size, dim=cfg.dim)


@register("dot", config=DotConfig, param_count=dot_param_count, flops=dot_flops,
          conformance=ConformanceSpec(
              config=DotConfig(vocab_size=37, dim=16, n_layers=2, n_heads=2, max_len=64,
                               init_std=0.1), length=13, cuts=(1, 6, 7, 12),
              reference={"impl": "reference"}, fast=({"impl": "chunked"},)))
def build_dot(cfg: DotConfig, rngs: nnx.Rngs) -> CausalLM:
    """Dot (Eq. 27, c = 1): [DotMixer, SwiGLU] blocks in the shared LM scaffold."""
    cfg.validate()
    mixer = lambda: DotMixer(cfg.dim, cfg.n_heads, rngs=rngs, rate_bias=cfg.rate_bias,  # noqa: E731
                             scale=cfg.kernel_scale, rope_base=cfg.rope_base,
                             max_len=cfg.max_len, norm_eps=cfg.norm_eps, init_std=cfg.init_std,
                             impl=cfg.impl)
    blocks = [swiglu_block(mixer(), dim=cfg.dim, ffn_dim=cfg.d_ff, norm_eps=cfg.norm_eps,
                           init_std=cfg.init_std, rngs=rngs) for _ in range(cfg.n_layers)]
    return build_lm(blocks, vocab_size=cfg.vocab_size, dim=cfg.dim,
                    final_norm=RMSNorm(cfg.dim, eps=cfg.norm_eps), rngs=rngs,
                    tie_embeddings=cfg.tie_embeddings, init_std=cfg.init_std)
