"""GAM, Gated Associative Memory (specs/gam.md), registered as "gam": the official code's model
(`gam_model.py`, §4), not the paper's Transformer baseline (that is zoo/transformer.py's
`gam_transformer` preset).

    e = E[tokens] + P[pos];  h = Dropout(e);  h = GAMBlock_i(h) for i < N;  logits = LN_f(h) E^T
    GAMBlock: h' = h + c(LN1(h));  h'' = h' + Dropout(W2 GELU(W1 LN2(h') + b1) + b2)

`c` is `layers.gam.GAMMixer` (conv + memory + gates, §3.2-3.4); the block is `zoo.lm.Block`
with no dropout on `c` (§8.7) and the FFN's output dropout. The memory bank is static (§3.1):
the network's receptive field is N (k - 1) + 1 tokens. `fusion` selects Table 3's ablations
(§7.1). `pe` "learned_abs" (default) caps the length at `max_len` (§8.4); "none" removes the
table (a deviation from the paper). `impl` / `block` choose the `attention` op's form of the
memory read (a slot block size; neither changes the function).

Not reproduced: weight decay on every parameter (§8.5): the trainer decays matrices only, so
LayerNorms and biases are not decayed (the memory bank, a matrix, is).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from flax import nnx

from layers.common import check_block, check_impl
from layers.gam import FUSIONS, INITS, GAMMixer, gam_mixer_count, gam_mixer_flops, uses_memory
from layers.mlp import GeluMLP, gelu_mlp_flops
from layers.norms import LayerNorm
from zoo.lm import Block, CausalLM, build_lm, lm_flops, lm_param_count
from zoo.registry import ConformanceSpec, ParamGroup, register

PES = ("learned_abs", "none")


@dataclass(frozen=True)
class GAMConfig:
    vocab_size: int = 256
    dim: int = 64                       # D (N_EMBED)
    n_layers: int = 2                   # N
    n_slots: int = 64                   # S (NUM_MEMORY_SLOTS)
    kernel_size: int = 3                # k (CONV_KERNEL_SIZE)
    max_len: int = 256                  # T_max (BLOCK_SIZE): the learned-position table
    pe: str = "learned_abs"             # learned_abs | none
    fusion: str = "gated"               # gated | global | sum | local (Table 3)
    memory_scale: bool = False          # scores / sqrt(D) (§10; off in the paper)
    init: str = "torch_default"         # torch_default (§6) | normal_0.02
    dropout: float = 0.0                # embedding sum and FFN output (§8.7)
    norm_eps: float = 1e-5
    impl: str = "auto"                  # the memory read's attention op: auto | reference | chunked
    block: int = 128                    # memory slots per block of the chunked read
    compute_dtype: str = "float32"
    remat: str = "none"

    def validate(self):
        for key, val, ok in (("pe", self.pe, PES), ("fusion", self.fusion, FUSIONS),
                             ("init", self.init, INITS)):
            if val not in ok:
                raise ValueError(f"model.{key}={val!r} is not one of {ok}")
        for key in ("dim", "n_layers", "n_slots", "kernel_size", "max_len"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key}={getattr(self, key)} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")
        check_impl(self.impl, ("attention",) if uses_memory(self.fusion) else ())
        check_block(self.block)

    @property
    def receptive_field(self) -> int:
        """Tokens that can reach one output (specs/gam.md §3.1): N (k - 1) + 1."""
        k = self.kernel_size if self.fusion != "global" else 1
        return self.n_layers * (k - 1) + 1


def gam_max_len(cfg: GAMConfig) -> int | None:
    return cfg.max_len if cfg.pe == "learned_abs" else None


def build_block(cfg: GAMConfig, rngs: nnx.Rngs) -> Block:
    torch = cfg.init == "torch_default"
    mixer = GAMMixer(cfg.dim, rngs=rngs, n_slots=cfg.n_slots, kernel_size=cfg.kernel_size,
                     fusion=cfg.fusion, memory_scale=cfg.memory_scale, init=cfg.init,
                     impl=cfg.impl, block=cfg.block)
    ffn = GeluMLP(cfg.dim, 4 * cfg.dim, rngs=rngs, use_bias=True,
                  init="torch" if torch else "normal", std=0.02, dropout_rate=cfg.dropout)
    return Block(mixer, LayerNorm(cfg.dim, eps=cfg.norm_eps), ffn,
                 LayerNorm(cfg.dim, eps=cfg.norm_eps), resid_dropout=0.0)


def gam_param_count(cfg: GAMConfig) -> int:
    """specs/gam.md §4: per block (kD + D) + SD + (2D^2 + 2D) + (8D^2 + 5D) + 4D (the mixer's
    terms as its `fusion` has them), embeddings VD + T_max D + 2D (tied head, final LN)."""
    D = cfg.dim
    block = gam_mixer_count(D, cfg.n_slots, cfg.kernel_size, cfg.fusion) + 8 * D * D + 5 * D + 4 * D
    return lm_param_count(cfg.n_layers * block, vocab_size=cfg.vocab_size, dim=D,
                          final_norm=2 * D, learned_positions=gam_max_len(cfg))


def gam_flops(cfg: GAMConfig, seq_len: int) -> float:
    """Training FLOPs per token (the convention of `zoo.lm`): 3 x (N x [conv 2kD + memory 4SD +
    gate 4D^2 + FFN 16D^2] + head 2DV). Independent of `seq_len` (§3.1: linear in T)."""
    block = (gam_mixer_flops(cfg.dim, cfg.n_slots, cfg.kernel_size, cfg.fusion)
             + gelu_mlp_flops(cfg.dim, 4 * cfg.dim))
    return lm_flops(cfg.n_layers * block, vocab_size=cfg.vocab_size, dim=cfg.dim)


_TINY = GAMConfig(vocab_size=37, dim=16, n_layers=2, n_slots=10, kernel_size=3, max_len=32)


@register("gam", config=GAMConfig, max_len=gam_max_len, param_count=gam_param_count,
          flops=gam_flops,
          groups=(ParamGroup("all", ("*",), weight_decay=True,
                             why="gam.md: weight decay 0.1 on all parameters (LN, biases, "
                                 "embeddings, memory included)"),),
          conformance=ConformanceSpec(
              config=_TINY, length=13, cuts=(1, 2, 3, 12),
              reference={"impl": "reference"},
              fast=({"impl": "chunked", "block": 4}, {"impl": "pallas_interpret", "block": 8}),
              flops_config=dataclasses.replace(_TINY, dim=32, n_slots=24)))
def build_gam(cfg: GAMConfig, rngs: nnx.Rngs) -> CausalLM:
    cfg.validate()
    torch = cfg.init == "torch_default"
    return build_lm(lambda: [build_block(cfg, rngs) for _ in range(cfg.n_layers)],
                    vocab_size=cfg.vocab_size, dim=cfg.dim,
                    final_norm=LayerNorm(cfg.dim, eps=cfg.norm_eps), rngs=rngs,
                    tie_embeddings=True, init="torch" if torch else "normal", init_std=0.02,
                    learned_positions=gam_max_len(cfg), positions_std=1.0 if torch else 0.02,
                    embed_dropout=cfg.dropout, compute_dtype=cfg.compute_dtype, remat=cfg.remat)


# ----------------------------------------------------------------------------- presets

def gam_paper(**kw) -> GAMConfig:
    """The paper's configuration (specs/gam.md §2): 22,599,680 parameters."""
    base = dict(vocab_size=10000, dim=512, n_layers=6, n_slots=512, kernel_size=3, max_len=256,
                dropout=0.1)
    return dataclasses.replace(GAMConfig(), **{**base, **kw})


PRESETS = {
    "gam_paper": gam_paper,
    "gam_global_only": lambda: gam_paper(fusion="global"),    # 19,435,520 (§7.1)
    "gam_sum_fusion": lambda: gam_paper(fusion="sum"),        # 19,447,808
    "gam_local_only": lambda: gam_paper(fusion="local"),      # 17,874,944
}
