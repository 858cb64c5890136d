"""Linear-memory LMs (zoo/linear_memory.py, specs/mom.md §2.6, §2.8, §3): linear attention, GLA,
DeltaNet, Gated DeltaNet — the bases of MoM.

  <model>_tiny      a few MQAR steps of a tiny model (tests, smoke runs), for each of
                    linear_attention, gla, deltanet, gated_deltanet
  <model>_380m      (linear_attention, gla, gated_deltanet; `preset` has every model and
                    size) the base at MoM's "380M" scale (mom.md §3: D 1024, 24 layers, 4 heads of
                    dk 256, SwiGLU hidden_ratio 3; GLA with expand_k 0.5), T 2048, 0.5M tokens
                    per step, lr 3e-4 (mom.md §5.1), on pre-tokenized `.bin` tokens
The large variants are meant for accelerators and only eval_shape'd in the tests.
"""
from train import config as C
from zoo.linear_memory import CONFIGS, preset

MODELS = tuple(CONFIGS)
# paper scale: one per op path (DeltaNet's is Gated DeltaNet's without the decay; the 1.3B shape
# is the same code at another width): each eval_shape traces 24 layers (~20-30 s of CI)
VARIANTS = (tuple(f"{m}_tiny" for m in MODELS)
            + ("linear_attention_380m", "gla_380m", "gated_deltanet_380m"))


def get_config(arg=None):
    arg = arg or VARIANTS[0]
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r} of configs/linear_memory.py "
                         f"(known: {', '.join(VARIANTS)})")
    name, size = arg.rsplit("_", 1)
    if size == "tiny":
        cfg = C.default_config()
        model = CONFIGS[name](dim=32, n_layers=2, n_heads=2, ffn_dim=64, block=8)
        cfg.model = C.model_section(name, model, vocab_size=None)
        C.tiny_budget(cfg)
        return cfg
    model = preset(name, size, compute_dtype="bfloat16")
    cfg = C.base_config(C.model_section(name, model))
    T, batch = 2048, 256                                     # 0.5M tokens per step
    cfg.data.source = "tokens"
    cfg.data.path = "tokens.bin"
    cfg.data.dtype = "uint16"
    cfg.data.vocab_size = model.vocab_size
    cfg.data.seq_len = T
    cfg.train.batch_size = batch
    cfg.train.steps = 30000                                  # 15B tokens
    cfg.train.warmup_steps = 1024
    cfg.train.lr = 3e-4
    cfg.train.b2 = 0.95
    cfg.train.weight_decay = 0.01
    cfg.eval.batch_size = batch
    cfg.eval.every = 1000
    cfg.checkpoint.every = 1000
    cfg.mesh.shape = (-1, 1, 1)
    return cfg
