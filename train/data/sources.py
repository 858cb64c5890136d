"""Sources: token streams read from local files, with random access by token offset.

  text          the bytes of any file (byte-level, vocabulary 256), memory-mapped
  .npy          a 1-D integer array (memory-mapped)
  .bin          raw tokens of `data.dtype` (memory-mapped, native byte order)
  .array_record ArrayRecord records, each the raw bytes of one document's tokens of `data.dtype`
                (`write_array_record` writes them); the stream is the records concatenated and
                record starts are document starts

`stream.read(lo, hi)` returns (tokens int64 [hi-lo], record_start bool [hi-lo]); streams open
their files lazily and drop them when pickled, so they travel to grain worker processes.
`split_sizes(n, val_fraction)` is the train/held-out split of a stream (the held-out split is the
tail).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

TOKEN_EXTENSIONS = (".npy", ".bin", ".array_record", ".arrayrecord")


def token_file_kind(path: str) -> str | None:
    low = path.lower()
    if low.endswith(".npy"):
        return "npy"
    if low.endswith(".bin"):
        return "bin"
    if low.endswith(".array_record") or low.endswith(".arrayrecord"):
        return "array_record"
    return None


class ArrayStream:
    """A 1-D token array behind a memory map (text bytes, .npy, .bin)."""

    def __init__(self, path: str, kind: str, dtype: str = "uint16"):
        self.path, self.kind, self.dtype = path, kind, dtype
        self._arr = None
        self._len = len(self._array())

    def _array(self) -> np.ndarray:
        if self._arr is None:
            if self.kind == "text":
                arr = np.memmap(self.path, np.uint8, mode="r") if os.path.getsize(self.path) else \
                    np.zeros(0, np.uint8)
            elif self.kind == "npy":
                try:
                    arr = np.load(self.path, mmap_mode="r", allow_pickle=False)
                except (EOFError, OSError, ValueError) as e:   # empty, truncated, not .npy
                    raise ValueError(f"not a readable .npy array ({type(e).__name__}: "
                                     f"{str(e).splitlines()[0] if str(e) else 'empty'})") from None
                if arr.ndim != 1 or arr.dtype.kind not in "iu":
                    raise ValueError(f"expected a 1-D integer array, got {arr.dtype}{list(arr.shape)}")
            else:
                dt = np.dtype(self.dtype)
                size = os.path.getsize(self.path)
                if size % dt.itemsize:
                    raise ValueError(f"size {size} is not a multiple of the {dt} item size")
                arr = np.memmap(self.path, dt, mode="r") if size else np.zeros(0, dt)
            self._arr = arr
        return self._arr

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_arr"] = None
        return d

    def __len__(self) -> int:
        return self._len

    def read(self, lo: int, hi: int):
        toks = np.asarray(self._array()[lo:hi], np.int64)
        return toks, np.zeros(toks.size, bool)


class ArrayRecordStream:
    """The concatenated records of an ArrayRecord file (each the raw bytes of a token array)."""

    kind = "array_record"

    def __init__(self, path: str, dtype: str = "uint16"):
        self.path, self.dtype = path, np.dtype(dtype)
        self._src = None
        lengths = np.zeros(len(self._source()), np.int64)
        for i in range(len(lengths)):  # one pass to learn the document lengths
            rec = self._source()[i]
            if len(rec) % self.dtype.itemsize:
                raise ValueError(f"record {i} has {len(rec)} bytes, not a multiple of the "
                                 f"{self.dtype} item size")
            lengths[i] = len(rec) // self.dtype.itemsize
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])

    def _source(self):
        if self._src is None:
            import grain
            self._src = grain.sources.ArrayRecordDataSource(self.path)
        return self._src

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_src"] = None
        return d

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, lo: int, hi: int):
        hi = min(hi, len(self))
        first = int(np.searchsorted(self.offsets, lo, side="right")) - 1
        last = int(np.searchsorted(self.offsets, hi, side="left"))  # records first..last-1
        idx = list(range(first, last))
        src = self._source()
        recs = [src[i] for i in idx]
        toks = np.concatenate([np.frombuffer(r, self.dtype) for r in recs]).astype(np.int64) \
            if recs else np.zeros(0, np.int64)
        base = int(self.offsets[first])
        toks = toks[lo - base:hi - base]
        starts = np.zeros(hi - lo, bool)
        rs = self.offsets[first:last] - lo
        starts[rs[(rs >= 0) & (rs < hi - lo)]] = True
        return toks, starts


def open_tokens(cfg):
    """The token stream of a text/tokens data config (a mapping or ConfigDict)."""
    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    path, src = get("path"), get("source")
    if src == "text":
        return ArrayStream(path, "text")
    kind = token_file_kind(path)
    if kind is None:
        raise ValueError(f"unknown token file type {path} (expected {', '.join(TOKEN_EXTENSIONS)})")
    if kind == "array_record":
        return ArrayRecordStream(path, get("dtype", "uint16"))
    return ArrayStream(path, kind, get("dtype", "uint16"))


def write_array_record(path: str, docs: Sequence[np.ndarray], dtype: str = "uint16") -> None:
    """Write token arrays as ArrayRecord records (raw bytes of `dtype`), one record per document."""
    from array_record.python.array_record_module import ArrayRecordWriter
    w = ArrayRecordWriter(str(path), "group_size:1")
    try:
        for d in docs:
            w.write(np.asarray(d, dtype=dtype).tobytes())
    finally:
        w.close()


def split_sizes(n: int, val_fraction: float) -> tuple[int, int]:
    """(training tokens, held-out tokens) of a stream of n tokens (the last val_fraction is
    held out)."""
    n_val = int(n * val_fraction)
    return n - n_val, n_val


def read_text(path: str) -> str:
    """A local text file as str (UTF-8, undecodable bytes replaced)."""
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")
