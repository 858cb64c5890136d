"""The small-budget comparison behind docs/results.md (run outside CI with
`python -m eval.table`). One variant per (task, model): `<task>-<model>`.

Every model gets the same budget per task: width 128, 2 layers, the same optimiser (AdamW, lr
2e-3, no weight decay, 30 warm-up steps, cosine), batch, steps and data; only the sequence
mixer (and its own block layout) differs.

  mqar-<model>     MQAR, 8 key-value pairs in 64 tokens, vocabulary 128 (the trainer's default
                   task), 800 steps of 64 sequences. The Transformer here is the trainer's default
                   model (attention-only blocks): with SwiGLU blocks it had not left the
                   plateau by step 500 at this budget (measured, 0.150 accuracy).
  passkey-<model>  token passkey (tasks.md §3.3): 5 digits, 16 filler tokens, T = 128, depth
                   uniform, 500 steps of 16 sequences; evaluated beyond the training length.
  text-<model>     byte-level tinyshakespeare (the last 10 % held out), T = 128, 500 steps of 16
                   sequences; the path is relative to the repository root.

Model settings chosen for a 2-core CPU (per-step costs measured with `python -m eval.bench`):
Titans LMM and Yaad use their deep (MLP) memories (4 and 8 heads, chunk 8); OmegaNet uses 8
heads (head dim 16, degree-2 polynomial features D_phi = 153), window 8, chunk 8 and a linear
memory (the paper's "linear memory" ablation; its deep memory ran at ~790 tok/s here). ATLAS
(`atlas-*` variants: the same, plus momentum and Newton-Schulz) is accepted but not in PAIRS:
Newton-Schulz runs on every token's momentum, and at this width a batch-16 step took 2.4 s with
it against 0.55 s without (batched small matmuls reach ~6.5 GFLOP/s on this CPU); run it on an
accelerator with `python -m eval.table --models=atlas --all_pairs`.

`PAIRS` lists the cells the table trains: MQAR for every model but ATLAS, tinyshakespeare for
the state-space family and the baseline, passkey for the test-time-memory models, the baseline
and Mamba.
"""
from train import config as C

TEXT_PATH = "../shared/data/tinyshakespeare.txt"

MODELS = {
    "transformer": dict(n_heads=2, ffn="swiglu", max_len=512),
    "mamba": dict(d_state=16),
    "mamba2": dict(d_state=32, head_dim=32),
    "lssl": dict(d_state=64),
    "titans_lmm": dict(n_heads=4, chunk=8),
    "atlas": dict(n_heads=8, chunk=8, window=8, memory="linear"),
    "omeganet": dict(n_heads=8, chunk=8, window=8, memory="linear"),
    "yaad": dict(n_heads=8, chunk=8),
}
TASK_MODEL = {("mqar", "transformer"): dict(ffn="none")}
TASKS = ("mqar", "passkey", "text")
ACCEPTED = tuple(f"{t}-{m}" for t in TASKS for m in MODELS)
PAIRS = (tuple(f"mqar-{m}" for m in MODELS if m != "atlas")
         + tuple(f"text-{m}" for m in ("transformer", "mamba", "mamba2", "lssl"))
         + tuple(f"passkey-{m}" for m in ("transformer", "mamba", "titans_lmm", "omeganet", "yaad")))
# tests/test_configs.py eval_shapes every listed variant; the other models differ only in the
# model section, which the conformance suite covers, so one model per task is listed (CI time).
VARIANTS = tuple(f"{t}-transformer" for t in TASKS)


def get_config(arg=None):
    arg = arg or VARIANTS[0]
    if arg not in ACCEPTED:
        raise ValueError(f"unknown variant {arg!r} of configs/results.py (known: <task>-<model> with "
                         f"task in {', '.join(TASKS)} and model in {', '.join(MODELS)})")
    task, name = arg.split("-", 1)
    model = C.model_section(name, dim=128, n_layers=2, vocab_size=None,
                            **{**MODELS[name], **TASK_MODEL.get((task, name), {})})
    c = C.base_config(model)
    c.train.lr = 2e-3
    c.train.weight_decay = 0.0
    c.train.warmup_steps = 30
    c.train.steps = 800 if task == "mqar" else 500
    c.checkpoint.dir = f"runs/results/{arg}"
    c.checkpoint.every = c.train.steps
    c.eval.every = 200
    if task == "mqar":
        c.data.source = "mqar"
        c.data.seq_len = 64
        c.data.vocab_size = 128
        c.data.num_kv_pairs = 8
        c.train.batch_size = 64
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
