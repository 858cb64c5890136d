"""The `data` config section: its defaults, the vocabulary it implies, and its validation.

  data_defaults() -> ConfigDict      the section with its defaults
  get(data_cfg, key)                 a value, or its default when a mapping lacks the key
  vocab_size(data_cfg) -> int        the vocabulary the model must have
  validate(data_cfg) -> None         ValueError with one line naming the bad key/file
"""
from __future__ import annotations

import os
import re

import numpy as np
from ml_collections import ConfigDict

from train.data import synthetic
from train.data.sources import (
    TOKEN_EXTENSIONS,
    open_tokens,
    read_text,
    split_sizes,
    token_file_kind,
)

SYNTHETIC_SOURCES = ("mqar", "selective_copying", "passkey", "needle")
FILE_SOURCES = ("text", "tokens")
SOURCES = SYNTHETIC_SOURCES + FILE_SOURCES
PASSKEY_FORMATS = ("tokens", "bytes")


def data_defaults() -> ConfigDict:
    """The `data` section. Synthetic parameters are read only by their task."""
    c = ConfigDict()
    c.source = "mqar"          # mqar | selective_copying | passkey | needle | text | tokens
    c.seq_len = 64             # T: model input length of every row
    c.vocab_size = 8192        # synthetic mqar / selective_copying vocabulary; token arrays' vocab
    c.seed = 0                 # the data seed (what the trainer passes to make_iterator)
    c.val_examples = 1024      # size of the synthetic held-out set
    # MQAR (specs/tasks.md §1): V > T, 2*D*passes + 2*D <= T
    c.num_kv_pairs = 8
    c.mqar_power_a = 0.01
    c.mqar_noise = False       # random_non_queries
    c.mqar_num_passes = 1
    # selective copying (§2): vocab_size = A (0 blank, A-1 marker), L_noise = seq_len - 2*M
    c.copy_num_tokens = 16     # M
    c.copy_variable = True
    # passkey (§3): "tokens" = abstract tokens (§3.3), "bytes" = Landmark text, byte-level
    c.passkey_format = "tokens"
    c.passkey_digits = 5
    c.passkey_filler_tokens = 16
    c.passkey_filler = "pattern"   # tokens: "pattern" (§3.3's repeating filler) | "random"
    c.passkey_distinct = False     # tokens: keys of distinct digits
    c.passkey_depth = -1.0     # in [0, 1]; < 0: uniform per example
    # needle (RULER S-NIAH, §4), byte-level
    c.needle_variant = "niah_single_1"   # niah_single_1 | niah_single_2 | niah_single_3
    c.needle_haystack_path = ""          # local text for the essay variants (2, 3)
    c.needle_depth = -1.0
    # files: text = bytes of a file (vocab 256); tokens = .npy, raw .bin (dtype), .array_record
    c.path = ""
    c.dtype = "uint16"         # raw .bin token dtype (also ArrayRecord records' dtype)
    c.val_fraction = 0.1       # held-out split: the last fraction of the tokens
    c.pack = False             # segment_ids from document boundaries, loss not across them
    c.eos_id = -1              # document separator token (ends each document); -1: none
    # loading
    c.num_workers = 0          # 0: in-process; > 0: grain worker processes (mp_prefetch)
    c.worker_buffer_size = 2   # batches buffered per worker
    c.num_threads = 2          # in-process reader threads
    c.prefetch = 4             # in-process buffered batches
    return c


def get(cfg, key):
    """`cfg[key]`, or its default when a mapping lacks it."""
    return cfg.get(key, data_defaults()[key]) if hasattr(cfg, "get") else getattr(cfg, key)


def vocab_size(data_cfg) -> int:
    """256 for bytes (258 for byte-level passkey/needle rows: + BOS, EOS); the task's vocabulary
    for synthetic tasks; `data.vocab_size` for token arrays."""
    src = get(data_cfg, "source")
    if src == "text":
        return 256
    if src == "passkey":
        if get(data_cfg, "passkey_format") == "bytes":
            return synthetic.BYTE_VOCAB
        return synthetic.passkey_token_vocab(int(get(data_cfg, "passkey_filler_tokens")))["vocab_size"]
    if src == "needle":
        return synthetic.BYTE_VOCAB
    return int(get(data_cfg, "vocab_size"))


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------

def _bad(msg: str):
    raise ValueError(msg)


def _prefixed(err: str | None):
    """Raise a synthetic.*_check message as one naming data.<key> (its names are config keys)."""
    if err is None:
        return
    err = re.sub(r"\b([a-z_]+)=", r"data.\1=", err)
    _bad(err)


def validate(data_cfg) -> None:
    """Check the data section before anything compiles; ValueError naming the bad key/file."""
    defaults = data_defaults()
    keys = data_cfg.keys() if hasattr(data_cfg, "keys") else []
    for k in keys:
        if k not in defaults:
            _bad(f"data.{k}: unknown key")
    g = lambda k: get(data_cfg, k)  # noqa: E731
    src = g("source")
    if src not in SOURCES:
        _bad(f"data.source: unknown source {src!r}; expected one of {', '.join(SOURCES)}")
    T = g("seq_len")
    if not isinstance(T, (int, np.integer)) or T < 1:
        _bad(f"data.seq_len={T} must be a positive integer")
    if g("num_workers") < 0:
        _bad(f"data.num_workers={g('num_workers')} must be >= 0")
    if g("worker_buffer_size") < 1:
        _bad(f"data.worker_buffer_size={g('worker_buffer_size')} must be >= 1")
    if g("num_threads") < 0 or g("prefetch") < 0:
        _bad("data.num_threads and data.prefetch must be >= 0")
    if src in SYNTHETIC_SOURCES:
        if g("pack"):
            _bad(f"data.pack: packing applies to text/tokens sources, not {src!r}")
        if g("val_examples") < 1:
            _bad(f"data.val_examples={g('val_examples')} must be >= 1")
    if src == "mqar":
        _prefixed(synthetic.mqar_check(seq_len=T, num_kv_pairs=g("num_kv_pairs"),
                                       vocab_size=g("vocab_size"), num_passes=g("mqar_num_passes"),
                                       power_a=g("mqar_power_a")))
    elif src == "selective_copying":
        _prefixed(synthetic.selective_copying_check(
            seq_len=T, num_tokens_to_copy=g("copy_num_tokens"), vocab_size=g("vocab_size")))
    elif src == "passkey":
        fmt = g("passkey_format")
        if fmt not in PASSKEY_FORMATS:
            _bad(f"data.passkey_format: unknown format {fmt!r}; expected tokens or bytes")
        _check_depth("passkey_depth", g("passkey_depth"))
        if fmt == "tokens":
            _prefixed(synthetic.passkey_tokens_check(
                seq_len=T, num_digits=g("passkey_digits"),
                num_filler_tokens=g("passkey_filler_tokens"), filler=g("passkey_filler"),
                distinct=bool(g("passkey_distinct"))))
        else:
            try:
                synthetic.passkey_sequence(np.random.default_rng(0), seq_len=T)
            except ValueError:
                _bad(f"data.seq_len={T} is too short for the byte-level passkey prompt")
    elif src == "needle":
        var = g("needle_variant")
        if var not in synthetic.NIAH_VARIANTS:
            _bad(f"data.needle_variant: unknown variant {var!r}; expected one of "
                 f"{', '.join(synthetic.NIAH_VARIANTS)}")
        _check_depth("needle_depth", g("needle_depth"))
        hay = None
        if var != "niah_single_1":
            p = g("needle_haystack_path")
            if not p:
                _bad(f"data.needle_haystack_path: needed by needle variant {var} (essay haystack)")
            if not os.path.isfile(p):
                _bad(f"data.needle_haystack_path: file not found: {p}")
            hay = read_text(p)
            if not hay.split():
                _bad(f"data.needle_haystack_path: no words in {p}")
        try:
            synthetic.needle_sequence(np.random.default_rng(0), seq_len=T, variant=var,
                                      haystack_text=hay)
        except ValueError:
            _bad(f"data.seq_len={T} is too short for the {var} prompt")
    elif src in FILE_SOURCES:
        _validate_file(data_cfg)


SCAN_TOKENS = 1 << 28       # token files up to this size are range-checked whole


def first_out_of_range(stream, vocab: int, chunk: int = 1 << 22):
    """(offset, id) of the first token of `stream` outside [0, vocab), or None. Streams of up to
    SCAN_TOKENS tokens are read whole (chunk by chunk); longer ones in 64 evenly spaced windows of
    one chunk each (a start-up check; the reader checks every row it reads as well)."""
    n = len(stream)
    if n <= SCAN_TOKENS:
        starts = range(0, n, chunk)
    else:
        starts = np.linspace(0, n - chunk, 64).astype(np.int64)
    for lo in starts:
        toks, _ = stream.read(int(lo), int(min(lo + chunk, n)))
        bad = np.flatnonzero((toks < 0) | (toks >= vocab))
        if bad.size:
            return int(lo + bad[0]), int(toks[bad[0]])
    return None


def _check_depth(key, d):
    if d >= 0 and not d <= 1:
        _bad(f"data.{key}={d} must be in [0, 1] (or < 0 for a random depth)")


def _validate_file(cfg) -> None:
    g = lambda k: get(cfg, k)  # noqa: E731
    src, path, T = g("source"), g("path"), g("seq_len")
    if not path:
        _bad(f"data.path: required for source {src!r}")
    if not os.path.isfile(path):
        _bad(f"data.path: file not found: {path}")
    vf = g("val_fraction")
    if not 0 <= vf < 1:
        _bad(f"data.val_fraction={vf} must be in [0, 1)")
    if src == "tokens":
        if token_file_kind(path) is None:
            _bad(f"data.path: unknown token file type {path} (expected {', '.join(TOKEN_EXTENSIONS)})")
        if g("vocab_size") < 1:
            _bad(f"data.vocab_size={g('vocab_size')} must be >= 1")
        if token_file_kind(path) in ("bin", "array_record"):
            try:
                dt = np.dtype(g("dtype"))
            except TypeError:
                _bad(f"data.dtype: not a numpy dtype: {g('dtype')!r}")
            if dt.kind not in "iu":
                _bad(f"data.dtype={g('dtype')} must be an integer dtype")
    voc = vocab_size(cfg)
    eos = g("eos_id")
    if eos >= voc:
        _bad(f"data.eos_id={eos} is outside the vocabulary of {voc} tokens")
    try:
        stream = open_tokens(cfg)
    except (OSError, ValueError) as e:
        _bad(f"data.path: cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    if src == "tokens":
        bad = first_out_of_range(stream, voc)
        if bad is not None:
            _bad(f"data.path: {path} has token id {bad[1]} at offset {bad[0]}, outside the "
                 f"vocabulary of {voc} tokens (data.vocab_size)")
    if g("pack") and eos < 0 and stream.kind != "array_record":
        _bad(f"data.eos_id: packing {path} needs a document separator (data.eos_id >= 0)")
    n_train, n_val = split_sizes(len(stream), vf)
    if (n_train - 1) // T < 1:
        _bad(f"data.path: {path} has {len(stream)} tokens, too few for a training row of "
             f"data.seq_len={T} with data.val_fraction={vf}")
    if vf > 0 and (n_val - 1) // T < 1:
        _bad(f"data.val_fraction={vf}: the held-out tail of {n_val} tokens of {path} is shorter "
             f"than one row of data.seq_len={T}")
