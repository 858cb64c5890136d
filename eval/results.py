"""The results store: one row per (run, model, step, task, setting, metric, value).

Files in an output directory:

  results.jsonl   append-only; the record. Every call to `ResultsStore.append` writes its rows
                  (all the metrics of one (run, step, task, setting) unit) as complete lines in a
                  single `os.write` on an O_APPEND descriptor, then fsyncs, so a reader never sees
                  half a row and a unit is either wholly present or absent.
  results.csv     the same rows, de-duplicated (the latest row of each key wins), rebuilt from the
                  JSONL file through a temporary file and `os.replace` after every append.

A unit counts as finished when any of its rows is present; `--force` recomputes it and appends
new rows, which supersede the old ones in the CSV, the tables and the plots (the JSONL keeps the
history).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Iterable, Mapping, Sequence

from train import paths as fs

FIELDS = ("run", "model", "step", "task", "setting", "metric", "value")
UNIT = ("run", "step", "task", "setting")
KEY = UNIT + ("metric",)

JSONL = "results.jsonl"
CSV = "results.csv"


def make_row(run: str, model: str, step: int, task: str, setting: str, metric: str,
             value: float) -> dict:
    return {"run": str(run), "model": str(model), "step": int(step), "task": str(task),
            "setting": str(setting), "metric": str(metric), "value": float(value)}


def unit_key(row: Mapping) -> tuple:
    return tuple(row[k] for k in UNIT)


def row_key(row: Mapping) -> tuple:
    return tuple(row[k] for k in KEY)


def read_rows(path: str) -> list[dict]:
    """Rows of a results JSONL file in file order (empty when the file does not exist).

    Lines that are not complete JSON rows (never written by this module) are ignored.
    """
    if not fs.exists(path):
        return []
    rows = []
    with fs.open_(path, "r") as f:
        for line in f.read().splitlines(keepends=True):
            if not line.endswith("\n"):
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and all(k in row for k in FIELDS):
                rows.append(row)
    return rows


def latest(rows: Iterable[Mapping]) -> list[dict]:
    """De-duplicate by (run, step, task, setting, metric): the last row wins, first-seen order."""
    out: dict[tuple, dict] = {}
    for row in rows:
        out[row_key(row)] = dict(row)     # an update keeps the first-seen position
    return list(out.values())


def _write_atomic(path: str, text: str) -> None:
    if fs.is_remote(path):          # an object appears whole when its upload completes
        with fs.open_(path, "w") as f:
            f.write(text)
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _csv_text(rows: Sequence[Mapping]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: row[k] for k in FIELDS})
    return buf.getvalue()


class ResultsStore:
    """results.jsonl + results.csv in `out_dir` (created on first write)."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.jsonl = fs.join(out_dir, JSONL)
        self.csv = fs.join(out_dir, CSV)
        self._rows = read_rows(self.jsonl)
        self._units = {unit_key(r) for r in self._rows}

    def rows(self) -> list[dict]:
        return latest(self._rows)

    def has(self, run: str, step: int, task: str, setting: str) -> bool:
        return (str(run), int(step), str(task), str(setting)) in self._units

    def append(self, rows: Sequence[Mapping]) -> None:
        rows = [make_row(**{k: r[k] for k in FIELDS}) for r in rows]
        if not rows:
            return
        data = "".join(json.dumps(r, sort_keys=False) + "\n" for r in rows).encode("utf-8")
        if fs.is_remote(self.jsonl):
            self._append_remote(data)
        else:
            self._append_local(data)
        self._rows.extend(rows)
        self._units.update(unit_key(r) for r in rows)
        # rebuilt from the file, so rows appended by another process sharing --out are kept
        _write_atomic(self.csv, _csv_text(latest(read_rows(self.jsonl))))

    def _append_remote(self, data: bytes) -> None:
        """An object store has no append: the object is rewritten with the rows added (one
        writer per --out there; local stores take concurrent appenders)."""
        old = b""
        if fs.exists(self.jsonl):
            with fs.open_(self.jsonl, "rb") as f:
                old = f.read()
        if old and not old.endswith(b"\n"):
            old += b"\n"
        with fs.open_(self.jsonl, "wb") as f:
            f.write(old + data)

    def _append_local(self, data: bytes) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        fd = os.open(self.jsonl, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data     # never glue a row onto a foreign unterminated line
            written = os.write(fd, data)
            while written < len(data):      # regular files take the whole buffer; be safe anyway
                written += os.write(fd, data[written:])
            os.fsync(fd)
        finally:
            os.close(fd)


def fmt_value(v: float) -> str:
    if v != v:
        return "nan"
    if v in (math.inf, -math.inf):
        return "inf" if v > 0 else "-inf"
    if float(v).is_integer() and abs(v) < 1e12:
        return str(int(v))
    if abs(v) >= 1000:
        return f"{v:.1f}"
    return f"{v:.4g}"


def markdown_table(rows: Sequence[Mapping]) -> str:
    """A markdown table with one line per (run, step, task, setting); metrics as columns.

    Columns are the union of the metrics present, in first-seen order; a cell is empty where a
    task does not report that metric.
    """
    rows = latest(rows)
    metrics: list[str] = []
    units: dict[tuple, dict] = {}
    for r in rows:
        if r["metric"] not in metrics:
            metrics.append(r["metric"])
        u = units.setdefault(unit_key(r), {"model": r["model"]})
        u[r["metric"]] = r["value"]
    head = ["run", "model", "step", "task", "setting"] + metrics
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (run, step, task, setting), vals in units.items():
        cells = [run, vals["model"], str(step), task, setting or "-"]
        cells += [fmt_value(vals[m]) if m in vals else "" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
