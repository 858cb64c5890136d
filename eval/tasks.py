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

import dataclasses
import re
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


BYTE_SOURCES = ("text", "needle")


def is_byte_level(run: Run) -> bool:
    return run.source in BYTE_SOURCES or (run.source == "passkey"
                                          and run.get("passkey_format") == "bytes")


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


def _generate_all(model: Model, prompts: list[np.ndarray], n_new: int, opts: Options) -> np.ndarray:
    """Greedy continuations of n_new tokens for every prompt, in fixed-shape batches."""
    P_ = max(len(p) for p in prompts)
    outs = []
    for idx in scoring.batched(len(prompts), opts.batch_size):
        chunk = [prompts[i] for i in idx]
        chunk += [chunk[0]] * (opts.batch_size - len(chunk))
        tok, mask = scoring.pad_prompts(chunk, P_)
        outs.append(scoring.generate(model, tok, mask, n_new)[:len(idx)])
    return np.concatenate(outs)


def first_integer(text: str) -> str | None:
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def decode_bytes(tokens: Sequence[int]) -> str:
    """Byte tokens (ids < 256) as text; other ids (BOS/EOS/…) end the text."""
    out = bytearray()
    for t in tokens:
        if not 0 <= int(t) < 256:
            break
        out.append(int(t))
    return out.decode("utf-8", errors="replace")


def byte_prompt(ids, model: Model) -> np.ndarray:
    """[BOS] + bytes for models with the byte-level task vocabulary (256 bytes + BOS + EOS, as the
    passkey/needle training rows); the bare bytes for plain byte LMs (vocabulary 256, `text`)."""
    from train.data import synthetic
    ids = np.asarray(ids, np.int32)
    if model.vocab_size >= synthetic.BYTE_VOCAB:
        ids = np.concatenate([[synthetic.BYTE_BOS], ids])
    return ids.astype(np.int32)


def _passkey_kw(run: Run) -> dict:
    """The token passkey's arguments as the run trained on them (digits, filler, keys)."""
    return dict(num_digits=int(run.get("passkey_digits")),
                num_filler_tokens=int(run.get("passkey_filler_tokens")),
                filler=str(run.get("passkey_filler")), distinct=bool(run.get("passkey_distinct")))


class Passkey(Task):
    name = "passkey"
    # 2: a token-format example of length L is the training rows' format at seq_len L (L input
    # positions; version 1 built seq_len L - 1, one filler token short of the training rows)
    version = 2

    def format(self, run, model, opts) -> str:
        if opts.passkey_format != "auto":
            return opts.passkey_format
        if run.source == "passkey":
            return run.get("passkey_format")
        if is_byte_level(run) or model.vocab_size >= 256:
            return "bytes"
        return "tokens"

    def settings(self, run, model, opts):
        from train.data import synthetic
        fmt = self.format(run, model, opts)
        if fmt == "tokens":
            F = int(run.get("passkey_filler_tokens"))
            need = synthetic.passkey_token_vocab(F)["vocab_size"]
        else:
            need = 256
        if model.vocab_size < need:
            _warn(f"passkey ({fmt}) not run: needs a vocabulary of {need}, model has {model.vocab_size}")
            return []
        out = []
        for L in _lengths(run, opts):
            err = self.check(run, fmt, L, opts)
            if err:
                _warn(f"passkey len={L} not run: {err}")
                continue
            for d in opts.passkey_depths:
                out.append(Setting(setting_name(len=L, depth=float(d)),
                                   dict(length=L, depth=float(d), format=fmt), L))
        return out

    def check(self, run, fmt, L, opts) -> str | None:
        """Why length L cannot hold a passkey example (None: it can)."""
        from train.data import synthetic
        if fmt == "tokens":
            return synthetic.passkey_tokens_check(seq_len=L, **_passkey_kw(run))
        try:
            synthetic.passkey_text(np.random.default_rng(0), length=L - 1 - opts.passkey_new,
                                   depth=0.5)
        except ValueError as e:
            return str(e)
        return None

    def score(self, run, model, setting, opts):
        from train.data import synthetic
        p = setting.params
        seed = _seed(run, opts)
        if p["format"] == "tokens":
            # the training rows' format at seq_len L: a prompt of L - n + 1 tokens and n
            # generated, the last never fed: L positions (zoo.lm.generate)
            data = synthetic.generate(
                synthetic.passkey_tokens, seed=seed, n=opts.n_examples, seq_len=p["length"],
                depth=p["depth"], **_passkey_kw(run))
            start, n = scoring.answer_spans(data["labels"])
            prompts = [data["inputs"][i, :start[i] + 1] for i in range(len(start))]
            gen = _generate_all(model, prompts, int(n.max()), opts)
            ref = np.stack([data["labels"][i, start[i]:start[i] + n[i]] for i in range(len(start))])
            digit = (gen == ref).mean()
            return {"acc": float((gen == ref).all(axis=1).mean()), "digit_acc": float(digit)}
        # byte-level Landmark text: [BOS] prompt, then the first integer of the continuation
        n_new = opts.passkey_new
        budget = p["length"] - 1 - n_new
        data = synthetic.generate(synthetic.passkey_text, seed=seed, n=opts.n_examples,
                                  length=budget, depth=p["depth"])
        prompts = [byte_prompt(ids, model) for ids in data["prompt_ids"]]
        gen = _generate_all(model, prompts, n_new, opts)
        hits = [first_integer(decode_bytes(g)) == ans for g, ans in zip(gen, data["answer"])]
        return {"acc": float(np.mean(hits))}


class Needle(Task):
    """RULER single needle (niah_single_1: noise haystack; 2/3: essay haystack from a local text,
    "essay-substituted"), byte-level, decoded through the state."""

    def __init__(self, variant: str):
        self.name = variant

    def haystack(self, run, opts) -> str | None:
        if self.name == "niah_single_1":
            return None
        path = opts.niah_haystack
        if not path and run.source == "needle":
            path = run.get("needle_haystack_path")
        if not path and run.source == "text":
            path = run.get("path")
        return path or None

    def n_new(self) -> int:
        return 40 if self.name == "niah_single_3" else 10

    def settings(self, run, model, opts):
        from train.data import synthetic
        if model.vocab_size < 256:
            _warn(f"{self.name} not run: needs a byte-level vocabulary (256 bytes), "
                  f"model has {model.vocab_size}")
            return []
        if self.name != "niah_single_1" and not self.haystack(run, opts):
            _warn(f"{self.name} not run: needs a haystack text (--niah_haystack=FILE)")
            return []
        out = []
        for L in _lengths(run, opts):
            try:   # the prompt without haystack must fit (a question of the format, not the model)
                synthetic.needle_text(np.random.default_rng(0), variant=self.name, length=L - 1,
                                      answer_room=self.n_new(), haystack_text="Filler text.")
            except ValueError as e:
                _warn(f"{self.name} len={L} not run: {e}")
                continue
            out.append(Setting(setting_name(len=L), dict(length=L), L))
        return out

    def score(self, run, model, setting, opts):
        from train.data import synthetic
        kw = {}
        path = self.haystack(run, opts)
        if path:
            with open(path, "rb") as f:
                kw["haystack_text"] = f.read().decode("utf-8", errors="replace")
        n_new = self.n_new()
        data = synthetic.generate(synthetic.needle_text, seed=_seed(run, opts), n=opts.n_examples,
                                  variant=self.name, length=setting.params["length"] - 1,
                                  answer_room=n_new, **kw)
        prompts = [byte_prompt(ids, model) for ids in data["prompt_ids"]]
        gen = _generate_all(model, prompts, n_new, opts)
        hits = [ans.lower() in decode_bytes(g).lower() for g, ans in zip(gen, data["answer"])]
        return {"acc": float(np.mean(hits))}


class Decode(Task):
    name = "decode"

    def settings(self, run, model, opts):
        P_ = opts.decode_prompt or run.seq_len
        return [Setting(setting_name(prompt=P_, new=opts.decode_new, batch=opts.batch_size),
                        dict(prompt=P_, new=opts.decode_new), P_ + opts.decode_new)]

    def score(self, run, model, setting, opts):
        rng = np.random.default_rng(0)
        prompt = rng.integers(0, model.vocab_size, (opts.batch_size, setting.params["prompt"]),
                              dtype=np.int32)
        return scoring.decode_throughput(model, prompt, setting.params["new"])


TASKS: dict[str, Task] = {t.name: t for t in (
    Perplexity(), MQAR(), SelectiveCopying(), Passkey(),
    Needle("niah_single_1"), Needle("niah_single_2"), Needle("niah_single_3"), Decode())}
ALIASES = {"selcopy": "selective_copying", "copy": "selective_copying", "niah": "niah_single_1"}


def get_task(name: str) -> Task:
    name = ALIASES.get(name, name)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]
