"""MoM (zoo/mom.py, specs/mom.md): Gated-DeltaNet and linear-attention memories.

  gdn_tiny, la_tiny   a few MQAR steps of a tiny model (2 layers, dim 32, 4 memories, top-2,
                      shared memory; tests, smoke runs)
  gdn_380m            specs/mom.md §3 "380M" (mom_340M.json: D 1024, 24 layers, 4 heads of 256,
                      4 memories, top-2, shared) at §5.1's recipe (T 2048, 0.5M tokens a step,
                      lr 3e-4 cosine, AdamW 0.9/0.95, weight decay 0.01, warmup 1024)
  gdn_1.3b            the "1.3B" shape (D 2048, SwiGLU 5632), 2M tokens a step
The paper-scale variants read pre-tokenized `.bin` tokens (`data.path`, vocab 32000); they are
meant for accelerators and only eval_shape'd in the tests. The load-balancing term is weighted
by `train.aux_weights.load_balance`: 1e-3 (the paper's best, §8.4; 1e-2 in the released configs).
"""
from train import config as C
from zoo.mom import PRESETS, MoMGatedDeltaNetConfig, MoMLinearAttentionConfig

VARIANTS = ("gdn_tiny", "la_tiny", "gdn_380m", "gdn_1.3b")
AUX_WEIGHT = 1e-3

_LARGE = {"gdn_380m": ("mom_380m", 256, 15_000_000_000), "gdn_1.3b": ("mom_1.3b", 1024,
                                                                        100_000_000_000)}


def get_config(arg=None):
    arg = arg or VARIANTS[0]
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r} of configs/mom.py (known: {', '.join(VARIANTS)})")
    if arg.endswith("_tiny"):
        name, cls = (("mom_gated_deltanet", MoMGatedDeltaNetConfig) if arg == "gdn_tiny"
                     else ("mom_linear_attention", MoMLinearAttentionConfig))
        cfg = C.default_config()
        model = cls(dim=32, n_layers=2, n_heads=2, head_dim=16, n_memories=4, top_k=2,
                    ffn_dim=64, block=16)
        cfg.model = C.model_section(name, model, vocab_size=None)
        C.tiny_budget(cfg)
        cfg.train.aux_weights.load_balance = AUX_WEIGHT
        return cfg
    preset, batch, tokens = _LARGE[arg]
    T = 2048
    cfg = C.base_config(C.model_section("mom_gated_deltanet", PRESETS[preset](),
                                        compute_dtype="bfloat16"))
    cfg.data.source = "tokens"
    cfg.data.path = "tokens.bin"
    cfg.data.dtype = "uint16"
    cfg.data.vocab_size = 32000
    cfg.data.seq_len = T
    cfg.train.batch_size = batch
    cfg.train.steps = tokens // (batch * T)
    cfg.train.warmup_steps = 1024
    cfg.train.lr = 3e-4
    cfg.train.b2 = 0.95
    cfg.train.weight_decay = 0.01
    cfg.train.aux_weights.load_balance = AUX_WEIGHT
    cfg.eval.batch_size = batch
    cfg.eval.every = 1000
    cfg.checkpoint.every = 1000
    cfg.mesh.shape = (-1, 1, 1)
    return cfg
