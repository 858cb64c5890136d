"""GAM, Gated Associative Memory (zoo/gam.py, specs/gam.md).

  tiny         a few MQAR steps of a 2-layer dim-32 GAM (tests, smoke runs; GAM sees only
               N (k - 1) + 1 = 5 tokens, so MQAR stays near chance: specs/gam.md §3.1)
  small        CPU run: 4 layers, dim 128, 128 slots, byte-level text of `data.path`, T = 256
  paper        specs/gam.md §2 and §7: D 512, 6 layers, 512 slots, k 3, T 256, vocab 10000,
               dropout 0.1; batch 32, AdamW lr 3e-4, betas (0.9, 0.95), weight decay 0.1,
               100 warm-up steps then cosine to 0, clipping 1.0, float32; 1500 steps (about
               5 epochs of WikiText-2 packed in windows of 257). Reads pre-tokenized
               `.bin` tokens (`data.path`; WikiText-2 itself is not available offline: a run
               on other text is "setup-matched, data-substituted"). Only eval_shape'd in tests.
  global_only, sum_fusion, local_only   Table 3's ablations of `paper` (same recipe)
Deviation: the trainer decays matrices only (LayerNorms and biases undecayed), where the
official recipe decays every parameter (specs/gam.md §8.5).
"""
from train import config as C
from zoo.gam import PRESETS, GAMConfig

VARIANTS = ("tiny", "small", "paper", "global_only", "sum_fusion", "local_only")


def get_config(arg=None):
    arg = arg or VARIANTS[0]
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r} of configs/gam.py (known: {', '.join(VARIANTS)})")
    if arg == "tiny":
        cfg = C.default_config()
        cfg.model = C.model_section("gam", GAMConfig(dim=32, n_layers=2, n_slots=32),
                                    vocab_size=None)
        return C.tiny_budget(cfg)
    if arg == "small":
        cfg = C.base_config(C.model_section("gam", GAMConfig(dim=128, n_layers=4, n_slots=128,
                                                             max_len=256), vocab_size=None))
        cfg.data.source = "text"
        cfg.data.path = "data.txt"
        cfg.data.seq_len = 256
        cfg.train.batch_size = 32
        cfg.train.steps = 2000
        cfg.train.warmup_steps = 100
        cfg.train.lr = 1e-3
        cfg.eval.batch_size = 32
        cfg.eval.max_batches = 8
        return cfg
    preset = PRESETS["gam_paper" if arg == "paper" else f"gam_{arg}"]()
    cfg = C.base_config(C.model_section("gam", preset))
    cfg.data.source = "tokens"
    cfg.data.path = "tokens.bin"
    cfg.data.dtype = "uint16"
    cfg.data.vocab_size = preset.vocab_size
    cfg.data.seq_len = preset.max_len
    cfg.train.batch_size = 32
    cfg.train.steps = 1500
    cfg.train.warmup_steps = 100
    cfg.train.lr = 3e-4
    cfg.train.b1 = 0.9
    cfg.train.b2 = 0.95
    cfg.train.weight_decay = 0.1
    cfg.train.clip_norm = 1.0
    cfg.eval.batch_size = 32
    cfg.eval.every = 300
    cfg.checkpoint.every = 300
    cfg.mesh.shape = (-1, 1, 1)
    return cfg
