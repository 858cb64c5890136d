"""Titans (zoo/titans.py, specs/titans.md): LMM, MAC, MAG, MAL.

  lmm_tiny, mac_tiny, mag_tiny, mal_tiny   a few MQAR steps of a tiny model (tests, smoke runs)
  lmm_mqar, mac_mqar                       the built-in MQAR task (8 pairs in 64 tokens) with a
                                           2-layer model, dim 128, 2 memory heads, chunk 8
  lmm_170m                                 titans.md §5.1 backbone "170M" (12 blocks, D 768,
                                           16 heads, T 4096, chunk 16) on pre-tokenized
                                           `.bin` tokens; meant for accelerators, only
                                           eval_shape'd in the tests
The paper's variants are model flags: `--config.model.n_persistent=0` (LMM without persistent
memory, Table 5's ablation row), `--config.model.mal_layout=literal` (MAL as SWA(LMM([P; x]))
instead of the alternating Samba-style blocks). The memory chunk `chunk`, the MAC segment `segment` and the window `window` are part of the
model (titans.md §4.3): change them only together with a fresh run.
"""
from train import config as C
from zoo.titans import TitansConfig

VARIANTS = ("lmm_tiny", "mac_tiny", "mag_tiny", "mal_tiny", "lmm_mqar", "mac_mqar", "lmm_170m")


def get_config(arg=None):
    arg = arg or VARIANTS[0]
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r} of configs/titans.py (known: {', '.join(VARIANTS)})")
    kind, size = arg.split("_")
    name = f"titans_{kind}"
    if size == "170m":
        model = TitansConfig(dim=768, n_layers=12, n_heads=16, chunk=16, segment=512,
                             window=2048, n_persistent=16, max_len=4096, vocab_size=32000,
                             compute_dtype="bfloat16")
        cfg = C.base_config(C.model_section(name, model))
        cfg.data.source = "tokens"
        cfg.data.path = "tokens.bin"
        cfg.data.dtype = "uint16"
        cfg.data.vocab_size = 32000
        cfg.data.seq_len = 4096
        cfg.train.batch_size = 128
        cfg.train.steps = 30000
        cfg.train.warmup_steps = 2000
        cfg.train.lr = 3e-3
        cfg.train.b2 = 0.95
        cfg.eval.batch_size = 128
        cfg.eval.every = 1000
        cfg.checkpoint.every = 1000
        cfg.mesh.shape = (-1, 1, 1)
        return cfg
    cfg = C.default_config()
    tiny = size == "tiny"
    dims = dict(dim=32, n_layers=2, n_heads=2, chunk=4, segment=8, window=8, n_persistent=2,
                ffn_dim=64) if tiny else dict(dim=128, n_layers=2, n_heads=2, chunk=8,
                                              segment=16, window=16, n_persistent=4)
    cfg.model = C.model_section(name, TitansConfig(**dims), vocab_size=None)
    cfg.model.max_len = cfg.data.seq_len
    if tiny:
        C.tiny_budget(cfg)
    return cfg
