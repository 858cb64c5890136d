"""What every evaluation task shares (eval/tasks.py lists the tasks): the CLI options, a
run's data config, a named setting, the `Task` interface and its learned-position check."""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Sequence

import numpy as np

from eval import scoring
from eval.scoring import Model

SKIPPED = "skipped_over_max_len"


@dataclasses.dataclass
class Options:
    """Task settings (the CLI flags). None means: derive from the run's config."""
    n_examples: int = 64
    batch_size: int = 16
    seed: int | None = None              # None: the run's data.seed (held-out stream)
    lengths: Sequence[int] | None = None  # None: T_train x (1, 2, 4)
    mqar_kv: Sequence[int] | None = None  # None: the run's num_kv_pairs (or 8)
    copy_tokens: int | None = None       # None: the run's copy_num_tokens (or 16)
    passkey_depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0)
    passkey_format: str = "auto"         # auto | tokens | bytes
    passkey_new: int = 10                # tokens generated for the byte-level passkey
    niah_haystack: str | None = None     # local text for niah_single_2/3 (essay-substituted)
    ppl_batches: int = 8                 # 0: the whole held-out split
    decode_prompt: int | None = None     # None: T_train
    decode_new: int = 32


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    params: dict
    length: int | None = None            # positions needed (checked against max_len)


@dataclasses.dataclass
class Run:
    """What tasks need to know about a run: its data config (train.data section) and name."""
    data: Any                            # ConfigDict (or dict) of the data section
    name: str = ""

    def get(self, key):
        from train.data import data_defaults
        d = self.data
        if d is not None and key in d:
            return d[key]
        return data_defaults()[key]

    @property
    def source(self) -> str:
        return self.get("source")

    @property
    def seq_len(self) -> int:
        return int(self.get("seq_len"))


def setting_name(**kw) -> str:
    return ",".join(f"{k}={_fmt(v)}" for k, v in kw.items())


def _fmt(v):
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def parse_setting(name: str) -> dict[str, str]:
    return dict(p.split("=", 1) for p in name.split(",") if "=" in p) if name else {}


def _lengths(run: Run, opts: Options) -> list[int]:
    if opts.lengths:
        return [int(x) for x in opts.lengths]
    return [run.seq_len * k for k in (1, 2, 4)]


def _warn(msg: str) -> None:
    print(f"eval: {msg}", file=sys.stderr)


def _seed(run: Run, opts: Options) -> int:
    return int(run.get("seed") if opts.seed is None else opts.seed)


def _in_batches(n: int, bs: int, fn: Callable[[np.ndarray], Any]) -> list:
    return [fn(idx) for idx in scoring.batched(n, bs)]


# ----------------------------------------------------------------------------------- tasks

class Task:
    name: str = ""
    version: int = 1          # bumped when the scoring of a setting changes (results ledgers
                              # re-score cells scored by an older version: eval.protocol)

    def settings(self, run: Run, model: Model, opts: Options) -> list[Setting]:
        raise NotImplementedError

    def score(self, run: Run, model: Model, setting: Setting, opts: Options) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self, run: Run, model: Model, setting: Setting, opts: Options) -> dict[str, float]:
        """Score one setting, or report the learned-position limit instead."""
        if setting.length is not None and not model.fits(setting.length):
            return {SKIPPED: float(model.max_len)}
        return self.score(run, model, setting, opts)


BYTE_SOURCES = ("text", "needle")


def is_byte_level(run: Run) -> bool:
    return run.source in BYTE_SOURCES or (run.source == "passkey"
                                          and run.get("passkey_format") == "bytes")
