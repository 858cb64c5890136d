"""Titans (specs/titans.md): the LMM (memory-only) model and the MAC / MAG / MAL hybrids.

Registered: "titans_lmm", "titans_mac", "titans_mag", "titans_mal". Every block is pre-RMSNorm +
residual with a SwiGLU MLP (titans.md §3.1). The memory mixer is `layers.memory.NeuralMemory`
(the shared neural-memory layer); its chunk size `chunk` (b) is part of the model. The hosts
around it are `layers.titans` (they take any memory).

* LMM:  [memory on [P; x], MLP] x n_layers: Table 5's base row, with the N_p persistent
        tokens of §3.3 (`n_persistent`, default 4); `n_persistent=0` is the ablation row "w/o
        persistent memory" ([NeuralMemory, MLP] x n_layers).
* MAC:  [MACMixer, MLP] x n_layers; segments of `segment` (C) tokens of x (b divides C);
        retrieval h = W_h M_{W_start}(q(x)), attention over [P; h_{<=i}; x_{<=i}] of the current
        segment (the position-aligned mask of §3.4: h_j carries x_j's position), memory written
        from the attention output y, output RMSNorm(y) * sigmoid(RMSNorm(m)).
* MAG:  [MAGMixer, MLP] x n_layers; sliding-window attention with the persistent prefix P and
        the memory on [P; x] in parallel, combined by RMSNorm(y) * sigmoid(RMSNorm(m)).
* MAL:  `mal_layout="samba"` (default; the spec's [choice], §3.6): alternating blocks
        [memory on [P; x], MLP] and [sliding-window attention, MLP] — P enters only the memory,
        whose outputs at P are dropped, and the attention has no prefix.
        `mal_layout="literal"`: the paper's x~ = [P; x], y = LMM(x~), o = SWA(y) as one mixer
        (`layers.titans.MALMixer`) per block, [MALMixer, MLP] x n_layers; the attention reads
        the memory's outputs at the persistent positions too (an always-visible prefix).
For LMM / MAG / MAL the memory's input stream starts with the N_p persistent tokens: `init_state` is
the state after them (it depends on parameters); a packed document start returns the memory to
that state (memory W, S, anchor, the conv inputs of P, position N_p).
"""
from __future__ import annotations

from dataclasses import dataclass

from flax import nnx

from layers.common import check_block, check_impl, check_rope_head_dim
from layers.hybrids import (
    MAL_LAYOUTS,
    hybrid_mixer_counts,
    hybrid_mixer_flops,
    hybrid_mixers,
    prefixed,
)
from layers.memory import NeuralMemory, NeuralMemoryConfig, check_memory_kernel, make_rule
from layers.memory_counts import (
    XLA_FLOPS_RANGE,
    memory_qkv_flops,
    memory_read_flops,
    neural_memory_flops,
    neural_memory_param_count,
)
from layers.mlp import llama_ffn_dim
from layers.norms import RMSNorm
from layers.titans import (
    MACMixer,
    mac_mixer_flops,
    prefixed_memory_flops,
)
from zoo.lm import (
    Block,
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

OPS = ("neural_memory", "attention")


@dataclass(frozen=True)
class TitansConfig:
    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 2                 # memory heads
    head_dim: int | None = None      # None: dim // n_heads
    attn_heads: int | None = None    # None: n_heads
    memory: str = "mlp"              # mlp | linear
    memory_depth: int = 2
    memory_expansion: int = 4
    chunk: int = 16                  # b: memory anchor chunk (part of the model)
    momentum: bool = True
    objective: str = "l2"
    lr_max: float | None = None
    segment: int = 64                # C: MAC segment length (multiple of chunk)
    window: int = 64                 # W: sliding window of MAG / MAL (W + 1 keys)
    n_persistent: int = 4            # N_p persistent memory tokens (every model; LMM: 0 = the
                                     # "w/o persistent memory" ablation)
    mal_layout: str = "samba"        # MAL: samba (alternating blocks) | literal (SWA(LMM([P; x])))
    ffn_dim: int | None = None
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02
    rope_base: float = 10000.0
    max_len: int = 2048              # attention KV-cache length where it is not windowed
    impl: str = "auto"               # ops neural_memory and (MAC/MAG/MAL) attention
    block: int = 128                 # the kernels' block: attention keys (MAC/MAG/MAL), memory
                                     # tokens (never changes the function)
    max_resets: int = 4
    compute_dtype: str = "float32"
    remat: str = "none"

    @property
    def hd(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def d_ff(self) -> int:
        return self.ffn_dim or llama_ffn_dim(self.dim, 256 if self.dim >= 512 else 32)

    @property
    def n_attn_heads(self) -> int:
        return self.attn_heads or self.n_heads

    def validate(self):
        check_impl(self.impl, OPS)
        check_block(self.block)
        check_memory_kernel(self.impl, make_rule(self.memory_config()))
        if self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        if self.memory not in ("mlp", "linear"):
            raise ValueError(f"model.memory={self.memory!r} is not one of ('mlp', 'linear')")
        if self.segment % self.chunk:
            raise ValueError(f"model.segment={self.segment} is not a multiple of "
                             f"model.chunk={self.chunk}")
        if self.mal_layout not in MAL_LAYOUTS:
            raise ValueError(f"model.mal_layout={self.mal_layout!r} is not one of {MAL_LAYOUTS}")
        if self.n_persistent < 0:
            raise ValueError(f"model.n_persistent={self.n_persistent} must be >= 0")
        if self.dim % self.n_attn_heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by the attention heads")

    def memory_config(self) -> NeuralMemoryConfig:
        return NeuralMemoryConfig(
            dim=self.dim, n_heads=self.n_heads, head_dim=self.head_dim, memory=self.memory,
            depth=self.memory_depth, expansion=self.memory_expansion, objective=self.objective,
            chunk=self.chunk, momentum=self.momentum, lr_max=self.lr_max,
            norm_eps=self.norm_eps, init_std=self.init_std, impl=self.impl,
            block=self.block, max_resets=self.max_resets)

    def memory_factory(self):
        """rngs -> the Titans memory mixer (drawn where a host places it)."""
        return lambda rngs: NeuralMemory(self.memory_config(), rngs=rngs)

    def prefixed_memory(self, rngs: nnx.Rngs) -> nnx.Module:
        """The memory on [P; x] (§3.3), or the bare memory when n_persistent = 0."""
        return prefixed(self.memory_factory(), dim=self.dim, n_persistent=self.n_persistent,
                        rngs=rngs, init_std=self.init_std)

    def hybrid(self, kind: str, rngs: nnx.Rngs) -> list[nnx.Module]:
        """The MAG / MAL mixers of `layers.hybrids.hybrid_mixers` around this memory."""
        return hybrid_mixers(kind, self.memory_factory(), n_layers=self.n_layers, dim=self.dim,
                             n_heads=self.n_attn_heads, window=self.window,
                             n_persistent=self.n_persistent, rngs=rngs,
                             mal_layout=self.mal_layout, rope_base=self.rope_base,
                             max_len=self.max_len, norm_eps=self.norm_eps,
                             init_std=self.init_std, impl=self.impl, block=self.block)

    def hybrid_counts(self, kind: str) -> list[int]:
        return hybrid_mixer_counts(kind, _memory_count(self), n_layers=self.n_layers,
                                   dim=self.dim, n_persistent=self.n_persistent,
                                   mal_layout=self.mal_layout)

    def hybrid_flops(self, kind: str, seq_len: int) -> list[float]:
        return hybrid_mixer_flops(kind, _memory_flops(self), n_layers=self.n_layers,
                                  dim=self.dim, n_heads=self.n_attn_heads,
                                  window_keys=_window_keys(self, seq_len),
                                  n_persistent=self.n_persistent, seq_len=seq_len,
                                  mal_layout=self.mal_layout)

    def attention_args(self) -> dict:
        """The explicit attention arguments of the hosts (MAC, MAG, MAL's attention blocks)."""
        return dict(dim=self.dim, n_heads=self.n_attn_heads, rope_base=self.rope_base,
                    init_std=self.init_std, impl=self.impl, block=self.block)


def _block(cfg: TitansConfig, mixer: nnx.Module, rngs: nnx.Rngs) -> Block:
    return swiglu_block(mixer, dim=cfg.dim, ffn_dim=cfg.d_ff, norm_eps=cfg.norm_eps,
                        init_std=cfg.init_std, rngs=rngs)


def _lm(cfg: TitansConfig, blocks, rngs) -> CausalLM:
    return build_lm(blocks, vocab_size=cfg.vocab_size, dim=cfg.dim, rngs=rngs,
                    final_norm=RMSNorm(cfg.dim, eps=cfg.norm_eps),
                    tie_embeddings=cfg.tie_embeddings, init_std=cfg.init_std,
                    compute_dtype=cfg.compute_dtype, remat=cfg.remat)


def _lm_count(cfg: TitansConfig, mixers) -> int:
    """The LM around blocks with these mixer counts (SwiGLU + two RMSNorms each)."""
    blocks = [swiglu_block_count(m, dim=cfg.dim, ffn_dim=cfg.d_ff) for m in mixers]
    return lm_param_count(blocks, vocab_size=cfg.vocab_size, dim=cfg.dim,
                          tie_embeddings=cfg.tie_embeddings)


def _memory_count(cfg: TitansConfig) -> int:
    return neural_memory_param_count(cfg.memory_config())


def _attention_count(cfg: TitansConfig) -> int:
    return 4 * cfg.dim * cfg.dim


def _lm_flops(cfg: TitansConfig, mixers) -> float:
    """Training FLOPs per token of the LM around blocks with these mixers' forward FLOPs per
    token (each in a `swiglu_block`)."""
    blocks = [swiglu_block_flops(m, dim=cfg.dim, ffn_dim=cfg.d_ff) for m in mixers]
    return lm_flops(blocks, vocab_size=cfg.vocab_size, dim=cfg.dim)


def _memory_flops(cfg: TitansConfig) -> float:
    return neural_memory_flops(cfg.memory_config())


def _window_keys(cfg: TitansConfig, seq_len: int) -> int:
    """Keys per query of the sliding-window attention of MAG / MAL in the `zoo.lm` convention:
    W + 1 (MAG adds its N_p persistent keys). The reference op scores every key of the call
    and masks them (seq_len + N_p)."""
    return causal_keys(seq_len, cfg.window)


# ----------------------------------------------------------------------------- LMM


def lmm_param_count(cfg: TitansConfig) -> int:
    return _lm_count(cfg, [_memory_count(cfg) + cfg.n_persistent * cfg.dim] * cfg.n_layers)


def lmm_flops(cfg: TitansConfig, seq_len: int) -> float:
    """Training FLOPs per token: 3 x (n_layers x [`prefixed_memory_flops` (the memory on every
    token and on the N_p persistent ones once per sequence) + 6 D F] + 2 D V)."""
    mem = prefixed_memory_flops(_memory_flops(cfg), n_persistent=cfg.n_persistent,
                                seq_len=seq_len)
    return _lm_flops(cfg, [mem] * cfg.n_layers)


_TINY = dict(vocab_size=37, dim=16, n_layers=2, n_heads=2, init_std=0.1, ffn_dim=32)
# The FLOP check's config for the MLP memory: at head dim 8 the memory's exact GELU (XLA counts
# its erf as ~64 operations) rivals its products; at head dim 32 it is a few percent. One layer.
_FLOPS = dict(dim=64, ffn_dim=128, n_layers=1)


@register("titans_lmm", config=TitansConfig, param_count=lmm_param_count, flops=lmm_flops,
          conformance=ConformanceSpec(
              config=TitansConfig(**_TINY, chunk=4),
              length=13, cuts=(1, 4, 6, 12),
              reference={"impl": "reference"}, fast=({"impl": "chunked"},),
              flops_config=TitansConfig(**{**_TINY, **_FLOPS}, chunk=4),
              flops_range=XLA_FLOPS_RANGE))
def build_titans_lmm(cfg: TitansConfig, rngs: nnx.Rngs) -> CausalLM:
    cfg.validate()
    return _lm(cfg, [_block(cfg, cfg.prefixed_memory(rngs), rngs) for _ in range(cfg.n_layers)],
               rngs)


# ----------------------------------------------------------------------------- MAG


def mag_param_count(cfg: TitansConfig) -> int:
    return _lm_count(cfg, cfg.hybrid_counts("mag"))


def mag_flops(cfg: TitansConfig, seq_len: int) -> float:
    """Training FLOPs per token: 3 x (n_layers x [`mag_mixer_flops`: the memory on [P; x],
    the window attention over W + 1 + N_p keys, W_o + 6 D F] + 2 D V)."""
    return _lm_flops(cfg, cfg.hybrid_flops("mag", seq_len))


_HYBRID = dict(_TINY, memory="linear", chunk=4, window=4, n_persistent=3, max_len=32)


def check_attention(cfg: TitansConfig) -> None:
    """The hybrids' attention (MAC, MAG, MAL): head dim dim / attention heads, even for RoPE."""
    check_rope_head_dim(cfg.dim // cfg.n_attn_heads, f"model.dim={cfg.dim} / the "
                        f"{cfg.n_attn_heads} attention heads (model.attn_heads, default "
                        f"model.n_heads)")


@register("titans_mag", config=TitansConfig, check=check_attention, param_count=mag_param_count, flops=mag_flops,
          conformance=ConformanceSpec(
              config=TitansConfig(**{**_HYBRID, "n_layers": 1}),
              length=13, cuts=(1, 5, 9, 12),
              reference={"impl": "reference"},
              # the Pallas form: its linear memory and its window attention (the persistent
              # tokens as always-visible prefix keys) both through the kernels
              fast=({"impl": "chunked"}, {"impl": "pallas_interpret", "block": 8})))
def build_titans_mag(cfg: TitansConfig, rngs: nnx.Rngs) -> CausalLM:
    cfg.validate()
    return _lm(cfg, [_block(cfg, m, rngs) for m in cfg.hybrid("mag", rngs)], rngs)


# ----------------------------------------------------------------------------- MAL


def mal_param_count(cfg: TitansConfig) -> int:
    return _lm_count(cfg, cfg.hybrid_counts("mal"))


def mal_flops(cfg: TitansConfig, seq_len: int) -> float:
    """Training FLOPs per token: 3 x (per block + 6 D F, + 2 D V) with, Samba layout, the even
    layers' `prefixed_memory_flops` and the odd layers' window attention over W + 1 keys
    (`attention_mixer_flops`); literal layout, every layer's `mal_mixer_flops` (the attention
    over W + 1 + N_p keys)."""
    return _lm_flops(cfg, cfg.hybrid_flops("mal", seq_len))


@register("titans_mal", config=TitansConfig, check=check_attention, param_count=mal_param_count, flops=mal_flops,
          conformance=ConformanceSpec(
              config=TitansConfig(**_HYBRID),
              length=13, cuts=(1, 5, 9, 12),
              reference={"impl": "reference"}, fast=({"impl": "chunked"}, {"impl": "pallas_interpret", "block": 8})))
def build_titans_mal(cfg: TitansConfig, rngs: nnx.Rngs) -> CausalLM:
    """Samba layout: even layers the memory on [P; x], odd layers sliding-window attention;
    literal layout: every layer SWA(LMM([P; x])) (module docstring)."""
    cfg.validate()
    return _lm(cfg, [_block(cfg, m, rngs) for m in cfg.hybrid("mal", rngs)], rngs)


# ----------------------------------------------------------------------------- MAC


def mac_param_count(cfg: TitansConfig) -> int:
    D = cfg.dim
    mixer = (_memory_count(cfg) + cfg.n_heads * cfg.hd * D + _attention_count(cfg)
             + cfg.n_persistent * D + 2 * D)
    return _lm_count(cfg, [mixer] * cfg.n_layers)


def mac_flops(cfg: TitansConfig, seq_len: int) -> float:
    """Training FLOPs per token: 3 x (n_layers x [`mac_mixer_flops`: per padded segment
    token the retrieval (query path + read), W_h, the attention over N_p + 4C keys, the memory
    written from y; + 6 D F] + 2 D V)."""
    mc = cfg.memory_config()
    retrieval = memory_qkv_flops(mc) + memory_read_flops(mc)
    mixer = mac_mixer_flops(_memory_flops(cfg), retrieval, dim=cfg.dim, n_heads=cfg.n_attn_heads,
                            segment=cfg.segment, n_persistent=cfg.n_persistent,
                            retrieval_dim=cfg.n_heads * cfg.hd, seq_len=seq_len)
    return _lm_flops(cfg, [mixer] * cfg.n_layers)


@register("titans_mac", config=TitansConfig, check=check_attention, param_count=mac_param_count, flops=mac_flops,
          conformance=ConformanceSpec(
              config=TitansConfig(**{**_HYBRID, "n_layers": 1, "segment": 8}),
              length=13, cuts=(1, 4, 8, 12),
              reference={"impl": "reference"}, fast=({"impl": "chunked"}, {"impl": "pallas_interpret", "block": 8})))
def build_titans_mac(cfg: TitansConfig, rngs: nnx.Rngs) -> CausalLM:
    cfg.validate()
    mixer = lambda: MACMixer(cfg.memory_factory(), segment=cfg.segment,
                             n_persistent=cfg.n_persistent, norm_eps=cfg.norm_eps,
                             max_resets=cfg.max_resets, rngs=rngs, **cfg.attention_args())
    return _lm(cfg, [_block(cfg, mixer(), rngs) for _ in range(cfg.n_layers)], rngs)
