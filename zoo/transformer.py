"""Decoder-only Transformer baseline (specs/transformer.md): the Llama-style default and the
seed papers' presets (`rat_attention`, `gam_transformer`, `zoology_attention`).

Registered as "transformer". Presets are functions returning a `TransformerConfig`:
`PRESETS["llama_small"]()` etc. Choices: q/k/v are separate projections in every preset (a fused
projection is the same function; only checkpoint layouts differ); masks are hard (Zoology's
additive -10000 gives exp(-10000) = 0 in float32 as well). `impl` chooses the implementation of
the `attention` op (auto | reference | chunked, see pallas_kernels/impl.py); `block` is its key
block size, which never changes the function.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from flax import nnx

from layers.attention import Attention, attention_mixer_flops
from layers.common import check_block, check_impl, check_rope_head_dim
from layers.mlp import GeluMLP, SwiGLU, gelu_mlp_flops, llama_ffn_dim, swiglu_flops
from layers.norms import make_norm
from zoo.lm import Block, CausalLM, build_lm, causal_keys, lm_flops, lm_param_count
from zoo.registry import ConformanceSpec, register


@dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None       # None: = n_heads (MHA)
    head_dim: int | None = None         # None: dim // n_heads
    ffn: str = "swiglu"                 # swiglu | gelu | none
    ffn_dim: int | None = None          # None: Llama sizing (swiglu, multiple of 64) or 4*dim (gelu)
    norm: str = "rms"                   # rms | layer
    norm_eps: float = 1e-5
    rope_base: float | None = 10000.0   # None: no RoPE
    pos_embed: str = "none"             # none | learned
    max_len: int = 2048                 # KV-cache length; the hard limit with learned positions
    tie_embeddings: bool = True
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    init: str = "normal"                # normal (std init_std) | torch (PyTorch defaults, GAM)
    init_std: float = 0.02
    depth_scaled_init: bool = False     # W_o, W_2 with std init_std / sqrt(2 n_layers)
    window: int | None = None           # sliding window W (W + 1 keys) on the windowed layers
    window_layers: str = "all"          # all | odd (RAT's Attention-SWA: odd layers windowed)
    embed_dropout: float = 0.0
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    impl: str = "auto"                  # attention: auto | reference | chunked
    block: int = 128                    # attention key block (never changes the function)
    compute_dtype: str = "float32"
    remat: str = "none"

    def validate(self):
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={kv}")
        if self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        if self.rope_base is not None:
            check_rope_head_dim(self.hd, f"model.head_dim={self.head_dim}" if self.head_dim else
                                f"model.dim={self.dim} / model.n_heads={self.n_heads}",
                                " (or model.rope_base=None)")
        for key, val, ok in (("ffn", self.ffn, ("swiglu", "gelu", "none")),
                             ("norm", self.norm, ("rms", "layer")),
                             ("pos_embed", self.pos_embed, ("none", "learned")),
                             ("window_layers", self.window_layers, ("all", "odd")),
                             ("init", self.init, ("normal", "torch"))):
            if val not in ok:
                raise ValueError(f"model.{key}={val!r} is not one of {ok}")
        check_impl(self.impl, ("attention",))
        check_block(self.block)

    @property
    def hd(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def kv(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def d_ff(self) -> int:
        if self.ffn_dim is not None:
            return self.ffn_dim
        if self.ffn == "swiglu":
            return llama_ffn_dim(self.dim, 256 if self.dim >= 512 else 64)
        return 4 * self.dim

    def layer_window(self, i: int) -> int | None:
        if self.window is None:
            return None
        return self.window if (self.window_layers == "all" or i % 2 == 1) else None


def build_block(cfg: TransformerConfig, i: int, rngs: nnx.Rngs) -> Block:
    out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5 if cfg.depth_scaled_init else cfg.init_std
    attn = Attention(cfg.dim, cfg.n_heads, cfg.kv, cfg.hd, rngs=rngs, rope_base=cfg.rope_base,
                     window=cfg.layer_window(i), max_len=cfg.max_len, qkv_bias=cfg.qkv_bias,
                     out_bias=cfg.out_bias, init=cfg.init, std=cfg.init_std, out_std=out_std,
                     attn_dropout=cfg.attn_dropout, impl=cfg.impl, block=cfg.block)
    ffn = None
    if cfg.ffn == "swiglu":
        ffn = SwiGLU(cfg.dim, cfg.d_ff, rngs=rngs, std=cfg.init_std, out_std=out_std)
    elif cfg.ffn == "gelu":
        ffn = GeluMLP(cfg.dim, cfg.d_ff, rngs=rngs, use_bias=cfg.mlp_bias, init=cfg.init,
                      std=cfg.init_std, out_std=out_std)
    norm2 = make_norm(cfg.norm, cfg.dim, cfg.norm_eps) if ffn is not None else None
    return Block(attn, make_norm(cfg.norm, cfg.dim, cfg.norm_eps), ffn, norm2,
                 resid_dropout=cfg.resid_dropout)


def transformer_max_len(cfg: TransformerConfig) -> int | None:
    return cfg.max_len if cfg.pos_embed == "learned" else None


def transformer_param_count(cfg: TransformerConfig) -> int:
    """Documented formula (specs/transformer.md §6.8, generalised to biases and LayerNorm)."""
    D, H, Hkv, dh, F, V = cfg.dim, cfg.n_heads, cfg.kv, cfg.hd, cfg.d_ff, cfg.vocab_size
    norm = D if cfg.norm == "rms" else 2 * D
    attn = D * (H + 2 * Hkv) * dh + H * dh * D
    attn += ((H + 2 * Hkv) * dh if cfg.qkv_bias else 0) + (D if cfg.out_bias else 0)
    if cfg.ffn == "swiglu":
        ffn = 3 * D * F
    elif cfg.ffn == "gelu":
        ffn = 2 * D * F + ((F + D) if cfg.mlp_bias else 0)
    else:
        ffn = 0
    block = attn + ffn + norm * (2 if cfg.ffn != "none" else 1)
    return lm_param_count(cfg.n_layers * block, vocab_size=V, dim=D,
                          tie_embeddings=cfg.tie_embeddings, final_norm=norm,
                          learned_positions=transformer_max_len(cfg))


def transformer_flops(cfg: TransformerConfig, seq_len: int) -> float:
    """Training FLOPs per token (the convention of `zoo.lm`): 3 x (sum over layers l of
    [2D(H + 2Hkv)dh + 2 H dh D + 4 H dh keys_l + {swiglu 3, gelu 2, none 0} x 2 D F] + 2 D V),
    keys_l = seq_len, or window + 1 on a windowed layer (the reference attention computes every
    key and masks them, so XLA sees seq_len keys there)."""
    ffn = {"swiglu": swiglu_flops, "gelu": gelu_mlp_flops, "none": lambda d, f: 0.0}[cfg.ffn]
    blocks = [attention_mixer_flops(cfg.dim, cfg.n_heads, cfg.kv, cfg.hd,
                                    causal_keys(seq_len, cfg.layer_window(i)))
              + ffn(cfg.dim, cfg.d_ff) for i in range(cfg.n_layers)]
    return lm_flops(blocks, vocab_size=cfg.vocab_size, dim=cfg.dim)


@register("transformer", config=TransformerConfig, max_len=transformer_max_len,
          param_count=transformer_param_count, flops=transformer_flops,
          conformance=ConformanceSpec(
              config=TransformerConfig(vocab_size=37, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                       window=6, window_layers="odd", max_len=64, init_std=0.1),
              length=13, cuts=(1, 6, 7, 12),
              reference={"impl": "reference"},
              fast=({"impl": "chunked", "block": 4}, {"impl": "pallas_interpret", "block": 8})))
def build_transformer(cfg: TransformerConfig, rngs: nnx.Rngs) -> CausalLM:
    cfg.validate()
    # blocks are drawn after the embedding, positions and head (this family's parameter order)
    return build_lm(lambda: [build_block(cfg, i, rngs) for i in range(cfg.n_layers)],
                    vocab_size=cfg.vocab_size, dim=cfg.dim,
                    final_norm=make_norm(cfg.norm, cfg.dim, cfg.norm_eps), rngs=rngs,
                    tie_embeddings=cfg.tie_embeddings, init=cfg.init, init_std=cfg.init_std,
                    learned_positions=transformer_max_len(cfg),
                    positions_std=1.0 if cfg.init == "torch" else cfg.init_std,
                    embed_dropout=cfg.embed_dropout, compute_dtype=cfg.compute_dtype,
                    remat=cfg.remat)


# ----------------------------------------------------------------------------- presets

def llama(size: str = "small", **kw) -> TransformerConfig:
    sizes = {
        "tiny": dict(dim=128, n_layers=2, n_heads=2),
        "small": dict(dim=512, n_layers=8, n_heads=8),
        "base": dict(dim=768, n_layers=12, n_heads=12, vocab_size=32000),
    }
    return dataclasses.replace(TransformerConfig(), **{**sizes[size], **kw})


def rat_attention(swa: bool = False, **kw) -> TransformerConfig:
    base = dict(dim=2048, n_layers=24, n_heads=16, ffn="gelu", norm="rms", norm_eps=1e-6,
                tie_embeddings=True, vocab_size=32000, max_len=4096)
    if swa:
        base.update(window=1024, window_layers="odd")
    return dataclasses.replace(TransformerConfig(), **{**base, **kw})


def gam_transformer(**kw) -> TransformerConfig:
    base = dict(vocab_size=10000, dim=512, n_layers=6, n_heads=8, ffn="gelu", norm="layer",
                norm_eps=1e-5, rope_base=None, pos_embed="learned", max_len=256,
                tie_embeddings=True, qkv_bias=True, out_bias=True, mlp_bias=True, init="torch",
                embed_dropout=0.1, attn_dropout=0.1, resid_dropout=0.1)
    return dataclasses.replace(TransformerConfig(), **{**base, **kw})


def zoology_attention(dim: int = 128, max_len: int = 64, **kw) -> TransformerConfig:
    base = dict(vocab_size=8192, dim=dim, n_layers=2, n_heads=1, ffn="none", norm="layer",
                norm_eps=1e-5, rope_base=None, pos_embed="learned", max_len=max_len,
                tie_embeddings=True, qkv_bias=True, out_bias=True, depth_scaled_init=True,
                embed_dropout=0.1, attn_dropout=0.1)
    return dataclasses.replace(TransformerConfig(), **{**base, **kw})


PRESETS = {
    "llama_tiny": lambda: llama("tiny"),
    "llama_small": lambda: llama("small"),
    "llama_small_gqa": lambda: llama("small", n_kv_heads=2),
    "llama_base": lambda: llama("base"),
    "rat_attention": rat_attention,
    "rat_attention_swa": lambda: rat_attention(swa=True),
    "gam_transformer": gam_transformer,
    "zoology_attention": zoology_attention,
}


# ----------------------------------------------------------------------------- Hugging Face

from zoo import hf as _hf  # noqa: E402


@_hf.hf_converter("LlamaForCausalLM")
def from_hf_llama(hf: dict, tensors: dict) -> CausalLM:
    """Llama checkpoints: same half-split RoPE and `repeat_kv` GQA mapping as seqzoo."""
    cfg = llama_config(hf)
    return _fill_llama(_hf.build_abstract(build_transformer, cfg), tensors)


def llama_config(hf: dict) -> TransformerConfig:
    """The TransformerConfig of a Llama config.json (one error line for what it cannot carry)."""
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type not in ("default", None):
        raise ValueError(f"Llama rope_type {rope_type!r} is not supported (only 'default')")
    n_heads = hf["num_attention_heads"]
    dim = hf["hidden_size"]
    cfg = TransformerConfig(
        vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or dim // n_heads, ffn="swiglu",
        ffn_dim=hf["intermediate_size"], norm="rms", norm_eps=float(hf["rms_norm_eps"]),
        rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        max_len=int(hf.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=bool(hf.get("attention_bias", False)), out_bias=bool(hf.get("attention_bias", False)))
    if hf.get("mlp_bias"):
        raise ValueError("Llama mlp_bias=True is not supported")
    return cfg


def _fill_llama(model: CausalLM, tensors) -> CausalLM:
    src = _hf.TensorSource(tensors)
    src.assign(model.embed.embedding, "model.embed_tokens.weight")
    for i, blk in enumerate(model.blocks):
        p = f"model.layers.{i}."
        att = blk.mixer
        for ours, theirs in ((att.wq, "q_proj"), (att.wk, "k_proj"), (att.wv, "v_proj"),
                             (att.wo, "o_proj")):
            src.assign(ours.weight, p + f"self_attn.{theirs}.weight", transpose=True)
            if ours.bias is not None:
                src.assign(ours.bias, p + f"self_attn.{theirs}.bias")
        for ours, theirs in ((blk.ffn.w1, "gate_proj"), (blk.ffn.w3, "up_proj"),
                             (blk.ffn.w2, "down_proj")):
            src.assign(ours.weight, p + f"mlp.{theirs}.weight", transpose=True)
        src.assign(blk.norm1.weight, p + "input_layernorm.weight")
        src.assign(blk.norm2.weight, p + "post_attention_layernorm.weight")
    src.assign(model.final_norm.weight, "model.norm.weight")
    if model.head is not None:
        src.assign(model.head.weight, "lm_head.weight", transpose=True)
    src.check_all_used(ignore=("rotary_emb.inv_freq",))
    return _hf.check_filled(model)


@_hf.hf_exporter("transformer")
def to_hf_llama(model: CausalLM, cfg: TransformerConfig) -> tuple[dict, dict]:
    """The inverse of `from_hf_llama`: a Llama config.json and its tensors (PyTorch layout)."""
    bad = [f"{k}={getattr(cfg, k)!r}" for k, want in (("ffn", "swiglu"), ("norm", "rms"),
                                                       ("pos_embed", "none"), ("mlp_bias", False),
                                                       ("window", None))
           if getattr(cfg, k) != want]
    if cfg.rope_base is None:
        bad.append("rope_base=None")
    if cfg.qkv_bias != cfg.out_bias:
        bad.append("qkv_bias != out_bias")
    if bad:
        raise ValueError(f"this transformer has no Llama equivalent ({', '.join(bad)})")
    t = {"model.embed_tokens.weight": model.embed.embedding[...],
         "model.norm.weight": model.final_norm.weight[...]}
    for i, blk in enumerate(model.blocks):
        p = f"model.layers.{i}."
        att = blk.mixer
        for ours, theirs in ((att.wq, "q_proj"), (att.wk, "k_proj"), (att.wv, "v_proj"),
                             (att.wo, "o_proj")):
            t[p + f"self_attn.{theirs}.weight"] = np.asarray(ours.weight[...]).T
            if ours.bias is not None:
                t[p + f"self_attn.{theirs}.bias"] = ours.bias[...]
        for ours, theirs in ((blk.ffn.w1, "gate_proj"), (blk.ffn.w3, "up_proj"),
                             (blk.ffn.w2, "down_proj")):
            t[p + f"mlp.{theirs}.weight"] = np.asarray(ours.weight[...]).T
        t[p + "input_layernorm.weight"] = blk.norm1.weight[...]
        t[p + "post_attention_layernorm.weight"] = blk.norm2.weight[...]
    if model.head is not None:
        t["lm_head.weight"] = np.asarray(model.head.weight[...]).T
    n_kv = cfg.n_kv_heads or cfg.n_heads
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
              "intermediate_size": int(model.blocks[0].ffn.w1.weight[...].shape[1]),
              "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
              "num_key_value_heads": n_kv, "head_dim": cfg.head_dim or cfg.dim // cfg.n_heads,
              "hidden_act": "silu", "max_position_embeddings": cfg.max_len,
              "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_base,
              "tie_word_embeddings": model.head is None, "attention_bias": cfg.qkv_bias,
              "mlp_bias": False, "torch_dtype": "float32"}
    return config, t
