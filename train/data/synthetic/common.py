"""What every synthetic task shares: the per-example generators, the IGNORE label, the byte
vocabulary of the text tasks, the finishing of one example and `generate` (package docstring:
train/data/synthetic/__init__.py)."""
from __future__ import annotations

from typing import Callable

import numpy as np

IGNORE = -100
TRAIN_STREAM = 0
VAL_STREAM = 1

# Byte-level vocabulary for the text tasks: bytes 0..255, then BOS and EOS (EOS also right-pads).
BYTE_BOS = 256
BYTE_EOS = 257
BYTE_VOCAB = 258


def example_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The generator of example `index` of stream `stream` of a data set with seed `seed`."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(stream), int(index)]))


def _finish(inputs: np.ndarray, labels: np.ndarray, **meta) -> dict:
    inputs = np.asarray(inputs, np.int32)
    labels = np.asarray(labels, np.int32)
    scored = labels != IGNORE
    out = {"inputs": inputs, "labels": labels,
           "targets": np.where(scored, labels, 0).astype(np.int32),
           "loss_mask": scored.astype(np.float32)}
    out.update(meta)
    return out


ARRAY_KEYS = ("inputs", "labels", "targets", "loss_mask")


def generate(task: Callable[..., dict], *, seed: int, n: int, stream: int = VAL_STREAM,
             start: int = 0, **params) -> dict:
    """Examples `start .. start+n-1` of stream `stream` of `task(**params)` with seed `seed`,
    stacked: the ARRAY_KEYS as [n, T] arrays and every metadata key as a list of n values."""
    exs = [task(example_rng(seed, stream, start + i), **params) for i in range(n)]
    out = {}
    for k in exs[0]:
        vals = [e[k] for e in exs]
        out[k] = np.stack(vals) if k in ARRAY_KEYS else vals
    return out
