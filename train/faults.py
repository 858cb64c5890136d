"""Storage faults of a training run: the checkpoints a crash, a full disk or a damaged file leave.

    probe_storage(rundir, need_bytes)   before anything compiles: the run directory can be
                                        written and has room for a checkpoint, else ConfigError
    Checkpoints(rundir, mngr, ...)      the trainer's saves and resume under faults:
        save(step, state, cfg, it)      seal the save before (checksums of the committed steps,
                                        train.rundir.RunDir.seal), then save; a failing disk warns
                                        and returns False (the state stays in memory, the next
                                        save retries); never after a non-finite step
        finish(step, state, cfg, it)    the final save + seal, or TrainingFault naming the last
                                        complete step
        resume(target, it)              the latest step whose files match their checksums; a
                                        damaged one is moved to <run>/corrupt/ with one warning
                                        and the one before it is tried
        stop_nonfinite(writer, step)    train.nonfinite=stop: record the step and raise
                                        TrainingFault; nothing after it is saved

The numerical faults (non-finite or spiking steps) are train.guard's; docs/reliability.md has the
whole picture and the tests that kill a run at each point.
"""
from __future__ import annotations

from typing import Callable

import jax

from train.config import ConfigError
from train.errors import one_line
from train.rundir import RunDir


class TrainingFault(RuntimeError):
    """The run stopped on a fault (a non-finite step under train.nonfinite=stop, a final checkpoint
    that could not be written, no readable checkpoint to resume from): one line, nothing lost."""


def probe_storage(rundir: RunDir, need_bytes: int) -> None:
    """Create the run directory and check it is writable with room for `need_bytes` (one
    checkpoint): ConfigError naming checkpoint.dir otherwise."""
    try:
        rundir.probe_writable(need_bytes=need_bytes)
    except OSError as e:
        raise ConfigError(f"checkpoint.dir: {e}") from None


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"seqzoo:{name}")


class Checkpoints:
    """A run directory's checkpoint manager with the fault handling around it (module doc)."""

    def __init__(self, rundir: RunDir, mngr, *, is_main: bool, warn: Callable[[str], None]):
        self.rundir, self.mngr, self.is_main, self.warn = rundir, mngr, is_main, warn

    def seal(self) -> None:
        """Wait for the save in flight, then write the checksums of the committed steps."""
        self.mngr.wait_until_finished()
        if self.is_main:
            self.rundir.seal()

    def save(self, step: int, state: dict, cfg_json, it) -> bool:
        if int(state["guard"]["first_bad"]) >= 0:   # never save after a non-finite step
            return False
        try:
            self.seal()
            self.rundir.save(self.mngr, step, state, cfg_json, it)
            return True
        except OSError as e:
            self.warn(f"checkpoint save at step {step} failed ({e.strerror or e}): training goes "
                      f"on in memory and the next save retries; the last complete checkpoint is "
                      f"step {self.rundir.latest_step()}")
            return False

    def finish(self, step: int, state: dict, cfg_json, it) -> None:
        def fault(why=""):
            return TrainingFault(f"the final checkpoint (step {step}) could not be written{why}"
                                 f"{' to ' + self.rundir.checkpoints_path if not why else ''}; "
                                 f"the last complete one is step {self.rundir.latest_step()}")
        if self.mngr.latest_step() != step and not self.save(step, state, cfg_json, it):
            raise fault()
        try:
            self.seal()
        except OSError as e:
            raise fault(f" ({e.strerror or e})") from None

    def resume(self, target: dict, it):
        """(restored state, step) of the latest readable checkpoint, or (None, None)."""
        tried = []
        for st in reversed(self.rundir.steps()):
            problem = self.rundir.verify(st)
            if problem is None:
                try:
                    return self.rundir.restore(self.mngr, st, target, it), st
                except Exception as e:
                    if self.rundir.is_sealed(st):    # its files are as written: not damage
                        raise
                    problem = f"cannot be read: {one_line(e, with_type=True)}"
            _sync("verified")       # every process judged the step before it moves
            moved = self.rundir.quarantine(st) if self.is_main else "<run>/corrupt"
            _sync("quarantined")
            tried.append(st)
            self.warn(f"checkpoint step {st} of {self.rundir.given} is corrupt ({problem}); "
                      f"moved to {moved}, falling back to the previous checkpoint")
            self.mngr.reload()
        if tried:
            raise TrainingFault(f"no readable checkpoint in {self.rundir.checkpoints_path} (steps "
                                f"{tried} are corrupt, moved to {self.rundir.path}/corrupt/); "
                                "run again to start from step 0")
        return None, None

    def stop_nonfinite(self, writer, bad_step: int):
        try:
            self.seal()
        except OSError:
            pass
        writer.write({"step": bad_step, "event": "nonfinite"})
        raise TrainingFault(f"non-finite loss or gradient at step {bad_step} "
                            f"(train.nonfinite=stop): stopped without saving; the last complete "
                            f"checkpoint is step {self.rundir.latest_step()} in "
                            f"{self.rundir.checkpoints_path}")
