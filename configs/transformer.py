"""Transformer baselines (zoo/transformer.py presets) on language-model data.

  tiny             2 layers, dim 32, byte-level text; a few steps (tests, smoke runs)
  small            CPU run: 4 layers, dim 128, byte-level text of `data.path`
                   (e.g. --config.data.path=../shared/data/tinyshakespeare.txt)
  llama_small      specs/transformer.md sizes (Llama-style, dim 512, 8 layers, vocab 32000)
  llama_small_gqa  the same with 2 KV heads
  llama_base       dim 768, 12 layers, vocab 32000
  rat_attention    RAT paper's attention baseline (dim 2048, 24 layers, T=4096)
  rat_attention_swa  the same with sliding-window attention on odd layers
  gam_transformer  GAM paper's Transformer (learned positions, T=256)
The large variants read pre-tokenized `.bin`/`.npy` tokens (`data.path`); they are meant for
accelerators (mesh and batch as in docs/launch.md) and are only eval_shape'd in the tests.
"""
from train import config as C
from zoo.transformer import PRESETS

VARIANTS = ("tiny", "small", "llama_small", "llama_small_gqa", "llama_base", "rat_attention",
            "rat_attention_swa", "gam_transformer")

_LARGE = {  # variant: (seq_len, global batch, steps, lr)
    "llama_small": (1024, 256, 20000, 3e-4),
    "llama_small_gqa": (1024, 256, 20000, 3e-4),
    "llama_base": (2048, 256, 50000, 3e-4),
    "rat_attention": (4096, 256, 50000, 3e-4),
    "rat_attention_swa": (4096, 256, 50000, 3e-4),
    "gam_transformer": (256, 128, 20000, 1e-3),
}


def get_config(arg=None):
    arg = arg or VARIANTS[0]
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r} of configs/transformer.py (known: {', '.join(VARIANTS)})")
    if arg in ("tiny", "small"):
        dims = dict(dim=32, n_layers=2, n_heads=2) if arg == "tiny" else dict(dim=128, n_layers=4, n_heads=4)
        cfg = C.base_config(C.model_section("transformer", vocab_size=None, **dims))
        cfg.data.source = "text"
        cfg.data.path = "data.txt"
        cfg.data.seq_len = 32 if arg == "tiny" else 256
        cfg.model.max_len = cfg.data.seq_len
        cfg.train.batch_size = 8 if arg == "tiny" else 32
        cfg.train.steps = 20 if arg == "tiny" else 2000
        cfg.train.warmup_steps = 2 if arg == "tiny" else 100
        cfg.train.lr = 3e-3 if arg == "tiny" else 1e-3
        cfg.eval.batch_size = 8 if arg == "tiny" else 32
        cfg.eval.max_batches = 2 if arg == "tiny" else 8
        return cfg
    T, B, steps, lr = _LARGE[arg]
    preset = PRESETS[arg]()
    cfg = C.base_config(C.model_section("transformer", preset, compute_dtype="bfloat16",
                                        max_len=max(preset.max_len, T)
                                        if preset.pos_embed != "learned" else preset.max_len))
    cfg.data.source = "tokens"
    cfg.data.path = "tokens.bin"
    cfg.data.dtype = "uint16"
    cfg.data.vocab_size = preset.vocab_size
    cfg.data.seq_len = T
    cfg.train.batch_size = B
    cfg.train.steps = steps
    cfg.train.warmup_steps = min(2000, steps // 10)
    cfg.train.lr = lr
    cfg.train.b2 = 0.95
    cfg.eval.batch_size = B
    cfg.eval.every = 1000
    cfg.checkpoint.every = 1000
    cfg.mesh.shape = (-1, 1, 1)
    return cfg
