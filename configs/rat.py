"""RAT (zoo/rat.py, specs/rat.md): chunked recurrence + inter-chunk attention, and the hybrid.

  tiny                 a few MQAR steps of a tiny RAT (dim 32, chunk 4; tests, smoke runs)
  hybrid_tiny          the same with the RAT / sliding-window interleave (window 8)
  mqar_l4, mqar_l8, mqar_l16   specs/rat.md §9.2 synthetic sizes: dim 128, 2 layers, 2 heads,
                       G 2, the chunk sizes L in {4, 8, 16}
  xl_l16, xl_l64, xl_l128      the paper's 1.3B layout (§9.1: 24 layers, D 2048, 16 heads,
                       G 2, T 4096, GELU-4D) at the chunk sizes it studies
  (NoPE, §4.2: any variant with --config.model.pe=none)
  hybrid_xl_l16        RAT(L=16)-SWA: RAT at even layers, SWA (window 1024) at odd layers
The xl variants read pre-tokenized `.bin` tokens (`data.path`); they are meant for accelerators
and only eval_shape'd in the tests. `chunk` is part of the model: change it only with a fresh run.
"""
from train import config as C
from zoo.rat import RATConfig, rat_xl

VARIANTS = ("tiny", "hybrid_tiny", "mqar_l4", "mqar_l8", "mqar_l16", "xl_l16", "xl_l64",
            "xl_l128", "hybrid_xl_l16")


def _xl(name: str, model: RATConfig):
    """§9.1 recipe: AdamW lr 8e-4, betas (0.9, 0.95), wd 0.1, clip 1.0, warmup 5 %, cosine."""
    cfg = C.base_config(C.model_section(name, model, compute_dtype="bfloat16"))
    cfg.data.source = "tokens"
    cfg.data.path = "tokens.bin"
    cfg.data.dtype = "uint16"
    cfg.data.vocab_size = model.vocab_size
    cfg.data.seq_len = 4096
    cfg.train.batch_size = 512
    cfg.train.steps = 48000
    cfg.train.warmup_steps = 2400
    cfg.train.lr = 8e-4
    cfg.train.b2 = 0.95
    cfg.train.weight_decay = 0.1
    cfg.eval.batch_size = 512
    cfg.eval.every = 1000
    cfg.checkpoint.every = 1000
    cfg.mesh.shape = (-1, 1, 1)
    return cfg


def get_config(arg=None):
    arg = arg or VARIANTS[0]
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r} of configs/rat.py (known: {', '.join(VARIANTS)})")
    hybrid = arg.startswith("hybrid_")
    name = "rat_hybrid" if hybrid else "rat"
    size = arg.removeprefix("hybrid_")
    if size.startswith("xl_"):
        chunk = int(size.split("_")[1][1:])
        return _xl(name, rat_xl(chunk))
    cfg = C.default_config()
    if size == "tiny":
        model = RATConfig(dim=32, n_layers=2, n_heads=2, n_groups=2, chunk=4, window=8)
    else:
        model = RATConfig(dim=128, n_layers=2, n_heads=2, n_groups=2, chunk=int(size[6:]),
                          window=16)
    cfg.model = C.model_section(name, model, vocab_size=None)
    cfg.model.max_len = cfg.data.seq_len
    if size == "tiny":
        C.tiny_budget(cfg)
    return cfg
