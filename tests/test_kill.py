"""Kill anywhere, lose nothing (issue 16 item 1): the tiny trainer is SIGKILLed at several
deterministic points (tests/kill_driver.py; each asserts from what the dying process saw that the
point was reached), restarted, and its final checkpoint — parameters, optimiser state, step, the
numerical-fault guard and the data iterator's position — is bit-identical to an uninterrupted
run's. checkpoint.keep=1 throughout: a save that never commits leaves the one complete checkpoint
in place."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from train_helpers import REPO, tiny_cfg

from train import trainer as T
from train.rundir import RunDir

OVER = {"train.steps": 9, "checkpoint.every": 3, "checkpoint.keep": 1}
DRIVER = os.path.join(REPO, "tests", "kill_driver.py")


def _final_state(run_dir):
    rd = RunDir(run_dir)
    step = rd.latest_step()
    state = ocp.PyTreeCheckpointer().restore(os.path.join(rd.step_path(step), "state"))
    data = open(os.path.join(rd.step_path(step), "data", "process_0-of-1.json")).read()
    return step, state, json.loads(data)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("kill") / "reference"
    T.train(tiny_cfg(run, **OVER), verbose=False)
    return _final_state(run)


@pytest.mark.filterwarnings("ignore:Sharding info not provided")
@pytest.mark.parametrize("point", ["step", "async_save", "before_commit", "after_commit"])
def test_sigkill_then_resume_is_bit_identical(reference, tmp_path, point):
    run, evidence = tmp_path / "run", tmp_path / "evidence.json"
    args = [f"{k}={v}" for k, v in OVER.items()]
    proc = subprocess.run([sys.executable, DRIVER, point, str(run), str(evidence), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stdout[-1500:] + proc.stderr[-1500:]
    seen = json.loads(evidence.read_text())
    assert seen["point"] == point
    if point == "step":
        assert seen["batches"] == 6 and seen["listing"] == ["3"]
    elif point == "async_save":          # step 6's temporary directory, no committed step 6
        assert seen["tmp"] and "6" not in seen["listing"] and "3" in seen["listing"], seen
    elif point == "before_commit":       # every file of step 6 written, not yet renamed
        assert seen["tmp"].startswith("6.orbax-checkpoint-tmp") and seen["n_files"] > 0, seen
        assert "6" not in seen["listing"] and "3" in seen["listing"], seen
    else:                                # committed, not yet sealed
        assert "6" in seen["listing"] and not seen["sealed"], seen
    # keep=1 never removed the only complete checkpoint
    assert RunDir(run).steps()[-1] == (6 if point == "after_commit" else 3)
    out = T.train(tiny_cfg(run, **OVER), verbose=False)
    assert out["step"] == 9
    step, state, data = _final_state(run)
    ref_step, ref_state, ref_data = reference
    assert step == ref_step == 9 and data == ref_data
    leaves, ref_leaves = (jax.tree_util.tree_flatten_with_path(x)[0] for x in (state, ref_state))
    assert [p for p, _ in leaves] == [p for p, _ in ref_leaves]
    for (path, a), (_, b) in zip(leaves, ref_leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
