"""Run logs: the JSONL metrics (one JSON object per logged step or eval), TensorBoard event
files (tensorboardX), and the live progress line. Where they live is `train.rundir.RunDir`'s
(`metrics_writer`)."""
from __future__ import annotations

import json
import os
import sys
import time


class MetricsWriter:
    """Appends JSON lines to `jsonl_path` and scalars to TensorBoard files in `tb_dir` (process 0
    only: `enabled`). On object storage (gs://, `train.paths`), which has no appends, the lines
    are kept and the whole object is rewritten at every write (metrics are small; a resumed run
    starts from the lines already there); the TensorBoard events are written to a local
    temporary directory and uploaded to <run>/tb/ at every evaluation and at close."""

    def __init__(self, jsonl_path: str, tb_dir: str, enabled: bool = True):
        from train import paths
        self.enabled = enabled
        self._tb = None
        self._tb_remote = None
        self._f = None
        self._path = jsonl_path
        self._lines: list[str] | None = None
        if enabled:
            if paths.is_remote(jsonl_path):
                self._lines = []
                if paths.isfile(jsonl_path):
                    with paths.open_(jsonl_path, "r") as f:
                        self._lines = [ln for ln in f.read().splitlines() if ln.strip()]
            else:
                os.makedirs(os.path.dirname(os.path.abspath(jsonl_path)), exist_ok=True)
                self._f = open(jsonl_path, "a")
            from tensorboardX import SummaryWriter
            self._tb_remote = tb_dir if paths.is_remote(tb_dir) else None
            if self._tb_remote:      # events are written locally and uploaded (`_upload_tb`)
                import tempfile
                tb_dir = tempfile.mkdtemp(prefix="seqzoo-tb-")
            self._tb_local = tb_dir
            self._tb = SummaryWriter(tb_dir)

    def _append(self, line: str) -> None:
        if self._lines is None:
            self._f.write(line + "\n")
            self._f.flush()
            return
        from train import paths
        self._lines.append(line)
        with paths.open_(self._path, "w") as f:
            f.write("\n".join(self._lines) + "\n")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        rec = {k: (float(v) if hasattr(v, "__float__") and not isinstance(v, (int, str)) else v)
               for k, v in record.items()}
        self._append(json.dumps(rec))
        step = int(rec["step"])
        prefix = rec.get("split", "train")
        for k, v in rec.items():
            if k in ("step", "split") or not isinstance(v, (int, float)):
                continue
            self._tb.add_scalar(f"{prefix}/{k}", v, step)
        if self._tb_remote and prefix != "train":
            self._upload_tb()

    def _upload_tb(self) -> None:
        from train import paths
        self._tb.flush()
        for name in os.listdir(self._tb_local):
            paths.upload(os.path.join(self._tb_local, name), paths.join(self._tb_remote, name))

    def close(self) -> None:
        if self._tb is not None:
            if self._f is not None:
                self._f.close()
            self._tb.close()
            if self._tb_remote:
                self._upload_tb()
                import shutil
                shutil.rmtree(self._tb_local, ignore_errors=True)
            self._f = self._tb = None


class StepMeter:
    """The logged step record's bookkeeping: tokens/s, MFU and the ETA over the steps since the
    last restart, the learning rate from `schedule`. The first step (compile + run) is not timed:
    tokens/s and MFU start at the next; evaluations and saves `restart` the clock so they are
    not counted as training time."""

    def __init__(self, *, start: int, total: int, tokens_per_step: int, flops_per_token: float,
                 schedule, peak: float | None):
        self.total, self.tokens_per_step = total, tokens_per_step
        self.flops_per_token, self.schedule, self.peak = flops_per_token, schedule, peak
        self.last_t: float | None = None
        self.last_step = start

    def started(self, done: int, metrics) -> None:
        """After the first step of this invocation: wait for it, then start the clock."""
        import jax
        jax.block_until_ready(metrics)
        self.restart(done)

    def restart(self, done: int) -> None:
        self.last_t, self.last_step = time.perf_counter(), done

    def record(self, done: int, m: dict, *, elapsed_s: float) -> tuple[dict, float]:
        """(the metrics line of step `done` from the step's host metrics `m`, the ETA in s)."""
        now = time.perf_counter()
        dt = now - self.last_t
        ran = done - self.last_step
        tps = ran * self.tokens_per_step / dt if ran > 0 else None
        mfu = (self.flops_per_token * tps / self.peak) if self.peak and tps else None
        steps_s = ran / dt if ran > 0 else 0.0
        eta = (self.total - done) / steps_s if steps_s else 0.0
        rec = {"step": done, "loss": float(m["loss"]), "ce": float(m["ce"]),
               "grad_norm": float(m["grad_norm"]), "tokens_per_s": tps, "mfu": mfu,
               "lr": float(self.schedule(done - 1)), "elapsed_s": elapsed_s,
               "skipped": int(m["skipped"])}
        rec.update({k: float(v) for k, v in m.items() if k.startswith("aux/")})
        self.restart(done)
        return rec, eta


def read_jsonl(path: str) -> list[dict]:
    from train import paths
    with paths.open_(path, "r") as f:
        return [json.loads(line) for line in f.read().splitlines() if line.strip()]


def fmt_time(s: float) -> str:
    s = int(max(s, 0))
    h, r = divmod(s, 3600)
    m, s = divmod(r, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """The live progress line: step, loss, tokens/s, MFU, ETA (rewritten in place on a TTY)."""

    def __init__(self, total_steps: int, enabled: bool = True, stream=None):
        self.total = total_steps
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.t0 = time.perf_counter()

    def line(self, step: int, loss: float, tokens_per_s: float | None, mfu: float | None,
             eta_s: float) -> str:
        mfu_s = "  n/a" if mfu is None else f"{100 * mfu:5.1f}%"
        tps_s = "       n/a" if tokens_per_s is None else f"{tokens_per_s:10,.0f}"
        return (f"step {step:>6d}/{self.total}  loss {loss:8.4f}  {tps_s} tok/s  "
                f"MFU {mfu_s}  ETA {fmt_time(eta_s)}")

    def update(self, *args) -> None:
        if not self.enabled:
            return
        text = self.line(*args)
        if self.tty:
            self.stream.write("\r" + text + "\033[K")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()
