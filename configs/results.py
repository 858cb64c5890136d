"""The small-budget comparison behind docs/results.md (run outside CI with
`python -m eval.table`). One variant per (task, model): `<task>-<model>`.

Every model gets the same budget per task: width 64, 2 layers, the same optimiser, batch,
steps and data; only the sequence mixer (and its own block layout) differs.

  mqar-<model>     MQAR, 8 key-value pairs in 64 tokens, vocabulary 128 (the trainer's default
                   task), 400 steps of 32 sequences.
  passkey-<model>  token passkey (tasks.md §3.3): 5 digits, 16 filler tokens, T = 128, depth
                   uniform, 400 steps of 16 sequences; evaluated beyond the training length.
  text-<model>     byte-level tinyshakespeare (the last 10 % held out), T = 128, 400 steps of 16
                   sequences; the path is relative to the repository root.
"""
from train import config as C

TEXT_PATH = "../shared/data/tinyshakespeare.txt"

MODELS = {
    "transformer": dict(n_heads=2, ffn="swiglu", max_len=512),
    "mamba": dict(d_state=16),
    "mamba2": dict(d_state=32, head_dim=32),
    "lssl": dict(),
    "titans_lmm": dict(chunk=8),
    "titans_mac": dict(chunk=8, segment=32),
    "titans_mag": dict(chunk=8, window=32),
    "titans_mal": dict(chunk=8, window=32),
    "atlas": dict(),
    "omeganet": dict(),
}
TASKS = ("mqar", "passkey", "text")
ACCEPTED = tuple(f"{t}-{m}" for t in TASKS for m in MODELS)
# tests/test_configs.py eval_shapes every listed variant; the other models differ only in the
# model section, which the conformance suite covers, so one model per task is listed (CI time).
VARIANTS = tuple(f"{t}-transformer" for t in TASKS)


def get_config(arg=None):
    arg = arg or VARIANTS[0]
    if arg not in ACCEPTED:
        raise ValueError(f"unknown variant {arg!r} of configs/results.py (known: <task>-<model> with "
                         f"task in {', '.join(TASKS)} and model in {', '.join(MODELS)})")
    task, name = arg.split("-", 1)
    model = C.model_section(name, dim=64, n_layers=2, vocab_size=None, **MODELS[name])
    c = C.base_config(model)
    c.train.lr = 2e-3
    c.train.weight_decay = 0.0
    c.train.warmup_steps = 30
    c.train.steps = 400
    c.checkpoint.dir = f"runs/results/{arg}"
    c.checkpoint.every = 400
    c.eval.every = 200
    if task == "mqar":
        c.data.source = "mqar"
        c.data.seq_len = 64
        c.data.vocab_size = 128
        c.data.num_kv_pairs = 8
        c.train.batch_size = 32
    elif task == "passkey":
        c.data.source = "passkey"
        c.data.passkey_format = "tokens"
        c.data.seq_len = 128
        c.train.batch_size = 16
    else:
        c.data.source = "text"
        c.data.path = TEXT_PATH
        c.data.seq_len = 128
        c.train.batch_size = 16
    return c
