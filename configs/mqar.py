"""MQAR (specs/tasks.md §1) with attention models.

  default  the built-in default of `python -m train`: 8 key-value pairs in 64 tokens,
           vocabulary 128 (keys 1..63, values 64..127), a 2-layer attention-only Transformer
           (dim 128, 2 heads, RoPE); trains to >= 95% held-out accuracy on a 2-core CPU.
  tiny     a few steps of a smaller model (tests and smoke runs).
  zoology  Zoology Figure-2 cell (T=128, D=8, V=8192) with the `zoology_attention` preset (d=128).
"""
from train import config as C

VARIANTS = ("default", "tiny", "zoology")


def get_config(arg=None):
    arg = arg or VARIANTS[0]
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r} of configs/mqar.py (known: {', '.join(VARIANTS)})")
    cfg = C.default_config()
    if arg == "tiny":
        cfg.model.dim = 32
        C.tiny_budget(cfg)
    elif arg == "zoology":
        from zoo.transformer import zoology_attention
        cfg.model = C.model_section("transformer", zoology_attention(dim=128, max_len=128),
                                    vocab_size=None)
        cfg.data.seq_len = 128
        cfg.data.vocab_size = 8192
        cfg.data.num_kv_pairs = 8
        cfg.train.batch_size = 512
        cfg.train.steps = 6000
        cfg.train.lr = 2.2e-3
    return cfg
