"""Hydra (zoo/hydra.py, specs/hydra.md: the 1.6B hybrid proposal).

  tiny   a few MQAR steps of a 3-block dim-32 Hydra: SGA at block 3 (window 16 keys, 8
         globals), MoE at block 2 (4 experts, top-2, chunks of 8), a small PKM after block 1;
         load-balance weight 0.01 (the prototype's)
  1p6b   §3.2's layout (1.608 B parameters by the formula, = the built model): d 2048, 24
         blocks, GPT-NeoX vocabulary, T 4096 [choice], AdamW lr 3e-4, weight decay 0.1,
         clipping 1.0, load balance 0.01. Reads pre-tokenized `.bin` tokens (`data.path`).
         Only eval_shape'd in tests. Not built yet: the workspace memory and the staged
         curriculum (§2.5, §2.7).
"""
from train import config as C
from zoo.hydra import PRESETS, HydraConfig

VARIANTS = ("tiny", "1p6b")


def get_config(arg=None):
    arg = arg or VARIANTS[0]
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r} of configs/hydra.py (known: "
                         f"{', '.join(VARIANTS)})")
    if arg == "tiny":
        cfg = C.default_config()
        cfg.model = C.model_section("hydra", HydraConfig(
            dim=32, n_layers=3, n_heads=2, window=15, n_global=8, n_experts=4, moe_hidden=64,
            moe_chunk=8, pkm_layer=1, pkm_sub=8, pkm_key=8, pkm_value=16, pkm_heads=2,
            pkm_topk=2), vocab_size=None)
        cfg = C.tiny_budget(cfg)
        cfg.train.aux_weights.load_balance = 0.01
        return cfg
    preset = PRESETS["hydra_1p6b"]()
    cfg = C.base_config(C.model_section("hydra", preset))
    cfg.data.source = "tokens"
    cfg.data.path = "tokens.bin"
    cfg.data.dtype = "uint16"
    cfg.data.vocab_size = preset.vocab_size
    cfg.data.seq_len = 4096
    cfg.train.batch_size = 8
    cfg.train.steps = 100_000
    cfg.train.warmup_steps = 2000
    cfg.train.lr = 3e-4
    cfg.train.weight_decay = 0.1
    cfg.train.clip_norm = 1.0
    cfg.train.aux_weights.load_balance = 0.01
    cfg.eval.batch_size = 8
    cfg.eval.every = 2000
    cfg.checkpoint.every = 2000
    cfg.mesh.shape = (-1, 1, 1)
    return cfg
