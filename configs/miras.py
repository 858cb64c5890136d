"""Miras: Moneta, Yaad, Memora (zoo/miras.py, specs/miras.md) and their -H hybrids.

  <model>_tiny      a few MQAR steps of a tiny model (tests, smoke runs), model in moneta, yaad,
                    memora
  <model>_h_tiny    the same memory in Moneta-H / Yaad-H / Memora-H (miras.md §3: Samba-style
                    alternation of a Miras layer and a sliding-window-attention layer, "the same
                    arrangement as Titans-MAL", titans.md §3.6 — built by Titans' MAL host,
                    `model.hybrid=mal`; RoPE on the attention layers only)
  <model>_h_170m    the -H hybrid at Table 5's "170M" backbone (12 blocks, D 768, 16 heads, peak
                    lr 3e-3, T 4096, window 2048: miras.md §6 row 12, the paper follows Samba and
                    gives no window), on pre-tokenized `.bin` tokens; meant for accelerators, only
                    eval_shape'd in the tests
Any memory LM here takes the hybrids as flags: `--config.model.hybrid=mal|mag`,
`--config.model.attn_window=W`, `--config.model.n_persistent=N_p` (the persistent tokens of
Titans' hosts; 4 by default, 0 for none), `--config.model.mal_layout=literal`. Yaad's Eq. 26 as
printed is `--config.model.huber=mixture` (the default, `coord`, is the spec's channel-wise
reading).
"""
from train import config as C
from zoo.miras import MemoraConfig, MonetaConfig, YaadConfig

CONFIGS = {"moneta": MonetaConfig, "yaad": YaadConfig, "memora": MemoraConfig}
VARIANTS = (tuple(f"{m}_tiny" for m in CONFIGS) + tuple(f"{m}_h_tiny" for m in CONFIGS)
            + tuple(f"{m}_h_170m" for m in CONFIGS))


def get_config(arg=None):
    arg = arg or VARIANTS[0]
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r} of configs/miras.py "
                         f"(known: {', '.join(VARIANTS)})")
    name, rest = arg.split("_", 1)
    hybrid = dict(hybrid="mal") if rest.startswith("h_") else {}
    if rest.endswith("tiny"):
        cfg = C.default_config()
        model = CONFIGS[name](dim=32, n_layers=2, n_heads=2, chunk=4, ffn_dim=64, gate_rank=8,
                              attn_window=8, n_persistent=2, **hybrid)
        cfg.model = C.model_section(name, model, vocab_size=None)
        C.tiny_budget(cfg)
        cfg.model.max_len = cfg.data.seq_len
        return cfg
    T = 4096
    model = CONFIGS[name](dim=768, n_layers=12, n_heads=16, chunk=16, attn_window=2048,
                          vocab_size=32000, max_len=T, **hybrid)
    cfg = C.base_config(C.model_section(name, model))
    cfg.data.source = "tokens"
    cfg.data.path = "tokens.bin"
    cfg.data.dtype = "uint16"
    cfg.data.vocab_size = 32000
    cfg.data.seq_len = T
    cfg.train.batch_size = 128                 # 0.5M tokens per step
    cfg.train.steps = 30000                    # 15B tokens (Table 5's 170M budget)
    cfg.train.warmup_steps = 2000
    cfg.train.lr = 3e-3
    cfg.train.b2 = 0.95
    cfg.eval.batch_size = 128
    cfg.eval.every = 1000
    cfg.checkpoint.every = 1000
    cfg.mesh.shape = (-1, 1, 1)
    return cfg
