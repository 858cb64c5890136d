"""Evaluation tasks: which settings each task sweeps and how each setting is scored.

A task turns the run's data config and the CLI options into a list of `Setting`s (named
"key=value,..." in the results) and scores one setting on a `scoring.Model`, returning
{metric: value}. Every metric goes through `eval.scoring`. Data come from the trainer's own
pipeline and generators (`train.data` for held-out batches, `train.data.synthetic` for the
tasks), held-out stream `VAL_STREAM`, so eval examples never overlap training examples.

Tasks (metrics):
  ppl              held-out split of the run's data source (any source the trainer reads):
                   loss (nats/token), ppl, bpb (byte-level sources only), tokens
  mqar             MQAR over --lengths x --mqar_kv: acc (mean per-example fraction of queries
                   right, teacher-forced argmax), exact (all queries right)
  selective_copying  over --lengths: acc, exact
  passkey          over --lengths x --passkey_depths, decoded greedily through the recurrent state
                   / KV cache (zoo.lm.generate): acc (exact match of the key); abstract-token
                   format (train.data.synthetic.passkey_tokens) or byte-level Landmark text (first
                   integer of the continuation == key), chosen like the run's data
  niah_single_1/2/3  RULER single needle (byte-level), over --lengths, decoded through the state:
                   acc (RULER string_match: the value occurs in the continuation)
  decode           greedy decoding speed after a prompt: tokens_per_s, decode_tokens_per_s

Lengths beyond a model's learned-position limit are not run: the setting gets one row with
metric "skipped_over_max_len" whose value is the model's max_len. "len" is the number of
positions the model must handle: the input length of teacher-forced tasks, prompt + generated - 1
tokens of generation tasks (the last generated token is never fed; zoo.lm.generate checks
prompt + new - 1 <= max_len).
"""
from __future__ import annotations

import numpy as np

from eval import scoring

# the generation tasks (eval/generation.py) and the shared pieces (eval/task_base.py) live in
# their own modules; SKIPPED, parse_setting, decode_bytes and first_integer are re-exported (eval.cli,
# eval.plots and the tests read them from here)
from eval.generation import Decode, Needle, Passkey, decode_bytes, first_integer  # noqa: F401
from eval.scoring import Model
from eval.task_base import (  # noqa: F401
    SKIPPED,
    Options,
    Run,
    Setting,
    Task,
    _in_batches,
    _lengths,
    _seed,
    _warn,
    is_byte_level,
    parse_setting,
    setting_name,
)

# ----------------------------------------------------------------------------------- tasks

def _teacher_forced(model: Model, data: dict, opts: Options) -> dict[str, float]:
    inputs, labels = data["inputs"], data["labels"]
    n = inputs.shape[0]
    preds = np.concatenate(_in_batches(
        n, opts.batch_size,
        lambda idx: scoring.predictions(model, scoring.pad_rows(inputs[idx], opts.batch_size))[:len(idx)]))
    acc, exact, _ = scoring.labelled_accuracy(preds, labels)
    return {"acc": acc, "exact": exact}


class Perplexity(Task):
    name = "ppl"

    def settings(self, run, model, opts):
        return [Setting(setting_name(split="val"), {}, None)]

    def score(self, run, model, setting, opts):
        return perplexity_of(model, run, opts)



def nll_totals(model: Model, batches, max_batches: int = 0, count_bytes: bool = False):
    """(total nats, scored tokens, scored byte tokens (< 256)) over batches of the trainer's
    format ({"inputs", "targets", "loss_mask"[, "segment_ids"]})."""
    total, n_tok, n_bytes = 0.0, 0.0, 0.0
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        w = np.asarray(batch["loss_mask"], np.float64)
        nll = scoring.token_nll(model, batch["inputs"], batch["targets"], batch.get("segment_ids"))
        total += float((nll * w).sum())
        n_tok += float(w.sum())
        if count_bytes:
            n_bytes += float((w * (np.asarray(batch["targets"]) < 256)).sum())
    return total, n_tok, n_bytes


def perplexity_of(model: Model, run: Run, opts: Options) -> dict[str, float]:
    from train import data as data_lib
    it = data_lib.make_iterator(run.data, split="val", global_batch=opts.batch_size,
                                seed=int(run.get("seed")))
    byte = is_byte_level(run)
    total, n_tok, n_bytes = nll_totals(model, it, opts.ppl_batches, count_bytes=byte)
    if n_tok == 0:
        raise ValueError("the held-out split has no scored token")
    out = {"loss": total / n_tok, "ppl": scoring.perplexity(total, n_tok), "tokens": n_tok}
    if byte and n_bytes:
        out["bpb"] = scoring.bits_per_byte(total, n_bytes)
    return out


class MQAR(Task):
    name = "mqar"

    def _params(self, run, model):
        mine = run.source == "mqar"
        return dict(vocab_size=int(run.get("vocab_size")) if mine else model.vocab_size,
                    power_a=float(run.get("mqar_power_a")) if mine else 0.01,
                    random_non_queries=bool(run.get("mqar_noise")) if mine else False,
                    num_passes=int(run.get("mqar_num_passes")) if mine else 1)

    def settings(self, run, model, opts):
        from train.data import synthetic
        kvs = opts.mqar_kv or [int(run.get("num_kv_pairs"))]
        p = self._params(run, model)
        out = []
        for T in _lengths(run, opts):
            for D in kvs:
                err = synthetic.mqar_check(seq_len=T, num_kv_pairs=int(D), vocab_size=p["vocab_size"],
                                           num_passes=p["num_passes"], power_a=p["power_a"])
                if err:
                    _warn(f"mqar len={T} kv={D} not run: {err}")
                    continue
                out.append(Setting(setting_name(len=T, kv=int(D)), dict(seq_len=T, num_kv_pairs=int(D)), T))
        return out

    def score(self, run, model, setting, opts):
        from train.data import synthetic
        data = synthetic.generate(synthetic.mqar, seed=_seed(run, opts), n=opts.n_examples,
                                  **setting.params, **self._params(run, model))
        return _teacher_forced(model, data, opts)


class SelectiveCopying(Task):
    name = "selective_copying"

    def _params(self, run, model, opts):
        mine = run.source == "selective_copying"
        M = opts.copy_tokens or (int(run.get("copy_num_tokens")) if mine else 16)
        return dict(vocab_size=int(run.get("vocab_size")) if mine else model.vocab_size,
                    num_tokens_to_copy=M,
                    variable=bool(run.get("copy_variable")) if mine else True)

    def settings(self, run, model, opts):
        from train.data import synthetic
        p = self._params(run, model, opts)
        out = []
        for T in _lengths(run, opts):
            err = synthetic.selective_copying_check(seq_len=T, num_tokens_to_copy=p["num_tokens_to_copy"],
                                                    vocab_size=p["vocab_size"])
            if err:
                _warn(f"selective_copying len={T} not run: {err}")
                continue
            out.append(Setting(setting_name(len=T), dict(seq_len=T), T))
        return out

    def score(self, run, model, setting, opts):
        from train.data import synthetic
        data = synthetic.generate(synthetic.selective_copying, seed=_seed(run, opts),
                                  n=opts.n_examples, **setting.params, **self._params(run, model, opts))
        return _teacher_forced(model, data, opts)


TASKS: dict[str, Task] = {t.name: t for t in (
    Perplexity(), MQAR(), SelectiveCopying(), Passkey(),
    Needle("niah_single_1"), Needle("niah_single_2"), Needle("niah_single_3"), Decode())}
ALIASES = {"selcopy": "selective_copying", "copy": "selective_copying", "niah": "niah_single_1"}


def get_task(name: str) -> Task:
    name = ALIASES.get(name, name)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]
