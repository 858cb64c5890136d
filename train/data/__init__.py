"""The trainer's data pipeline (grain Dataset API).

Public API:
  data_defaults() -> ConfigDict             the `data` config section with its defaults
  vocab_size(data_cfg) -> int               the vocabulary the model must have
  validate(data_cfg) -> None                ValueError with one line naming the bad key/file
  make_iterator(data_cfg, *, split, global_batch, seed, process_index=0, process_count=1)
      -> grain DatasetIterator of dicts of numpy arrays (this process's rows of each batch)
  device_prefetch(iterator, sharding, size=2) -> DevicePrefetch (global jax Arrays; checkpointable)

Batches: "inputs" int32 [b, T], "targets" int32 [b, T] (the next tokens / the task labels),
"loss_mask" float32 [b, T] (1 where scored: every position for text/tokens, the answer positions
for synthetic tasks) and, when `data.pack` is on, "segment_ids" int32 [b, T] (1, 2, ... per
document in the row; 0 marks the padding rows of a final held-out batch). Here
b = global_batch // process_count and process p gets rows p*b:(p+1)*b of the global batch, so
a run over any number of processes sees the batches of a one-process run.

Splits: "train" repeats forever, deterministic from `seed` (synthetic: fresh examples of stream
TRAIN_STREAM; files: windows shuffled anew every epoch). "val" is finite and deterministic
(synthetic: `data.val_examples` examples of the disjoint stream VAL_STREAM; files: the held-out
tail, the last `data.val_fraction` of the tokens); its last batch is completed with rows whose
loss_mask is 0.

Iterator state (`get_state`/`set_state`, `grain.checkpoint.CheckpointSave/CheckpointRestore`)
is `{"next_index": k}` when `num_workers == 0`: the number of batches consumed, the same on every
process, so a state saved by N processes also restores on M processes.
"""
from __future__ import annotations

import collections
import copy
import os
import re
from typing import Iterator, Mapping

import grain
import numpy as np
from ml_collections import ConfigDict

from train import synthetic
from train.data.files import TOKEN_EXTENSIONS, open_tokens, token_file_kind

SYNTHETIC_SOURCES = ("mqar", "selective_copying", "passkey", "needle")
FILE_SOURCES = ("text", "tokens")
SOURCES = SYNTHETIC_SOURCES + FILE_SOURCES
PASSKEY_FORMATS = ("tokens", "bytes")
_TRAIN_LEN = 2 ** 62  # "infinite" synthetic stream


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


def _get(cfg, key):
    return cfg.get(key, data_defaults()[key]) if hasattr(cfg, "get") else getattr(cfg, key)


def vocab_size(data_cfg) -> int:
    """256 for bytes (258 for byte-level passkey/needle rows: + BOS, EOS); the task's vocabulary
    for synthetic tasks; `data.vocab_size` for token arrays."""
    src = _get(data_cfg, "source")
    if src == "text":
        return 256
    if src == "passkey":
        if _get(data_cfg, "passkey_format") == "bytes":
            return synthetic.BYTE_VOCAB
        return synthetic.passkey_token_vocab(int(_get(data_cfg, "passkey_filler_tokens")))["vocab_size"]
    if src == "needle":
        return synthetic.BYTE_VOCAB
    return int(_get(data_cfg, "vocab_size"))


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
    g = lambda k: _get(data_cfg, k)  # noqa: E731
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
                num_filler_tokens=g("passkey_filler_tokens")))
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
            hay = _read_text(p)
            if not hay.split():
                _bad(f"data.needle_haystack_path: no words in {p}")
        try:
            synthetic.needle_sequence(np.random.default_rng(0), seq_len=T, variant=var,
                                      haystack_text=hay)
        except ValueError:
            _bad(f"data.seq_len={T} is too short for the {var} prompt")
    elif src in FILE_SOURCES:
        _validate_file(data_cfg)


def _check_depth(key, d):
    if d >= 0 and not d <= 1:
        _bad(f"data.{key}={d} must be in [0, 1] (or < 0 for a random depth)")


def _validate_file(cfg) -> None:
    g = lambda k: _get(cfg, k)  # noqa: E731
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
    if g("pack") and eos < 0 and stream.kind != "array_record":
        _bad(f"data.eos_id: packing {path} needs a document separator (data.eos_id >= 0)")
    n_train, n_val = _split_sizes(len(stream), vf)
    if (n_train - 1) // T < 1:
        _bad(f"data.path: {path} has {len(stream)} tokens, too few for a training row of "
             f"data.seq_len={T} with data.val_fraction={vf}")
    if vf > 0 and (n_val - 1) // T < 1:
        _bad(f"data.val_fraction={vf}: the held-out tail of {n_val} tokens of {path} is shorter "
             f"than one row of data.seq_len={T}")


def _split_sizes(n: int, val_fraction: float) -> tuple[int, int]:
    n_val = int(n * val_fraction)
    return n - n_val, n_val


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


# ------------------------------------------------------------------------------------------------
# row makers (picklable: they travel to worker processes)
# ------------------------------------------------------------------------------------------------

class SyntheticRows:
    """Example `i` of a synthetic task as a row dict; index >= `valid` gives a padding row."""

    def __init__(self, cfg, seed: int, stream: int, valid: int | None = None):
        g = lambda k: _get(cfg, k)  # noqa: E731
        self.src, self.T, self.seed, self.stream, self.valid = g("source"), g("seq_len"), seed, stream, valid
        self.haystack_path = g("needle_haystack_path")
        self.haystack = None
        if self.src == "mqar":
            self.fn, self.kw = synthetic.mqar, dict(
                seq_len=self.T, num_kv_pairs=g("num_kv_pairs"), vocab_size=g("vocab_size"),
                power_a=g("mqar_power_a"), random_non_queries=g("mqar_noise"),
                num_passes=g("mqar_num_passes"))
        elif self.src == "selective_copying":
            self.fn, self.kw = synthetic.selective_copying, dict(
                seq_len=self.T, num_tokens_to_copy=g("copy_num_tokens"),
                vocab_size=g("vocab_size"), variable=g("copy_variable"))
        elif self.src == "passkey":
            depth = g("passkey_depth")
            depth = None if depth < 0 else float(depth)
            if g("passkey_format") == "tokens":
                self.fn, self.kw = synthetic.passkey_tokens, dict(
                    seq_len=self.T, depth=depth, num_digits=g("passkey_digits"),
                    num_filler_tokens=g("passkey_filler_tokens"))
            else:
                self.fn, self.kw = synthetic.passkey_sequence, dict(seq_len=self.T, depth=depth)
        elif self.src == "needle":
            depth = g("needle_depth")
            self.fn, self.kw = synthetic.needle_sequence, dict(
                seq_len=self.T, variant=g("needle_variant"),
                depth=None if depth < 0 else float(depth))
            if g("needle_variant") != "niah_single_1":
                self.kw["haystack_text"] = None  # read lazily (not pickled)
        else:
            raise ValueError(f"data.source: {self.src!r} is not a synthetic task")

    def __getstate__(self):
        d = dict(self.__dict__)
        d["haystack"] = None
        return d

    def __call__(self, i) -> dict:
        i = int(i)
        if self.valid is not None and i >= self.valid:
            z = np.zeros(self.T, np.int32)
            return {"inputs": z, "targets": z, "loss_mask": np.zeros(self.T, np.float32)}
        kw = self.kw
        if "haystack_text" in kw:
            if self.haystack is None:
                self.haystack = _read_text(self.haystack_path)
            kw = dict(kw, haystack_text=self.haystack)
        ex = self.fn(synthetic.example_rng(self.seed, self.stream, i), **kw)
        return {"inputs": ex["inputs"], "targets": ex["targets"], "loss_mask": ex["loss_mask"]}


class WindowRows:
    """Window `i` (tokens [start + i*T, start + i*T + T + 1)) of a token stream as a row dict;
    index >= `valid` gives a padding row."""

    def __init__(self, cfg, stream, start: int, valid: int):
        self.T, self.start, self.valid = int(_get(cfg, "seq_len")), start, valid
        self.pack, self.eos = bool(_get(cfg, "pack")), int(_get(cfg, "eos_id"))
        self.vocab = vocab_size(cfg)
        self.stream = stream  # pickles without its open file

    def __call__(self, i) -> dict:
        i, T = int(i), self.T
        if i >= self.valid:
            z = np.zeros(T, np.int32)
            row = {"inputs": z, "targets": z, "loss_mask": np.zeros(T, np.float32)}
            if self.pack:
                row["segment_ids"] = z
            return row
        lo = self.start + i * T
        w, rec_start = self.stream.read(lo, lo + T + 1)
        if w.size and (w.min() < 0 or w.max() >= self.vocab):
            raise ValueError(f"data.path: token {int(w.max() if w.max() >= self.vocab else w.min())} "
                             f"near offset {lo} is outside data.vocab_size={self.vocab}")
        row = {"inputs": w[:-1].astype(np.int32), "targets": w[1:].astype(np.int32)}
        if self.pack:
            # starts[t]: token t begins a new document (after an EOS token or at a record start)
            starts = rec_start.copy()
            if self.eos >= 0:
                starts[1:] |= w[:-1] == self.eos
            starts[0] = False
            row["segment_ids"] = (1 + np.cumsum(starts[:-1])).astype(np.int32)
            row["loss_mask"] = (~starts[1:]).astype(np.float32)
        else:
            row["loss_mask"] = np.ones(T, np.float32)
        return row


# ------------------------------------------------------------------------------------------------
# iterators
# ------------------------------------------------------------------------------------------------

def _rows_dataset(cfg, split: str, global_batch: int, seed: int) -> grain.MapDataset:
    """The global stream of rows for `split` (train: effectively infinite; val: a multiple of
    global_batch, padded)."""
    src = _get(cfg, "source")
    if src in SYNTHETIC_SOURCES:
        if split == "train":
            return grain.MapDataset.range(_TRAIN_LEN).map(
                SyntheticRows(cfg, seed, synthetic.TRAIN_STREAM))
        n = int(_get(cfg, "val_examples"))
        padded = -(-n // global_batch) * global_batch
        return grain.MapDataset.range(padded).map(
            SyntheticRows(cfg, seed, synthetic.VAL_STREAM, valid=n))
    stream = open_tokens(cfg)
    T = int(_get(cfg, "seq_len"))
    n_train, n_val = _split_sizes(len(stream), float(_get(cfg, "val_fraction")))
    if split == "train":
        nw = (n_train - 1) // T
        return (grain.MapDataset.range(nw).shuffle(seed=int(seed)).repeat(None)
                .map(WindowRows(cfg, stream, 0, nw)))
    if n_val == 0:
        raise ValueError("data.val_fraction=0: the file has no held-out split")
    nw = (n_val - 1) // T
    padded = -(-nw // global_batch) * global_batch
    return grain.MapDataset.range(padded).map(WindowRows(cfg, stream, n_train, nw))


def make_dataset(data_cfg, *, split: str, global_batch: int, seed: int, process_index: int = 0,
                 process_count: int = 1) -> grain.MapDataset:
    """The MapDataset of this process's batches (random access: batch k = k-th global batch)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if global_batch < 1 or global_batch % process_count:
        raise ValueError(f"global batch {global_batch} is not a positive multiple of the "
                         f"{process_count} processes")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    b = global_batch // process_count
    rows = _rows_dataset(data_cfg, split, global_batch, seed)
    # local batch k = rows k*b..(k+1)*b; global batch j = local batches j*P..j*P+P-1
    return rows.batch(b, drop_remainder=True)[process_index::process_count]


def make_iterator(data_cfg, *, split: str, global_batch: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> grain.DatasetIterator:
    """A grain DatasetIterator over this process's rows of each global batch (see module doc)."""
    ds = make_dataset(data_cfg, split=split, global_batch=global_batch, seed=seed,
                      process_index=process_index, process_count=process_count)
    workers = int(_get(data_cfg, "num_workers"))
    opts = grain.ReadOptions(num_threads=int(_get(data_cfg, "num_threads")),
                             prefetch_buffer_size=int(_get(data_cfg, "prefetch")))
    it_ds = ds.to_iter_dataset(opts)
    if workers > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=int(_get(data_cfg, "worker_buffer_size"))))
    return iter(it_ds)


# ------------------------------------------------------------------------------------------------
# prefetch to device
# ------------------------------------------------------------------------------------------------

class DevicePrefetch(grain.DatasetIterator):
    """Iterates global jax Arrays built with `jax.make_array_from_process_local_data`, keeping
    `size` batches in flight. `get_state()` is the state of the wrapped iterator *before the next
    batch this object yields* (not of the batches already read ahead), so
    `grain.checkpoint.CheckpointSave(prefetcher)` / `CheckpointRestore(prefetcher)` resume exactly.
    `sharding`: one Sharding for every array, or a dict of them keyed like the batch.
    """

    def __init__(self, iterator, sharding, size: int = 2):
        super().__init__()
        self._it, self._sharding, self._size = iterator, sharding, max(int(size), 1)
        self._buf: collections.deque = collections.deque()
        self._done = False

    def _put(self, batch: Mapping[str, np.ndarray]):
        import jax
        out = {}
        for k, v in batch.items():
            sh = self._sharding[k] if isinstance(self._sharding, Mapping) else self._sharding
            out[k] = jax.make_array_from_process_local_data(sh, np.asarray(v))
        return out

    def _fill(self):
        while not self._done and len(self._buf) < self._size:
            state = copy.deepcopy(self._it.get_state())
            try:
                batch = next(self._it)
            except StopIteration:
                self._done = True
                break
            self._buf.append((state, self._put(batch)))

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        self._fill()
        if not self._buf:
            raise StopIteration
        _, batch = self._buf.popleft()
        self._fill()
        return batch

    def get_state(self) -> dict:
        return copy.deepcopy(self._buf[0][0] if self._buf else self._it.get_state())

    def set_state(self, state: dict) -> None:
        self._buf.clear()
        self._done = False
        self._it.set_state(state)


def device_prefetch(iterator, sharding, size: int = 2) -> DevicePrefetch:
    """Wrap a batch iterator so that it yields global jax Arrays on `sharding` (see DevicePrefetch)."""
    return DevicePrefetch(iterator, sharding, size)


__all__ = ["data_defaults", "vocab_size", "validate", "make_iterator", "make_dataset",
           "device_prefetch", "DevicePrefetch", "SOURCES", "SYNTHETIC_SOURCES", "FILE_SOURCES"]
