"""The pipeline: rows of a source (synthetic examples or windows of a token stream), batched
per process, as grain datasets and iterators (the contract is in train/data/__init__.py).

  make_dataset(data_cfg, *, split, global_batch, seed, process_index=0, process_count=1)
      -> grain MapDataset of this process's batches (random access)
  make_iterator(...)  -> grain DatasetIterator over them (checkpointable)
"""
from __future__ import annotations

import grain
import numpy as np

from train.data import synthetic
from train.data.config import SYNTHETIC_SOURCES, get, vocab_size
from train.data.sources import open_tokens, read_text, split_sizes

_TRAIN_LEN = 2 ** 62  # "infinite" synthetic stream


# ------------------------------------------------------------------------------------------------
# row makers (picklable: they travel to worker processes)
# ------------------------------------------------------------------------------------------------

class SyntheticRows:
    """Example `i` of a synthetic task as a row dict; index >= `valid` gives a padding row."""

    def __init__(self, cfg, seed: int, stream: int, valid: int | None = None):
        g = lambda k: get(cfg, k)  # noqa: E731
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
                    num_filler_tokens=g("passkey_filler_tokens"), filler=g("passkey_filler"),
                    distinct=bool(g("passkey_distinct")))
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
                self.haystack = read_text(self.haystack_path)
            kw = dict(kw, haystack_text=self.haystack)
        ex = self.fn(synthetic.example_rng(self.seed, self.stream, i), **kw)
        return {"inputs": ex["inputs"], "targets": ex["targets"], "loss_mask": ex["loss_mask"]}


class WindowRows:
    """Window `i` (tokens [start + i*T, start + i*T + T + 1)) of a token stream as a row dict;
    index >= `valid` gives a padding row."""

    def __init__(self, cfg, stream, start: int, valid: int):
        self.T, self.start, self.valid = int(get(cfg, "seq_len")), start, valid
        self.pack, self.eos = bool(get(cfg, "pack")), int(get(cfg, "eos_id"))
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
    src = get(cfg, "source")
    if src in SYNTHETIC_SOURCES:
        if split == "train":
            return grain.MapDataset.range(_TRAIN_LEN).map(
                SyntheticRows(cfg, seed, synthetic.TRAIN_STREAM))
        n = int(get(cfg, "val_examples"))
        padded = -(-n // global_batch) * global_batch
        return grain.MapDataset.range(padded).map(
            SyntheticRows(cfg, seed, synthetic.VAL_STREAM, valid=n))
    stream = open_tokens(cfg)
    T = int(get(cfg, "seq_len"))
    n_train, n_val = split_sizes(len(stream), float(get(cfg, "val_fraction")))
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
    workers = int(get(data_cfg, "num_workers"))
    opts = grain.ReadOptions(num_threads=int(get(data_cfg, "num_threads")),
                             prefetch_buffer_size=int(get(data_cfg, "prefetch")))
    it_ds = ds.to_iter_dataset(opts)
    if workers > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=int(get(data_cfg, "worker_buffer_size"))))
    return iter(it_ds)
