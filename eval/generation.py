"""The generation tasks (eval/tasks.py lists them): passkey, RULER's single needle and decode
speed, decoded greedily through the recurrent state / KV cache (`scoring.generate`)."""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from eval import scoring
from eval.scoring import Model
from eval.task_base import (
    Options,
    Run,
    Setting,
    Task,
    _lengths,
    _seed,
    _warn,
    is_byte_level,
    setting_name,
)


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
