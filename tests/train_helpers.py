"""Shared helpers for the trainer tests: a tiny MQAR config and a subprocess runner."""
import os
import subprocess
import sys

from train import config as C

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_cfg(run_dir, **over):
    """A tiny attention model on MQAR (T=32, 4 pairs, V=64): compiles and steps in well under
    a second."""
    cfg = C.default_config()
    cfg.model.dim = 32
    cfg.model.n_layers = 1
    cfg.model.n_heads = 2
    cfg.model.max_len = 32
    cfg.data.seq_len = 32
    cfg.data.vocab_size = 64
    cfg.data.num_kv_pairs = 4
    cfg.data.val_examples = 64
    cfg.train.steps = 6
    cfg.train.batch_size = 16
    cfg.train.warmup_steps = 1
    cfg.train.log_every = 1
    cfg.train.mfu_probe = False
    cfg.train.compilation_cache_dir = ""
    cfg.eval.every = 0
    cfg.eval.batch_size = 32
    cfg.eval.max_batches = 1
    cfg.checkpoint.dir = str(run_dir)
    cfg.checkpoint.every = 3
    for k, v in over.items():
        sec, key = k.split(".", 1)
        cfg[sec][key] = v
    return cfg


TINY_FLAGS = [
    "--config.model.dim=32", "--config.model.n_layers=1", "--config.model.n_heads=2",
    "--config.model.max_len=32", "--config.data.seq_len=32", "--config.data.vocab_size=64",
    "--config.data.num_kv_pairs=4", "--config.data.val_examples=64",
    "--config.train.batch_size=16", "--config.train.warmup_steps=1",
    "--config.train.mfu_probe=False", "--config.eval.batch_size=32",
    "--config.eval.max_batches=1",
]


def run_cli(args, timeout=240, env_extra=None, **kw):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)
