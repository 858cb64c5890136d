"""ATLAS family (specs/atlas.md): Atlas and OmegaNet on the shared neural-memory layer.

* "atlas":     Omega rule (window c, paper-literal gates γ) + momentum + Newton–Schulz (Muon),
               learning rate outside the momentum (Eqs. 32–33), polynomial features, MLP memory.
* "omeganet":  Omega rule + plain gradient descent + polynomial features (Eq. 10).
* "atlas_pp":  Atlas++ — Atlas with the gated MLP memory (Eq. 43).
* "dla", "swla": the Hebbian (dot-product) bias online (DLA, Eq. 19) and summed over the window
               c with gates (SWLA, Eq. 20), plain GD, deep memory, polynomial features.
* "atlas_mag", "atlas_mal": Atlas inside Titans' MAG / MAL hosts (atlas.md §3, "exactly as in"
               titans.md §3.5–3.6; `MemoryLMConfig.hybrid`, which every memory LM here has:
               the Miras -H hybrids are `hybrid="mal"`, configs/miras.py).
  Both are `layers.atlas.AtlasMemory`: the shared neural-memory layer with ATLAS's parts plugged
  in (ATLAS letters: α retention, η learning rate, θ momentum, γ window gates; the learnable
  polynomial map; the Newton–Schulz transform; the keep-gate option). The chunk b and window c
  are part of the model (atlas.md §7 contract notes).
The attention-like DeepTransformer / SWDT / Dot (atlas.md §2.7) are in zoo/deep_transformer.py.

Choices: ATLAS gates are per-head scalars from linear maps of x_t; polynomial degree p with
exact symmetric features on the ℓ2-normalised per-head q, k (no down-projection); the degree-1
block is placed first in φ so that the MLP memory's residual (the first d_v inputs) is the
degree-1 block √a₁·x (atlas.md §8.4); `window_gates="keep"` is the per-token keep-gate
alternative of §8.1 (γ_i^{(t)} = g_i), carried for past tokens as a per-token extra that scales
the source's output signal.

`MemoryLMConfig` holds what Atlas, OmegaNet and the Miras models (zoo/miras.py) share: the
Llama-style LM over the shared neural memory with gates in ATLAS letters.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from flax import nnx

from layers.atlas import AtlasMemory
from layers.common import check_block, check_heads, check_impl, check_rope_head_dim
from layers.hybrids import (
    HYBRIDS,
    MAL_LAYOUTS,
    hybrid_mixer_counts,
    hybrid_mixer_flops,
    hybrid_mixers,
)
from layers.memory import MEMORIES, NeuralMemoryConfig, check_memory_kernel
from layers.memory_counts import XLA_FLOPS_RANGE, XLA_FLOPS_RANGE_ONLINE_GD
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

# ----------------------------------------------------------------------------- shared config


@dataclass(frozen=True)
class MemoryLMConfig:
    """A Llama-style causal LM (atlas.md §3, miras.md §3) whose mixer is the shared neural memory
    with gates in ATLAS letters: the fields, checks, assembly and parameter count that Atlas,
    OmegaNet and the Miras models share. A subclass names its mixer (`memory_layer`) and
    completes `memory_config`.

    chunk b: part of the model. Gate biases: alpha_bias → retention α = sigmoid(·); lr_bias →
    η = lr_max·sigmoid(·). impl: the neural-memory op's implementation (auto | reference |
    chunked, the same function).
    """
    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    memory: str = "mlp"             # mlp | linear | gated_mlp (Atlas++, Eq. 43)
    depth: int = 2
    expansion: int = 4
    chunk: int = 16
    lr_max: float = 0.1
    alpha_bias: float = 5.0
    lr_bias: float = -2.2
    memory_init_std: float | None = None
    ffn_dim: int | None = None
    norm_eps: float = 1e-6
    init_std: float = 0.02
    tie_embeddings: bool = True
    impl: str = "auto"              # op neural_memory (and attention, hybrids)
    max_resets: int = 4
    # the hybrids (atlas.md §3, miras.md §3: "exactly as" Titans' MAG / MAL, titans.md §3.5-3.6,
    # built by the same hosts, layers.hybrids.hybrid_mixers): none | mag | mal
    hybrid: str = "none"
    attn_window: int = 64           # W of the hybrids' sliding-window attention (W + 1 keys)
    attn_heads: int | None = None   # the hybrids' attention heads (None: n_heads)
    n_persistent: int = 4           # N_p persistent tokens of the hybrids' hosts (0: none)
    mal_layout: str = "samba"       # mal: samba (alternating blocks) | literal (SWA(memory([P; x])))
    rope_base: float = 10000.0      # RoPE on the hybrids' attention only (miras.md §3 [choice])
    max_len: int = 2048             # the hybrids' attention cache bound
    block: int = 128                # attention key block (never changes the function)

    @property
    def n_attn_heads(self) -> int:
        return self.attn_heads or self.n_heads

    def validate(self):
        if self.hybrid not in ("none",) + HYBRIDS:
            raise ValueError(f"model.hybrid={self.hybrid!r} is not one of "
                             f"{('none',) + HYBRIDS}")
        check_impl(self.impl, ("neural_memory",) if self.hybrid == "none"
                   else ("neural_memory", "attention"))
        check_memory_kernel(self.impl, None)
        check_block(self.block)
        if self.hybrid != "none":
            if self.mal_layout not in MAL_LAYOUTS:
                raise ValueError(f"model.mal_layout={self.mal_layout!r} is not one of "
                                 f"{MAL_LAYOUTS}")
            if self.attn_window < 1 or self.n_persistent < 0:
                raise ValueError(f"model.attn_window={self.attn_window} must be >= 1 and "
                                 f"model.n_persistent={self.n_persistent} >= 0")
            if self.dim % self.n_attn_heads:
                raise ValueError(f"model.dim={self.dim} is not divisible by the "
                                 f"{self.n_attn_heads} attention heads")
            check_rope_head_dim(self.dim // self.n_attn_heads, f"model.dim={self.dim} / the "
                                f"{self.n_attn_heads} attention heads (model.attn_heads, "
                                "default model.n_heads)")
        if self.memory not in MEMORIES:
            raise ValueError(f"model.memory={self.memory!r} is not one of {MEMORIES}")
        check_heads(self.dim, self.n_heads)
        if self.chunk < 1:
            raise ValueError(f"model.chunk={self.chunk} must be >= 1")

    @property
    def d_ff(self) -> int:
        return self.ffn_dim or llama_ffn_dim(self.dim, 256 if self.dim >= 512 else 64)

    def memory_config(self) -> NeuralMemoryConfig:
        """The shared layer's config from the common fields (its gate names are Titans': its
        theta weights carry the ATLAS learning-rate logit here)."""
        return NeuralMemoryConfig(
            dim=self.dim, n_heads=self.n_heads, memory=self.memory, depth=self.depth,
            expansion=self.expansion, chunk=self.chunk, lr_max=self.lr_max,
            alpha_bias=self.alpha_bias, theta_bias=self.lr_bias, norm_eps=self.norm_eps,
            init_std=self.init_std, memory_init_std=self.memory_init_std, impl=self.impl,
            max_resets=self.max_resets)

    def memory_layer(self) -> tuple[type, dict]:
        """The mixer's class (a `layers.memory.NeuralMemory`) and its arguments besides
        `memory_config()`."""
        raise NotImplementedError

    def mixer(self, rngs: nnx.Rngs) -> nnx.Module:
        cls, args = self.memory_layer()
        return cls(self.memory_config(), **args, rngs=rngs)

    def _hybrid_args(self) -> dict:
        return dict(n_layers=self.n_layers, dim=self.dim, n_persistent=self.n_persistent,
                    mal_layout=self.mal_layout)

    def mixers(self, rngs: nnx.Rngs) -> list[nnx.Module]:
        """The blocks' mixers: the memory in every block, or a hybrid's hosts around it."""
        if self.hybrid == "none":
            return [self.mixer(rngs) for _ in range(self.n_layers)]
        return hybrid_mixers(self.hybrid, self.mixer, n_heads=self.n_attn_heads,
                             window=self.attn_window, rngs=rngs, rope_base=self.rope_base,
                             max_len=self.max_len, norm_eps=self.norm_eps,
                             init_std=self.init_std, impl=self.impl, block=self.block,
                             **self._hybrid_args())

    def build(self, rngs: nnx.Rngs) -> CausalLM:
        """[mixer, SwiGLU] blocks with pre-RMSNorms in the shared LM scaffold."""
        self.validate()
        blocks = [swiglu_block(m, dim=self.dim, ffn_dim=self.d_ff, norm_eps=self.norm_eps,
                               init_std=self.init_std, rngs=rngs) for m in self.mixers(rngs)]
        return build_lm(blocks, vocab_size=self.vocab_size, dim=self.dim,
                        final_norm=RMSNorm(self.dim, eps=self.norm_eps), rngs=rngs,
                        tie_embeddings=self.tie_embeddings, init_std=self.init_std)

    def param_count(self) -> int:
        cls, args = self.memory_layer()
        mem = cls.param_count(self.memory_config(), **args)
        mixers = ([mem] * self.n_layers if self.hybrid == "none"
                  else hybrid_mixer_counts(self.hybrid, mem, **self._hybrid_args()))
        blocks = [swiglu_block_count(m, dim=self.dim, ffn_dim=self.d_ff) for m in mixers]
        return lm_param_count(blocks, vocab_size=self.vocab_size, dim=self.dim,
                              tie_embeddings=self.tie_embeddings)

    def flops(self, seq_len: int) -> float:
        """Training FLOPs per token (`zoo.lm`'s convention): 3 x (n_layers x [the mixer's
        forward FLOPs (its class's `flops`, e.g. `layers.memory_counts.neural_memory_flops` with the
        variant's parts) + the SwiGLU's 6 D F] + the head's 2 D V). The memory's work per token
        does not depend on `seq_len`; a hybrid's hosts add theirs
        (`layers.hybrids.hybrid_mixer_flops`: the window attention, the persistent tokens)."""
        cls, args = self.memory_layer()
        mem = cls.flops(self.memory_config(), **args)
        mixers = ([mem] * self.n_layers if self.hybrid == "none"
                  else hybrid_mixer_flops(self.hybrid, mem, n_heads=self.n_attn_heads,
                                          window_keys=causal_keys(seq_len, self.attn_window),
                                          seq_len=seq_len, **self._hybrid_args()))
        blocks = [swiglu_block_flops(m, dim=self.dim, ffn_dim=self.d_ff) for m in mixers]
        return lm_flops(blocks, vocab_size=self.vocab_size, dim=self.dim)


# ----------------------------------------------------------------------------- Atlas, OmegaNet


@dataclass(frozen=True)
class AtlasConfig(MemoryLMConfig):
    """Atlas / OmegaNet causal LM (Llama-style blocks, atlas.md §3), mixer
    `layers.atlas.AtlasMemory`.

    chunk b, window c: part of the model. momentum + ns_steps: Atlas (ns_steps = 0: identity
    transform, the "w/o Muon" ablation); no momentum: OmegaNet. feature: "poly" (degree
    poly_degree, learnable a_i = softplus(ρ_i), init 1/i!) or "identity". window_gates: "window"
    (c gates per step, paper-literal) or "keep" (per-token keep gate); c = 1 uses γ ≡ 1.
    Gate biases (ATLAS letters): alpha_bias → retention α = sigmoid(·) ≈ 0.993; lr_bias → η =
    lr_max·sigmoid(·) ≈ 0.01 at lr_max 0.1 (§6.2); theta_bias → momentum θ ≈ 0.73; gamma_bias →
    γ ≈ 0.9.
    """
    window: int = 16
    momentum: bool = True
    ns_steps: int = 5
    feature: str = "poly"           # poly | identity
    poly_degree: int = 2
    window_gates: str = "window"    # window | keep
    theta_bias: float = 1.0
    gamma_bias: float = 2.2
    objective: str = "l2"           # l2 (Omega rule) | dot (Hebbian: DLA, SWLA, atlas.md §2.7)

    def validate(self):
        super().validate()
        for key, val, ok in (("feature", self.feature, ("poly", "identity")),
                             ("window_gates", self.window_gates, ("window", "keep")),
                             ("objective", self.objective, ("l2", "dot"))):
            if val not in ok:
                raise ValueError(f"model.{key}={val!r} is not one of {ok}")
        if self.window < 1:
            raise ValueError(f"model.window={self.window} must be >= 1")
        if self.feature == "poly" and self.poly_degree < 1:
            raise ValueError(f"model.poly_degree={self.poly_degree} must be >= 1")

    def memory_config(self) -> NeuralMemoryConfig:
        """... with the Omega window c and momentum (the layer's eta weights carry the ATLAS
        momentum logit θ)."""
        return dataclasses.replace(super().memory_config(), window=self.window,
                                   momentum=self.momentum, eta_bias=self.theta_bias,
                                   objective=self.objective)

    def memory_layer(self):
        return AtlasMemory, dict(
            ns_steps=self.ns_steps, poly_degree=self.poly_degree if self.feature == "poly" else None,
            window_gates=self.window_gates, gamma_bias=self.gamma_bias)


_TINY = dict(vocab_size=37, dim=16, n_layers=1, n_heads=2, chunk=3, window=4, init_std=0.1,
             lr_max=0.5, lr_bias=0.0, alpha_bias=3.0)


@register("atlas", config=AtlasConfig, param_count=AtlasConfig.param_count,
          flops=AtlasConfig.flops,
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
    return cfg.build(rngs)


@dataclass(frozen=True)
class OmegaNetConfig(AtlasConfig):
    """OmegaNet: Omega rule + plain GD (no momentum, no Newton–Schulz) + polynomial features."""
    momentum: bool = False


@register("omeganet", config=OmegaNetConfig, param_count=AtlasConfig.param_count,
          flops=AtlasConfig.flops,
          conformance=ConformanceSpec(
              config=OmegaNetConfig(**_TINY), length=13, cuts=(1, 3, 5, 12),
              reference={"impl": "reference"}, fast=({"impl": "chunked"},),
              flops_range=XLA_FLOPS_RANGE))
def build_omeganet(cfg: OmegaNetConfig, rngs: nnx.Rngs) -> CausalLM:
    if cfg.momentum:
        raise ValueError("model.momentum=True is Atlas; use the 'atlas' entry")
    return cfg.build(rngs)


# ----------------------------------------------------------------------------- Atlas++, DLA, SWLA


@dataclass(frozen=True)
class AtlasPPConfig(AtlasConfig):
    """Atlas++ (atlas.md §2.2, Eq. 43; Table 2's row): Atlas with the gated MLP memory
    x_res + LN((GELU(x W2) ⊙ (x W3)) W1) (`layers.memory_nets.gated_mlp_memory`)."""
    memory: str = "gated_mlp"


@dataclass(frozen=True)
class DLAConfig(OmegaNetConfig):
    """DLA, deep (gated) linear attention (atlas.md §2.7, Eq. 19): the Hebbian bias
    ℓ = −⟨M(φ(k)), v⟩ online (window 1), M_t = α_t M_{t−1} − η_t ∇ℓ(M_{t−1}; φ(k_t), v_t), plain
    GD, the deep (MLP) memory and polynomial features; a linear memory is gated linear attention
    M_t = α_t M_{t−1} + η_t φ(k_t)ᵀ v_t."""
    objective: str = "dot"
    window: int = 1


@dataclass(frozen=True)
class SWLAConfig(OmegaNetConfig):
    """SWLA, sliding-window linear attention (atlas.md §2.7, Eq. 20): the Hebbian bias summed over
    the window c with the gates γ (the Omega rule's window on the dot objective), plain GD, deep
    memory, polynomial features; linear case M_t = α_t M_{t−1} + η_t Σ_{j<c} γ_j^{(t)}
    φ(k_{t−j})ᵀ v_{t−j}."""
    objective: str = "dot"


def _variant_builder(name, need):
    def build(cfg: AtlasConfig, rngs: nnx.Rngs) -> CausalLM:
        for key, want in need.items():
            if getattr(cfg, key) != want:
                raise ValueError(f"model.{key}={getattr(cfg, key)!r} is not {name}'s {want!r}: "
                                 "use the entry that has it")
        return cfg.build(rngs)
    build.__module__ = __name__
    build.__doc__ = f"{name}: its config class's docstring (the equation it is)."
    return build


# DLA's FLOP range: online plain GD (c = 1, no momentum) does the fewest products per memory weight
# (`layers.memory_counts.XLA_FLOPS_RANGE_ONLINE_GD`).
# Atlas++'s 1e-4: its gated-MLP memory with momentum and Newton-Schulz amplifies float32 rounding;
# the prefill-then-continue check measured 7.0e-5 (1 of 444 logits) on session 29's AMD EPYC
# host, where session 28's host passed 5e-5 (the same code: the hosts' vector code differs).
for _name, _cls, _need, _tol in (
        ("atlas_pp", AtlasPPConfig, dict(memory="gated_mlp", momentum=True), 1e-4),
        ("dla", DLAConfig, dict(objective="dot", window=1, momentum=False), 1e-5),
        ("swla", SWLAConfig, dict(objective="dot", momentum=False), 1e-5)):
    _range = XLA_FLOPS_RANGE_ONLINE_GD if _name == "dla" else XLA_FLOPS_RANGE
    _tiny = {**_TINY, "window": _cls().window if _name == "dla" else 4}
    register(_name, config=_cls, param_count=AtlasConfig.param_count, flops=AtlasConfig.flops,
             conformance=ConformanceSpec(
                 config=_cls(**_tiny), length=13, cuts=(1, 3, 5, 12),
                 reference={"impl": "reference"}, fast=({"impl": "chunked"},), atol=_tol,
                 rtol=_tol, flops_range=_range))(_variant_builder(_name, _need))

# ----------------------------------------------------------------------------- Atlas MAG / MAL


@dataclass(frozen=True)
class AtlasMAGConfig(AtlasConfig):
    """Atlas (MAG) (atlas.md §3, Table 2's row): Titans' MAG host around the Atlas memory — the
    memory on [P; x] in parallel with sliding-window attention (W = attn_window, the persistent
    prefix P), gated (`layers.titans.MAGMixer`)."""
    hybrid: str = "mag"


@dataclass(frozen=True)
class AtlasMALConfig(AtlasConfig):
    """Atlas (MAL) (atlas.md §3): Titans' MAL around the Atlas memory — Samba-style alternating
    [memory on [P; x], MLP] and [sliding-window attention, MLP] blocks, or
    `mal_layout="literal"`, SWA(memory([P; x])) per block."""
    hybrid: str = "mal"


_HYBRID = dict(_TINY, attn_window=4, n_persistent=3, max_len=32)


def _hybrid_builder(kind):
    def build(cfg: AtlasConfig, rngs: nnx.Rngs) -> CausalLM:
        if cfg.hybrid != kind:
            raise ValueError(f"model.hybrid={cfg.hybrid!r} does not match the entry "
                             f"'atlas_{kind}'")
        if not cfg.momentum:
            raise ValueError("model.momentum=False is OmegaNet's memory; Atlas's has momentum")
        return cfg.build(rngs)
    build.__module__ = __name__
    build.__doc__ = f"Atlas ({kind.upper()}): module docstring."
    return build


# Tolerance 5e-5 as for "atlas" (the Newton–Schulz steps); MAL at 2 layers (memory, attention).
for _kind, _cls, _layers in (("mag", AtlasMAGConfig, 1), ("mal", AtlasMALConfig, 2)):
    register(f"atlas_{_kind}", config=_cls, param_count=AtlasConfig.param_count,
             flops=AtlasConfig.flops,
             conformance=ConformanceSpec(
                 config=_cls(**{**_HYBRID, "n_layers": _layers}), length=13, cuts=(1, 3, 5, 12),
                 reference={"impl": "reference"}, fast=({"impl": "chunked"},),
                 atol=5e-5, rtol=5e-5))(_hybrid_builder(_kind))
