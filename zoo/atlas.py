"""ATLAS family (specs/atlas.md): Atlas and OmegaNet on the shared neural-memory layer, and the
attention-like DeepTransformer / SWDT through the kernel form of the exponential feature map.

* "atlas":     Omega rule (window c, paper-literal gates γ) + momentum + Newton–Schulz (Muon),
               learning rate outside the momentum (Eqs. 32–33), polynomial features, MLP memory.
* "omeganet":  Omega rule + plain gradient descent + polynomial features (Eq. 10).
  Both are `layers.memory.NeuralMemory` with the parts of `layers.memory_parts` plugged in: a
  subclass overrides `gates` (ATLAS letters: α retention, η learning rate, θ momentum, γ window
  gates), `features` (learnable polynomial map) and `rule` (Newton–Schulz transform, keep-gate
  option). The chunk b and window c are part of the model (atlas.md §7 contract notes).
* "deep_transformer" / "swdt": DeepTransformer with a linear memory on φ* in its normalised form
  (atlas.md §2.7, §8.10): causal softmax attention whose keys carry the write rate η_i, i.e.
  weights η_i·exp(s q_t·k_i) / Σ_j η_j·exp(s q_t·k_j); η ≡ 1 is softmax attention exactly. SWDT
  keeps the last c tokens: the shared sliding-window op with W = c − 1. They decode through the
  shared KV cache (the rate enters as one extra key channel, log η_i, met by a constant query
  channel 1/s). The deep (multi-layer φ*) variants and Dot are not built as models: the paper
  gives no exact construction for deep φ* memories, and Dot's normalised form is not defined;
  Dot's exact kernel forms (triangular solve, token loop) are in `layers.memory_parts`.

Choices: ATLAS gates are per-head scalars from linear maps of x_t; polynomial degree p with
exact symmetric features on the ℓ2-normalised per-head q, k (no down-projection); the degree-1
block is placed first in φ so that the MLP memory's residual (the first d_v inputs) is the
degree-1 block √a₁·x (atlas.md §8.4); `window_gates="keep"` is the per-token keep-gate
alternative of §8.1 (γ_i^{(t)} = g_i), carried for past tokens as a per-token extra that scales
the source's output signal.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from layers import memory_parts as mp
from layers.attention import Attention
from layers.common import param
from layers.deep_transformer import DeepTransformerMixer
from layers.embed import Embed
from layers.linear import Dense
from layers.memory import (NeuralMemory, NeuralMemoryConfig, make_rule,
                           neural_memory_param_count)
from layers.mlp import SwiGLU, llama_ffn_dim
from layers.norms import RMSNorm
from pallas_kernels.impl import check, check_block
from zoo.lm import Block, CausalLM, build_lm, lm_param_count
from zoo.registry import ConformanceSpec, register

Array = jax.Array

# ----------------------------------------------------------------------------- pluggable parts


@dataclass(frozen=True)
class NewtonSchulz:
    """Update transform of Atlas: NS_k on every weight matrix of the momentum (one head)."""
    steps: int = 5

    def __call__(self, S):
        return jax.tree.map(lambda s: mp.newton_schulz(s, steps=self.steps), S)


@dataclass(frozen=True)
class KeepGated:
    """Per-token keep gate γ_i^{(t)} = g_i (atlas.md §8.1): scales the output signal of source i
    (its gradient is linear in the signal), g travelling as the per-token extra "keep"."""
    base: Callable

    def __call__(self, pred, v, extra):
        return self.base(pred, v, extra) * extra["keep"]


def poly_features_heads(x: Array, a: Array) -> Array:
    """Per-head polynomial map, degree-1 block first: [√a₁ x, √a₀, √a₂ sym₂(x), …].
    x [..., H, d]; a [H, p+1]. φ(q)·φ(k) = Σ_i a_i (q·k)^i per head (order is immaterial)."""
    p = a.shape[-1] - 1
    sa = jnp.sqrt(a)
    order = [1, 0] + list(range(2, p + 1)) if p >= 1 else [0]
    return jnp.concatenate([mp.sym_features(x, i) * sa[:, i:i + 1] for i in order], axis=-1)


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class AtlasConfig:
    """Atlas / OmegaNet causal LM (Llama-style blocks, atlas.md §3).

    chunk b, window c: part of the model. momentum + ns_steps: Atlas (ns_steps = 0: identity
    transform, the "w/o Muon" ablation); no momentum: OmegaNet. feature: "poly" (degree
    poly_degree, learnable a_i = softplus(ρ_i), init 1/i!) or "identity". window_gates: "window"
    (c gates per step, paper-literal) or "keep" (per-token keep gate); c = 1 uses γ ≡ 1.
    Gate biases (ATLAS letters): alpha_bias → retention α = sigmoid(·) ≈ 0.993; lr_bias → η =
    lr_max·sigmoid(·) ≈ 0.01 at lr_max 0.1 (§6.2); theta_bias → momentum θ ≈ 0.73; gamma_bias →
    γ ≈ 0.9.
    """
    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    memory: str = "mlp"             # mlp | linear
    depth: int = 2
    expansion: int = 4
    chunk: int = 16
    window: int = 16
    momentum: bool = True
    ns_steps: int = 5
    feature: str = "poly"           # poly | identity
    poly_degree: int = 2
    window_gates: str = "window"    # window | keep
    lr_max: float = 0.1
    alpha_bias: float = 5.0
    lr_bias: float = -2.2
    theta_bias: float = 1.0
    gamma_bias: float = 2.2
    memory_init_std: float | None = None
    ffn_dim: int | None = None
    norm_eps: float = 1e-6
    init_std: float = 0.02
    tie_embeddings: bool = True
    impl: str = "auto"              # auto | reference | chunked (same function)
    max_resets: int = 4

    def validate(self):
        for key, val, ok in (("memory", self.memory, ("mlp", "linear")),
                             ("feature", self.feature, ("poly", "identity")),
                             ("window_gates", self.window_gates, ("window", "keep"))):
            if val not in ok:
                raise ValueError(f"model.{key}={val!r} is not one of {ok}")
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        if self.chunk < 1 or self.window < 1:
            raise ValueError(f"model.chunk={self.chunk} and model.window={self.window} must be >= 1")
        if self.feature == "poly" and self.poly_degree < 1:
            raise ValueError(f"model.poly_degree={self.poly_degree} must be >= 1")

    @property
    def hd(self) -> int:
        return self.dim // self.n_heads

    @property
    def feature_dim(self) -> int:
        return mp.poly_feature_dim(self.hd, self.poly_degree) if self.feature == "poly" else self.hd

    @property
    def d_ff(self) -> int:
        return self.ffn_dim or llama_ffn_dim(self.dim, 256 if self.dim >= 512 else 64)

    def memory_config(self) -> NeuralMemoryConfig:
        """The shared layer's config (its gate names are Titans': its alpha/theta/eta weights
        carry the ATLAS retention, learning-rate and momentum logits here)."""
        return NeuralMemoryConfig(
            dim=self.dim, n_heads=self.n_heads, memory=self.memory, depth=self.depth,
            expansion=self.expansion, objective="l2", chunk=self.chunk, window=self.window,
            momentum=self.momentum, lr_inside=False,
            feature_dim=self.feature_dim, lr_max=self.lr_max, alpha_bias=self.alpha_bias,
            theta_bias=self.lr_bias, eta_bias=self.theta_bias, norm_eps=self.norm_eps,
            init_std=self.init_std, memory_init_std=self.memory_init_std, impl=self.impl,
            max_resets=self.max_resets)


# ----------------------------------------------------------------------------- mixer


class AtlasMemory(NeuralMemory):
    """Atlas / OmegaNet mixer: the shared NeuralMemory with ATLAS gates, the Omega window, the
    polynomial feature map and (Atlas) Newton–Schulz on the momentum."""

    def __init__(self, cfg: AtlasConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg.memory_config(), rngs=rngs)
        self.acfg = cfg
        H, c = cfg.n_heads, cfg.window
        w_gamma = poly_rho = None
        if c > 1 or cfg.window_gates == "keep":
            n = H if cfg.window_gates == "keep" else H * c
            w_gamma = Dense(cfg.dim, n, rngs=rngs, use_bias=True, axes=("embed", "heads"),
                            std=cfg.init_std)
            w_gamma.bias[...] = jnp.full((n,), cfg.gamma_bias)
        if cfg.feature == "poly":
            rho0 = jnp.asarray(mp.poly_coeffs_init(cfg.poly_degree), jnp.float32)
            poly_rho = param(jnp.broadcast_to(rho0, (H, cfg.poly_degree + 1)), ("heads", None))
        self.w_gamma = nnx.data(w_gamma)
        self.poly_rho = nnx.data(poly_rho)

    def rule(self):
        rule = make_rule(self.cfg)
        if self.acfg.momentum and self.acfg.ns_steps > 0:
            rule = dataclasses.replace(rule, transform_fn=NewtonSchulz(self.acfg.ns_steps))
        if self.acfg.window_gates == "keep":
            rule = dataclasses.replace(rule, signal_fn=KeepGated(rule.signal_fn))
        return rule

    def features(self, q, k):
        if self.poly_rho is None:
            return q, k
        a = mp.poly_coeffs(self.poly_rho[...])
        return poly_features_heads(q, a), poly_features_heads(k, a)

    def gates(self, x):
        B, T, _ = x.shape
        H, c = self.acfg.n_heads, self.acfg.window
        f32 = lambda a: a.astype(jnp.float32)
        out = {"log_ret": jax.nn.log_sigmoid(f32(self.w_alpha(x))),          # log α_t
               "lr": self.acfg.lr_max * jax.nn.sigmoid(f32(self.w_theta(x))),  # η_t
               "log_mom": None, "gamma": None, "extra": None}
        if self.w_eta is not None:
            out["log_mom"] = jax.nn.log_sigmoid(f32(self.w_eta(x)))          # log θ_t
        if self.w_gamma is not None:
            g = mp.window_gates(f32(self.w_gamma(x)))
            if self.acfg.window_gates == "keep":
                out["extra"] = {"keep": g.reshape(B, T, H, 1)}
                out["gamma"] = jnp.ones((B, T, H, c), jnp.float32)
            else:
                out["gamma"] = g.reshape(B, T, H, c)                          # γ^{(t)}[j]
        return out

    def extra_proto(self, batch_size):
        if self.acfg.window_gates == "keep":
            return {"keep": jnp.zeros((batch_size, 1, self.acfg.n_heads, 1), jnp.float32)}
        return None


def atlas_mixer_param_count(cfg: AtlasConfig) -> int:
    n = neural_memory_param_count(cfg.memory_config())
    if cfg.window > 1 or cfg.window_gates == "keep":
        g = cfg.n_heads * (1 if cfg.window_gates == "keep" else cfg.window)
        n += cfg.dim * g + g
    if cfg.feature == "poly":
        n += cfg.n_heads * (cfg.poly_degree + 1)
    return n


def _lm(cfg, mixer_fn, rngs) -> CausalLM:
    blocks = [Block(mixer_fn(), RMSNorm(cfg.dim, eps=cfg.norm_eps),
                    SwiGLU(cfg.dim, cfg.d_ff, rngs=rngs, std=cfg.init_std),
                    RMSNorm(cfg.dim, eps=cfg.norm_eps)) for _ in range(cfg.n_layers)]
    embed = Embed(cfg.vocab_size, cfg.dim, rngs=rngs, std=cfg.init_std)
    head = None if cfg.tie_embeddings else Dense(cfg.dim, cfg.vocab_size, rngs=rngs,
                                                 axes=("embed", "vocab"), std=cfg.init_std)
    return CausalLM(embed=embed, blocks=blocks, final_norm=RMSNorm(cfg.dim, eps=cfg.norm_eps),
                    head=head)


def _lm_param_count(cfg, mixer_count: int) -> int:
    D = cfg.dim
    block = mixer_count + 3 * D * cfg.d_ff + 2 * D
    return cfg.vocab_size * D * (1 if cfg.tie_embeddings else 2) + cfg.n_layers * block + D


def atlas_param_count(cfg: AtlasConfig) -> int:
    return _lm_param_count(cfg, atlas_mixer_param_count(cfg))


def build_atlas_lm(cfg: AtlasConfig, rngs: nnx.Rngs) -> CausalLM:
    cfg.validate()
    return _lm(cfg, lambda: AtlasMemory(cfg, rngs=rngs), rngs)


_TINY = dict(vocab_size=37, dim=16, n_layers=1, n_heads=2, chunk=3, window=4, init_std=0.1,
             lr_max=0.5, lr_bias=0.0, alpha_bias=3.0)


@register("atlas", config=AtlasConfig, param_count=atlas_param_count,
          conformance=ConformanceSpec(
              config=AtlasConfig(**_TINY), length=13, cuts=(1, 3, 5, 12),
              reference={"impl": "reference"}, fast=({"impl": "chunked"},),
              atol=5e-5, rtol=5e-5))
def build_atlas(cfg: AtlasConfig, rngs: nnx.Rngs) -> CausalLM:
    """Atlas (Omega rule + Muon). Conformance tolerance 5e-5: five Newton–Schulz steps amplify
    float32 rounding differences (token loop vs chunk-parallel, sharded vs unsharded matmul
    order; measured 2.6e-5 on the sharded forward; atlas.md §6.3)."""
    if not cfg.momentum:
        raise ValueError("model.momentum=False is OmegaNet; use the 'omeganet' entry")
    return build_atlas_lm(cfg, rngs)


@dataclass(frozen=True)
class OmegaNetConfig(AtlasConfig):
    """OmegaNet: Omega rule + plain GD (no momentum, no Newton–Schulz) + polynomial features."""
    momentum: bool = False


@register("omeganet", config=OmegaNetConfig, param_count=atlas_param_count,
          conformance=ConformanceSpec(
              config=OmegaNetConfig(**_TINY), length=13, cuts=(1, 3, 5, 12),
              reference={"impl": "reference"}, fast=({"impl": "chunked"},)))
def build_omeganet(cfg: OmegaNetConfig, rngs: nnx.Rngs) -> CausalLM:
    if cfg.momentum:
        raise ValueError("model.momentum=True is Atlas; use the 'atlas' entry")
    return build_atlas_lm(cfg, rngs)


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

    def validate(self):
        check(self.impl, ("attention",))
        check_block(self.block)
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"model.window={self.window} must be >= 1 (tokens kept, c)")
        if (self.dim // self.n_heads) % 2:
            raise ValueError("RoPE needs an even head dim")

    @property
    def hd(self) -> int:
        return self.dim // self.n_heads

    @property
    def d_ff(self) -> int:
        return self.ffn_dim or llama_ffn_dim(self.dim, 256 if self.dim >= 512 else 64)


def deep_transformer_param_count(cfg: DeepTransformerConfig) -> int:
    D, Hd = cfg.dim, cfg.n_heads * cfg.hd
    mixer = 4 * D * Hd + ((D + 1) * cfg.n_heads if cfg.rate_gate else 0)
    block = mixer + 3 * D * cfg.d_ff + 2 * D     # + SwiGLU + two RMSNorms
    return lm_param_count([block] * cfg.n_layers, vocab_size=cfg.vocab_size, dim=D,
                          tie_embeddings=cfg.tie_embeddings)


def build_deep_transformer_lm(cfg: DeepTransformerConfig, rngs: nnx.Rngs) -> CausalLM:
    """[DeepTransformerMixer, SwiGLU] blocks with pre-RMSNorms in the shared LM scaffold."""
    cfg.validate()
    norm = lambda: RMSNorm(cfg.dim, eps=cfg.norm_eps)
    blocks = [Block(DeepTransformerMixer(cfg.dim, cfg.n_heads, rngs=rngs, window=cfg.window,
                                         rate_gate=cfg.rate_gate, rate_bias=cfg.rate_bias,
                                         rope_base=cfg.rope_base, max_len=cfg.max_len,
                                         init_std=cfg.init_std, impl=cfg.impl, block=cfg.block),
                    norm(), SwiGLU(cfg.dim, cfg.d_ff, rngs=rngs, std=cfg.init_std), norm())
              for _ in range(cfg.n_layers)]
    return build_lm(blocks, vocab_size=cfg.vocab_size, dim=cfg.dim, final_norm=norm(),
                    rngs=rngs, tie_embeddings=cfg.tie_embeddings, init_std=cfg.init_std)


_TINY_DT = dict(vocab_size=37, dim=16, n_layers=2, n_heads=2, max_len=64, init_std=0.1,
                rate_bias=0.0)


@register("deep_transformer", config=DeepTransformerConfig, param_count=deep_transformer_param_count,
          conformance=ConformanceSpec(
              config=DeepTransformerConfig(**_TINY_DT), length=13, cuts=(1, 6, 7, 12),
              reference={"impl": "reference"}, fast=({"impl": "chunked", "block": 4},)))
def build_deep_transformer(cfg: DeepTransformerConfig, rngs: nnx.Rngs) -> CausalLM:
    return build_deep_transformer_lm(cfg, rngs)


@dataclass(frozen=True)
class SWDTConfig(DeepTransformerConfig):
    """SWDT: DeepTransformer over the last c tokens (window c, attention op W = c − 1)."""
    window: int | None = 512


@register("swdt", config=SWDTConfig, param_count=deep_transformer_param_count,
          conformance=ConformanceSpec(
              config=SWDTConfig(**_TINY_DT, window=4), length=13, cuts=(1, 6, 7, 12),
              reference={"impl": "reference"}, fast=({"impl": "chunked", "block": 4},)))
def build_swdt(cfg: SWDTConfig, rngs: nnx.Rngs) -> CausalLM:
    if cfg.window is None:
        raise ValueError("model.window=None is the full DeepTransformer; use 'deep_transformer'")
    return build_deep_transformer_lm(cfg, rngs)
