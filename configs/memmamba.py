"""MemMamba (zoo/memmamba.py, specs/memmamba.md).

  tiny   a few MQAR steps of a 2-layer dim-32 MemMamba: d_s 16, a pool of 8 notes, layer 2 reads
         layer 1's summaries (p = g = 2); tests and smoke runs
  200m   the paper's 24 layers, d_s 64, pool 50 at the inferred width 1024 (§3.2; 224 M
         parameters), p = g = 4; §6.1's recipe: T = 8,000, AdamW lr 1e-4 constant (the cosine's
         floor at the peak: min_lr_ratio 1), weight decay 0.1, gradient accumulation 4, clipping
         1.0, 100k steps, seed 123; batch 8 [choice: the paper gives none]. Reads pre-tokenized
         GPT-NeoX `.bin` tokens (`data.path`; PG19 itself is not available offline). Only
         eval_shape'd in tests.
"""
from train import config as C
from zoo.memmamba import PRESETS, MemMambaConfig

VARIANTS = ("tiny", "200m")


def get_config(arg=None):
    arg = arg or VARIANTS[0]
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r} of configs/memmamba.py (known: "
                         f"{', '.join(VARIANTS)})")
    if arg == "tiny":
        cfg = C.default_config()
        cfg.model = C.model_section("memmamba", MemMambaConfig(
            dim=32, n_layers=2, d_state=8, d_summary=16, pool_size=8, cross_every=2,
            cross_layers=2), vocab_size=None)
        return C.tiny_budget(cfg)
    preset = PRESETS["memmamba_200m"]()
    cfg = C.base_config(C.model_section("memmamba", preset))
    cfg.data.source = "tokens"
    cfg.data.path = "tokens.bin"
    cfg.data.dtype = "uint16"
    cfg.data.vocab_size = preset.vocab_size
    cfg.data.seq_len = 8000
    cfg.train.batch_size = 8
    cfg.train.grad_accum = 4
    cfg.train.steps = 100_000
    cfg.train.warmup_steps = 0
    cfg.train.lr = 1e-4
    cfg.train.min_lr_ratio = 1.0
    cfg.train.weight_decay = 0.1
    cfg.train.clip_norm = 1.0
    cfg.train.seed = 123
    cfg.eval.batch_size = 8
    cfg.eval.every = 2000
    cfg.checkpoint.every = 2000
    cfg.mesh.shape = (-1, 1, 1)
    return cfg
