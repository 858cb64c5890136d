"""Hydra (zoo/hydra.py, specs/hydra.md: the 1.6B hybrid proposal).

  tiny   a few MQAR steps of a 3-block dim-32 Hydra with every component: SGA at block 3
         (window 16 keys, 8 globals), MoE at block 2 (4 experts, top-2, chunks of 8), a small
         PKM after block 1, the workspace (8 slots, rank 8, chunks of 16); load-balance weight
         0.01 (the prototype's)
  1p6b   §3.2's layout (1.610 B parameters by the formula, = the built model, workspace
         included): d 2048, 24 blocks, GPT-NeoX vocabulary, T 4096 [choice], AdamW lr 3e-4,
         weight decay 0.1, clipping 1.0, load balance 0.01. Reads pre-tokenized `.bin` tokens
         (`data.path`). Only eval_shape'd in tests.
  stage1 .. stage4   §2.7's staged curriculum at the tiny scale, each stage a fresh run that
         starts from the previous stage's run directory (`checkpoint.init_from`: the parameters
         it has are loaded, the added components freshly initialised): 1 the SSM backbone only,
         2 + SGA, 3 + the MoE (load balance 0.01, router temperature annealed 2.0 -> 1.0 over
         the stage by `train.anneal`; it stays 1.0 in stage 4), 4 + the workspace and the PKM.
         Not built: stage 4's larger rate for the PKM value table (§2.7 gives no number). Run
         them in order:
             python -m train --config=configs/hydra.py:stage1   (then stage2, stage3, stage4)
         The stages share the tiny MQAR data (§2.7's switches to long-context and retrieval data
         are data choices: --config.data.* per stage).
"""
from train import config as C
from zoo.hydra import PRESETS, HydraConfig

VARIANTS = ("tiny", "1p6b", "stage1", "stage2", "stage3", "stage4")


_TINY = dict(dim=32, n_layers=3, n_heads=2, window=15, n_global=8, n_experts=4, moe_hidden=64,
             moe_chunk=8, pkm_layer=1, pkm_sub=8, pkm_key=8, pkm_value=16, pkm_heads=2, pkm_topk=2,
             workspace=True, ws_slots=8, ws_rank=8, ws_chunk=16)
# what each curriculum stage switches on (a path absent from a layout is not built: 99 > n_layers)
_OFF = dict(pkm_layer=0, workspace=False)
_STAGES = {1: dict(sga_every=99, moe_every=99, **_OFF), 2: dict(moe_every=99, **_OFF),
           3: dict(moe_scheduled_temperature=True, moe_temperature=2.0, **_OFF),
           4: dict(moe_scheduled_temperature=True)}
ANNEAL = "*.moe.temperature=2.0:1.0"     # stage 3 (hydra.md §2.7)


def get_config(arg=None):
    arg = arg or VARIANTS[0]
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r} of configs/hydra.py (known: "
                         f"{', '.join(VARIANTS)})")
    if arg == "tiny" or arg.startswith("stage"):
        stage = int(arg[5:]) if arg.startswith("stage") else 4
        cfg = C.default_config()
        cfg.model = C.model_section("hydra", HydraConfig(**{**_TINY, **_STAGES[stage]}),
                                    vocab_size=None)
        cfg = C.tiny_budget(cfg)
        if stage >= 3:
            cfg.train.aux_weights.load_balance = 0.01
        if stage == 3 and arg.startswith("stage"):
            cfg.train.anneal = ANNEAL
        if arg.startswith("stage"):
            cfg.train.steps = 200
            cfg.checkpoint.dir = f"runs/hydra_stage{stage}"
            if stage > 1:
                cfg.checkpoint.init_from = f"runs/hydra_stage{stage - 1}"
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
