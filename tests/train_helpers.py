"""Shared helpers for the trainer tests: a tiny MQAR config and a subprocess runner."""
import os
import subprocess
import sys

from train import config as C

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_cfg(run_dir, **over):
    """A tiny attention model (dim 32, 1 layer, 2 heads) on the tiny budget
    (train.config.tiny_budget: MQAR, T=32, 4 pairs, V=64) cut to 6 steps: compiles and steps in
    well under a second."""
    cfg = C.tiny_budget(C.default_config(), steps=6, warmup_steps=1, eval_every=0,
                        eval_batch_size=32, eval_max_batches=1, checkpoint_every=3)
    cfg.model.dim = 32
    cfg.model.n_layers = 1
    cfg.model.n_heads = 2
    cfg.data.val_examples = 64
    cfg.train.log_every = 1
    cfg.train.mfu_probe = False
    cfg.train.compilation_cache_dir = ""
    cfg.checkpoint.dir = str(run_dir)
    for k, v in over.items():
        sec, key = k.split(".", 1)
        cfg[sec][key] = v
    return cfg


# tiny_cfg's model, data and batch settings as `python -m train` flags (the tests add the run
# length, logging and checkpointing they need)
_FLAG_KEYS = ("model.dim", "model.n_layers", "model.n_heads", "model.max_len", "data.seq_len",
              "data.vocab_size", "data.num_kv_pairs", "data.val_examples", "train.batch_size",
              "train.warmup_steps", "train.mfu_probe", "eval.batch_size", "eval.max_batches")
_TINY = tiny_cfg("")
TINY_FLAGS = [f"--config.{k}={_TINY[k.split('.')[0]][k.split('.')[1]]}" for k in _FLAG_KEYS]


def run_cli(args, timeout=240, env_extra=None, **kw):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)
