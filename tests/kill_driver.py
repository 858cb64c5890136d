"""Run the tiny trainer of tests/train_helpers.py and SIGKILL it at one kill point (tests/test_kill.py).

    python tests/kill_driver.py POINT RUN_DIR EVIDENCE_JSON [KEY=VALUE ...]

POINT (the process kills itself there, after writing what it saw to EVIDENCE_JSON, so the test
can assert the point was reached):
  none           no kill (the uninterrupted run, and every resume)
  step           while step 5 is in flight (JAX dispatches asynchronously: the kill lands as the
                 host fetches the next batch)
  async_save     right after the save of step 6 was started, its commit held back: the step's
                 temporary directory exists, no committed step 6
  before_commit  inside orbax's commit of step 6, before the rename: every file written
  after_commit   right after step 6 was committed, before its checksums were written
"""
import glob
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)      # as the test process (tests/conftest.py)

from train_helpers import tiny_cfg  # noqa: E402

from train import trainer as T  # noqa: E402
from train.rundir import RunDir  # noqa: E402

KILL_STEP = 6


def _die(evidence_path, **seen):
    with open(evidence_path, "w") as f:
        json.dump(seen, f)
    os.kill(os.getpid(), signal.SIGKILL)


def _listing(run_dir):
    from train import paths  # a local or a gs:// run directory (tests/test_gcs.py)
    ck = paths.join(run_dir, "checkpoints")
    return sorted(paths.listdir(ck)) if paths.isdir(ck) else []


def _complete(run_dir):
    """The committed steps (on an object store a step's directory exists before its commit)."""
    rd = RunDir(run_dir)
    return rd.steps() if rd.exists() else []


def main(point, run_dir, evidence, *overrides):
    over = {}
    for kv in overrides:
        k, v = kv.split("=", 1)
        over[k] = (int(v) if v.lstrip("-").isdigit() else
                   {"True": True, "False": False}.get(v, v))
    cfg = tiny_cfg(run_dir, **over)
    from orbax.checkpoint._src.path import atomicity
    real_finalize = atomicity.AtomicRenameTemporaryPath.finalize

    def step_of(tmp):
        return os.path.basename(str(tmp.get())).split(".")[0]

    if point == "step":
        real = T.to_global
        calls = {"n": 0}

        def to_global(batch, mesh, spec):
            calls["n"] += 1
            if calls["n"] == 6:                     # step 5 dispatched, fetching batch 6
                # (once step 3's save has committed: this point is a step, not a save)
                t0 = time.time()
                while 3 not in _complete(run_dir) and time.time() - t0 < 60:
                    time.sleep(0.05)
                _die(evidence, point=point, batches=calls["n"], listing=_listing(run_dir))
            return real(batch, mesh, spec)
        T.to_global = to_global
    elif point == "async_save":
        import asyncio

        async def held(self):
            if step_of(self) == str(KILL_STEP):
                await asyncio.sleep(3600)               # the commit never comes
            return await real_finalize(self)
        atomicity.AtomicRenameTemporaryPath.finalize = held
        real_save = RunDir.save

        def save(self, mngr, step, *a, **kw):
            real_save(self, mngr, step, *a, **kw)
            if step == KILL_STEP:
                tmp = glob.glob(os.path.join(self.checkpoints_path, f"{step}.orbax-checkpoint-tmp*"))
                _die(evidence, point=point, tmp=[os.path.basename(t) for t in tmp],
                     listing=_listing(run_dir))
        RunDir.save = save
    elif point in ("before_commit", "after_commit"):
        async def finalize(self):
            if step_of(self) == str(KILL_STEP) and point == "before_commit":
                tmp = str(self.get())
                files = [n for _, _, fs in os.walk(tmp) for n in fs]
                _die(evidence, point=point, tmp=os.path.basename(tmp), n_files=len(files),
                     listing=_listing(run_dir))
            out = await real_finalize(self)
            if step_of(self) == str(KILL_STEP):
                _die(evidence, point=point, listing=_listing(run_dir),
                     sealed=os.path.isfile(RunDir(run_dir).checksum_path(KILL_STEP)))
            return out
        atomicity.AtomicRenameTemporaryPath.finalize = finalize
    elif point != "none":
        raise SystemExit(f"unknown kill point {point!r}")
    out = T.train(cfg, verbose=False)
    with open(evidence, "w") as f:
        json.dump({"point": point, "step": out["step"], "listing": _listing(run_dir)}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
