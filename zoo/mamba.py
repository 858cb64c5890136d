"""Mamba-1 and Mamba-2 language models (specs/mamba.md), registered as "mamba" and "mamba2",
and their Hugging Face converters (`MambaForCausalLM`, `Mamba2ForCausalLM`).

The LM follows `mamba_ssm.models.mixer_seq_simple`: embedding N(0, 0.02) -> n_layers pre-norm
blocks `h + mixer(RMSNorm(h))` (no MLP) -> final RMSNorm -> head tied to the embedding by
default; residual stream in float32 (`compute_dtype` float32); out_proj re-drawn with
U(+-1/sqrt(fan_in)) / sqrt(n_layers). The vocabulary is used as given (pad it to a multiple of 8
in the config if wanted).

`impl` picks the implementation of the model's op (`selective_scan` for Mamba-1, `ssd` for
Mamba-2; auto | reference | chunked, see pallas_kernels/impl.py); `block` is its block size, an
implementation parameter that never changes the function (Hugging Face's Mamba2 `chunk_size`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from flax import nnx

from layers.common import check_block, check_impl
from layers.norms import RMSNorm
from layers.ssm import Mamba2Mixer, MambaMixer, mamba2_mixer_flops, mamba_mixer_flops
from zoo import hf as _hf
from zoo.lm import Block, CausalLM, build_lm, lm_flops, lm_param_count
from zoo.registry import ConformanceSpec, ParamGroup, register


@dataclass(frozen=True)
class MambaConfig:
    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    d_state: int = 16
    expand: int = 2
    d_inner: int | None = None          # None: expand * dim
    d_conv: int = 4
    dt_rank: int | None = None          # None: ceil(dim / 16)
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_scale: float = 1.0
    dt_init: str = "random"             # random | constant
    exact_zoh: bool = False             # False: the reference code's Euler B (dt * B)
    conv_bias: bool = True
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    rescale_out_proj: bool = True       # out_proj / sqrt(n_layers)
    impl: str = "auto"                  # selective_scan: auto | reference | chunked | pallas
    block: int = 16                     # the chunked Mamba-1 form does O(block) more work per step
    compute_dtype: str = "float32"
    remat: str = "none"

    @property
    def di(self) -> int:
        return self.d_inner or self.expand * self.dim

    @property
    def rank(self) -> int:
        return self.dt_rank or math.ceil(self.dim / 16)

    def validate(self):
        check_impl(self.impl, ("selective_scan",))
        check_block(self.block)
        if self.dt_init not in ("random", "constant"):
            raise ValueError(f"model.dt_init={self.dt_init!r} is not one of ('random', 'constant')")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"model.dt_min={self.dt_min} must be in (0, model.dt_max={self.dt_max}]")


@dataclass(frozen=True)
class Mamba2Config:
    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    d_state: int = 128
    expand: int = 2
    head_dim: int = 64
    n_groups: int = 1
    d_conv: int = 4
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    A_init_min: float = 1.0
    A_init_max: float = 16.0
    dt_limit_min: float = 0.0
    dt_limit_max: float = math.inf
    conv_bias: bool = True
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    rescale_out_proj: bool = True
    impl: str = "auto"                  # ssd: auto | reference | chunked | pallas
    block: int = 256
    compute_dtype: str = "float32"
    remat: str = "none"

    @property
    def di(self) -> int:
        return self.expand * self.dim

    @property
    def n_heads(self) -> int:
        return self.di // self.head_dim

    def validate(self):
        check_impl(self.impl, ("ssd",))
        check_block(self.block)
        if self.di % self.head_dim:
            raise ValueError(f"model.head_dim={self.head_dim} does not divide expand*dim={self.di}")
        if self.n_heads % self.n_groups:
            raise ValueError(f"model.n_groups={self.n_groups} does not divide the "
                             f"{self.n_heads} heads")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"model.dt_min={self.dt_min} must be in (0, model.dt_max={self.dt_max}]")


def _lm(cfg: MambaConfig | Mamba2Config, mixers: list, rngs: nnx.Rngs) -> CausalLM:
    """`mixers` (drawn before the embedding: this family's parameter order) in mixer-only
    pre-norm blocks, through the shared LM builder."""
    return build_lm([Block(m, RMSNorm(cfg.dim, eps=cfg.norm_eps)) for m in mixers],
                    vocab_size=cfg.vocab_size, dim=cfg.dim,
                    final_norm=RMSNorm(cfg.dim, eps=cfg.norm_eps), rngs=rngs,
                    tie_embeddings=cfg.tie_embeddings, init_std=cfg.init_std,
                    compute_dtype=cfg.compute_dtype, remat=cfg.remat)


def _out_scale(cfg: MambaConfig | Mamba2Config) -> float:
    return 1.0 / math.sqrt(cfg.n_layers) if cfg.rescale_out_proj else 1.0


def mamba_param_count(cfg: MambaConfig) -> int:
    """specs/mamba.md §3.3 (conv bias optional, untied head optional)."""
    D, Di, N, R, K = cfg.dim, cfg.di, cfg.d_state, cfg.rank, cfg.d_conv
    block = (D * 2 * Di + Di * K + (Di if cfg.conv_bias else 0) + Di * (R + 2 * N) + R * Di + Di
             + Di * N + Di + Di * D + D)
    return lm_param_count(cfg.n_layers * block, vocab_size=cfg.vocab_size, dim=D,
                          tie_embeddings=cfg.tie_embeddings)


def mamba2_param_count(cfg: Mamba2Config) -> int:
    D, Di, N, G, H, K = cfg.dim, cfg.di, cfg.d_state, cfg.n_groups, cfg.n_heads, cfg.d_conv
    conv = Di + 2 * G * N
    block = (D * (2 * Di + 2 * G * N + H) + conv * K + (conv if cfg.conv_bias else 0) + 3 * H
             + Di + Di * D + D)
    return lm_param_count(cfg.n_layers * block, vocab_size=cfg.vocab_size, dim=D,
                          tie_embeddings=cfg.tie_embeddings)


# The FLOP check's configs (`flops_config`) are wider than the conformance ones: with every loop
# unrolled, XLA's cost analysis charges the causal conv's fused producer again in each step's
# slice of the scan inputs (elementwise work growing as T^2 Di K), which at dim 16 is several
# times the products; at dim 256 (Mamba-1) / 512 (Mamba-2) the products dominate.

def mamba_flops(cfg: MambaConfig, seq_len: int) -> float:
    """Training FLOPs per token (`zoo.lm`'s convention): 3 x (L [4 D Di + 2 Di K + 2 Di (R + 2N)
    + 2 R Di + 5 Di N + 2 Di D] + 2 D V), the mixer's count being `mamba_mixer_flops`."""
    mixer = mamba_mixer_flops(cfg.dim, cfg.di, cfg.d_state, cfg.rank, cfg.d_conv)
    return lm_flops(cfg.n_layers * mixer, vocab_size=cfg.vocab_size, dim=cfg.dim)


def mamba2_flops(cfg: Mamba2Config, seq_len: int) -> float:
    """Training FLOPs per token (`zoo.lm`'s convention): 3 x (L [2 D (2Di + 2GN + H)
    + 2 (Di + 2GN) K + 5 Di N + 2 Di D] + 2 D V), the mixer's count being `mamba2_mixer_flops`."""
    mixer = mamba2_mixer_flops(cfg.dim, cfg.di, cfg.n_heads, cfg.n_groups, cfg.d_state,
                               cfg.d_conv)
    return lm_flops(cfg.n_layers * mixer, vocab_size=cfg.vocab_size, dim=cfg.dim)


# the official code's `_no_weight_decay` parameters (mamba.md §init: A_log and D; the default
# rule already spares the 1-D ones, A_log [Di, N] is 2-D)
MAMBA_GROUPS = (ParamGroup("ssm", ("*.mixer.A_log", "*.mixer.D"), weight_decay=False,
                           why="mamba_ssm marks A_log and D _no_weight_decay"),)
MAMBA2_GROUPS = (ParamGroup("ssm", ("*.mixer.A_log", "*.mixer.D", "*.mixer.dt_bias"),
                            weight_decay=False,
                            why="mamba_ssm's Mamba2 marks A_log, D and dt_bias _no_weight_decay"),)


@register("mamba", config=MambaConfig, param_count=mamba_param_count, flops=mamba_flops,
          groups=MAMBA_GROUPS,
          conformance=ConformanceSpec(
              config=MambaConfig(vocab_size=37, dim=16, n_layers=2, d_state=4, block=4,
                                 init_std=0.5, dt_min=0.05, dt_max=0.5, impl="reference"),
              length=13, cuts=(1, 3, 4, 8, 12),
              reference={"impl": "reference"},
              fast=({"impl": "chunked", "block": 4}, {"impl": "pallas_interpret", "block": 8}),
              flops_config=MambaConfig(vocab_size=37, dim=256, n_layers=1, d_state=4,
                                       impl="reference")))
def build_mamba(cfg: MambaConfig, rngs: nnx.Rngs) -> CausalLM:
    cfg.validate()
    mixers = [MambaMixer(cfg.dim, rngs=rngs, d_inner=cfg.di, d_state=cfg.d_state,
                         d_conv=cfg.d_conv, dt_rank=cfg.rank, dt_min=cfg.dt_min,
                         dt_max=cfg.dt_max, dt_init_floor=cfg.dt_init_floor,
                         dt_scale=cfg.dt_scale, dt_init=cfg.dt_init, conv_bias=cfg.conv_bias,
                         exact_zoh=cfg.exact_zoh, out_scale=_out_scale(cfg), impl=cfg.impl,
                         block=cfg.block)
              for _ in range(cfg.n_layers)]
    return _lm(cfg, mixers, rngs)


@register("mamba2", config=Mamba2Config, param_count=mamba2_param_count,
          flops=mamba2_flops, groups=MAMBA2_GROUPS,
          conformance=ConformanceSpec(
              config=Mamba2Config(vocab_size=37, dim=16, n_layers=2, d_state=4, head_dim=8,
                                  n_groups=2, block=4, init_std=0.5, dt_min=0.05,
                                  dt_max=0.5, impl="reference"),
              length=13, cuts=(1, 3, 4, 8, 12),
              reference={"impl": "reference"},
              fast=({"impl": "chunked", "block": 4}, {"impl": "pallas_interpret", "block": 8}),
              flops_config=Mamba2Config(vocab_size=37, dim=512, n_layers=1, d_state=4,
                                        head_dim=64, n_groups=2, impl="reference")))
def build_mamba2(cfg: Mamba2Config, rngs: nnx.Rngs) -> CausalLM:
    cfg.validate()
    mixers = [Mamba2Mixer(cfg.dim, rngs=rngs, d_inner=cfg.di, head_dim=cfg.head_dim,
                          d_state=cfg.d_state, n_groups=cfg.n_groups, d_conv=cfg.d_conv,
                          dt_min=cfg.dt_min, dt_max=cfg.dt_max, dt_init_floor=cfg.dt_init_floor,
                          A_init_range=(cfg.A_init_min, cfg.A_init_max),
                          dt_limit=(cfg.dt_limit_min, cfg.dt_limit_max), conv_bias=cfg.conv_bias,
                          norm_eps=cfg.norm_eps, out_scale=_out_scale(cfg), impl=cfg.impl,
                          block=cfg.block)
              for _ in range(cfg.n_layers)]
    return _lm(cfg, mixers, rngs)


# ----------------------------------------------------------------------------- presets

def mamba_preset(size: str = "130m", **kw) -> MambaConfig:
    """The released shapes (specs/mamba.md §6.1); vocab 50280 (GPT-NeoX padded to 8)."""
    shapes = {"130m": (768, 24), "370m": (1024, 48), "790m": (1536, 48), "1.4b": (2048, 48),
              "2.8b": (2560, 64)}
    dim, n = shapes[size]
    return MambaConfig(**{**dict(vocab_size=50280, dim=dim, n_layers=n, d_state=16), **kw})


PRESETS = {f"mamba_{s}": (lambda s=s: mamba_preset(s)) for s in ("130m", "370m", "790m", "1.4b", "2.8b")}


# ----------------------------------------------------------------------------- Hugging Face
# One name table serves the import (`from_hf_mamba*`) and the export (`save_hf`).

def _mixer_tensors(mx: MambaMixer | Mamba2Mixer) -> list[tuple[nnx.Variable, str, bool]]:
    """(parameter, its Hugging Face name under `mixer.`, stored transposed) for one mixer; the
    conv (stored [C, 1, K]) is `_conv`'s."""
    both = [(mx.in_proj.weight, "in_proj.weight", True), (mx.A_log, "A_log", False),
            (mx.D, "D", False), (mx.out_proj.weight, "out_proj.weight", True)]
    if isinstance(mx, Mamba2Mixer):
        return both + [(mx.dt_bias, "dt_bias", False), (mx.norm.weight, "norm.weight", False)]
    return both + [(mx.x_proj.weight, "x_proj.weight", True), (mx.dt_w, "dt_proj.weight", True),
                   (mx.dt_b, "dt_proj.bias", False)]


def _tensors(model: CausalLM) -> list[tuple[nnx.Variable, str, bool]]:
    """Every parameter of a `mamba` / `mamba2` LM but the convs, with its Hugging Face name."""
    out = [(model.embed.embedding, "backbone.embeddings.weight", False),
           (model.final_norm.weight, "backbone.norm_f.weight", False)]
    for i, blk in enumerate(model.blocks):
        p = f"backbone.layers.{i}."
        out.append((blk.norm1.weight, p + "norm.weight", False))
        out += [(var, p + "mixer." + name, t) for var, name, t in _mixer_tensors(blk.mixer)]
    if model.head is not None:
        out.append((model.head.weight, "lm_head.weight", True))
    return out


def _conv_name(i: int) -> str:
    return f"backbone.layers.{i}.mixer.conv1d"


def _conv(src: _hf.TensorSource, conv, name: str) -> None:
    C, K = conv.weight.get_value().shape          # also on an abstract model
    src.put(conv.weight, src.take(name + ".weight", (C, 1, K))[:, 0, :])
    if conv.bias is not None:
        src.assign(conv.bias, name + ".bias")


def _load(model: CausalLM, tensors: dict[str, np.ndarray]) -> CausalLM:
    """Assign every tensor of a Hugging Face Mamba / Mamba2 checkpoint; each must be used."""
    src = _hf.TensorSource(tensors)
    for var, name, transpose in _tensors(model):
        src.assign(var, name, transpose=transpose)
    for i, blk in enumerate(model.blocks):
        _conv(src, blk.mixer.conv, _conv_name(i))
    if model.head is None and "lm_head.weight" in tensors:
        # a tied checkpoint may still carry the (equal) head
        src.take("lm_head.weight", tuple(model.embed.embedding.get_value().shape))
    src.check_all_used()
    return _hf.check_filled(model)


def _check_no_bias(hf: dict) -> None:
    if hf.get("use_bias", False):
        raise ValueError("Mamba checkpoints with use_bias=True (in/out projection biases) are "
                         "not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")


@_hf.hf_converter("MambaForCausalLM")
def from_hf_mamba(hf: dict, tensors: dict[str, np.ndarray]) -> CausalLM:
    _check_no_bias(hf)
    dim = hf["hidden_size"]
    rank = hf.get("time_step_rank", "auto")
    cfg = MambaConfig(
        vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["num_hidden_layers"],
        d_state=hf["state_size"], d_inner=hf.get("intermediate_size") or hf["expand"] * dim,
        d_conv=hf["conv_kernel"], dt_rank=math.ceil(dim / 16) if rank == "auto" else int(rank),
        conv_bias=bool(hf.get("use_conv_bias", True)),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
    return _load(_hf.build_abstract(build_mamba, cfg), tensors)


@_hf.hf_converter("Mamba2ForCausalLM")
def from_hf_mamba2(hf: dict, tensors: dict[str, np.ndarray]) -> CausalLM:
    """Hugging Face's `chunk_size` (the SSD block) becomes `block`."""
    _check_no_bias(hf)
    dim = hf["hidden_size"]
    n_heads, head_dim = hf["num_heads"], hf["head_dim"]
    expand = hf.get("expand", 2)
    if n_heads * head_dim != expand * dim:
        raise ValueError(f"Mamba2 num_heads*head_dim={n_heads * head_dim} != expand*hidden_size="
                         f"{expand * dim}")
    limit = hf.get("time_step_limit", [0.0, math.inf])
    cfg = Mamba2Config(
        vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["num_hidden_layers"],
        d_state=hf["state_size"], expand=expand, head_dim=head_dim, n_groups=hf.get("n_groups", 1),
        d_conv=hf["conv_kernel"], dt_limit_min=_hf.hf_float(limit[0]),
        dt_limit_max=_hf.hf_float(limit[1]), conv_bias=bool(hf.get("use_conv_bias", True)),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        block=int(hf.get("chunk_size", 256)))
    return _load(_hf.build_abstract(build_mamba2, cfg), tensors)


def save_hf(model: CausalLM, path: str, max_shard_bytes: int = _hf.MAX_SHARD_BYTES) -> list[str]:
    """Export a seqzoo `mamba` / `mamba2` LM as a Hugging Face checkpoint directory
    (`config.json` + `model.safetensors`, sharded above `max_shard_bytes`: the layout
    `from_hf_mamba*` and transformers read back; `block` becomes Mamba2's `chunk_size`)."""
    config, t = to_hf_mamba(model)
    return _hf.write_checkpoint(path, config, {k: np.ascontiguousarray(v, np.float32)
                                               for k, v in t.items()}, max_shard_bytes)


@_hf.hf_exporter("mamba")
@_hf.hf_exporter("mamba2")
def _export(model: CausalLM, cfg=None) -> tuple[dict, dict]:
    return to_hf_mamba(model)


def to_hf_mamba(model: CausalLM) -> tuple[dict, dict]:
    """The inverse of `from_hf_mamba` / `from_hf_mamba2`: (config.json dict, tensors)."""
    mx0 = model.blocks[0].mixer
    V, D = model.embed.embedding[...].shape
    eps = float(model.final_norm.eps)
    t = {name: np.asarray(var[...]).T if transpose else np.asarray(var[...])
         for var, name, transpose in _tensors(model)}
    for i, blk in enumerate(model.blocks):
        conv = blk.mixer.conv
        t[_conv_name(i) + ".weight"] = np.asarray(conv.weight[...])[:, None, :]
        if conv.bias is not None:
            t[_conv_name(i) + ".bias"] = np.asarray(conv.bias[...])
    common = dict(vocab_size=int(V), hidden_size=int(D), num_hidden_layers=len(model.blocks),
                  state_size=int(mx0.d_state), conv_kernel=int(mx0.d_conv),
                  layer_norm_epsilon=eps, use_bias=False, use_conv_bias=mx0.conv.bias is not None,
                  hidden_act="silu", residual_in_fp32=True,
                  tie_word_embeddings=model.head is None)
    if isinstance(mx0, Mamba2Mixer):
        lo, hi = mx0.dt_limit
        cfg = dict(architectures=["Mamba2ForCausalLM"], model_type="mamba2",
                   num_heads=int(mx0.n_heads), head_dim=int(mx0.head_dim),
                   expand=int(mx0.d_inner // D), n_groups=int(mx0.n_groups),
                   chunk_size=int(mx0.block),
                   time_step_limit=[float(lo), hi if math.isfinite(hi) else {"__float__": "Infinity"}],
                   **common)
    else:
        if mx0.exact_zoh:
            raise ValueError("exact_zoh=True has no Hugging Face equivalent (transformers uses "
                             "the reference code's Euler input)")
        cfg = dict(architectures=["MambaForCausalLM"], model_type="mamba",
                   intermediate_size=int(mx0.d_inner), expand=max(1, int(mx0.d_inner // D)),
                   time_step_rank=int(mx0.dt_rank), **common)
    return cfg, t
