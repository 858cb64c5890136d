"""Run directories on object storage (issue 17 item 5), end to end against a GCS emulator server
(`gcp-storage-emulator`, the test extra) that this module starts on 127.0.0.1:
the tiny trainer writes gs://bkt/run (orbax and tensorstore through their own gs:// support; the
config, metrics, checksums and TensorBoard events through train.paths), is SIGKILLed while a
step is in flight (tests/kill_driver.py), resumes from the bucket to a final state bit-identical
to an uninterrupted local run's, and `python -m eval` sweeps gs://bkt/* into the run's own
eval/ directory there. Every object is asserted in the emulator, and the local working directory
stays empty."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from train_helpers import REPO, tiny_cfg

from train import paths
from train import trainer as T
from train.rundir import RunDir

# checkpoint.ocdbt=False: the emulator ignores GCS preconditions (ifGenerationMatch), which
# tensorstore's OCDBT store relies on for its manifest; measured with OCDBT on: step 3's commit
# failed with "Error reading .../ocdbt.process_0/manifest.ocdbt: Malformed StorageGeneration".
# One zarr array per parameter needs no conditional writes. (OCDBT on real GCS is orbax's default
# and is not exercised here.)
OVER = {"train.steps": 6, "checkpoint.every": 3, "checkpoint.keep": 1, "checkpoint.ocdbt": False}
RUN = "gs://bkt/run"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def emulator():
    """The emulator's HTTP server on a thread of this process (measured: as a separate process
    its answers to tensorstore's concurrent conditional OCDBT writes broke the manifest,
    "Malformed StorageGeneration"; on a thread here every save commits)."""
    from gcp_storage_emulator.server import create_server
    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="bkt")
    server.start()
    url = f"http://127.0.0.1:{port}"
    yield {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GOOGLE_CLOUD_PROJECT": "seqzoo-test"}
    server.stop()


def _state(run_dir, like=None):
    """(latest step, its state, its data-iterator state); `like`: a state to restore onto (its
    shapes and dtypes: the restore then reads no sharding file)."""
    rd = RunDir(run_dir)
    step = rd.latest_step()
    path = paths.join(rd.step_path(step), "state")
    if like is None:
        state = ocp.PyTreeCheckpointer().restore(path)
    else:
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype),
                                like)
        state = ocp.StandardCheckpointer().restore(path, abstract)
    with paths.open_(paths.join(rd.step_path(step), "data", "process_0-of-1.json")) as f:
        data = json.loads(f.read())
    return step, state, data


@pytest.mark.filterwarnings("ignore:Sharding info not provided")
def test_train_kill_resume_evaluate_on_a_bucket(emulator, tmp_path, monkeypatch):
    ref_dir = tmp_path / "reference"
    T.train(tiny_cfg(ref_dir, **OVER), verbose=False)
    ref = _state(str(ref_dir))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    for k, v in emulator.items():
        monkeypatch.setenv(k, v)
    evidence = tmp_path / "evidence.json"
    args = [sys.executable, os.path.join(REPO, "tests", "kill_driver.py"), "step", RUN,
            str(evidence)] + [f"{k}={v}" for k, v in OVER.items()]
    proc = subprocess.run(args, cwd=str(work), env={**os.environ, **emulator},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    seen = json.loads(evidence.read_text())
    assert seen["point"] == "step" and "3" in seen["listing"], seen
    assert RunDir(RUN).steps() == [3], paths.walk_files(RUN)
    T.train(tiny_cfg(RUN, **OVER), verbose=False)                      # resume from the bucket
    step, state, data = _state(RUN, like=ref[1])
    assert step == ref[0] == 6 and data == ref[2]
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rd = RunDir(RUN)
    assert rd.verify(6) is None and rd.is_sealed(6)
    from eval.cli import main
    assert main(["--run_dir=gs://bkt/*", "--tasks=ppl", "--ppl_batches=1", "--batch_size=8",
                 "--no_progress"]) == 0
    objects = paths.walk_files(RUN)
    for want in ("config.json", "metrics.jsonl", "checksums/6.json", "eval/results.jsonl",
                 "eval/results.csv", "eval/plots/loss_curves.png", "checkpoints/6/state/_METADATA",
                 "checkpoints/6/commit_success.txt"):
        assert want in objects, (want, objects)
    assert any(o.startswith("tb/events.out.tfevents") for o in objects)
    rows = [json.loads(x) for x in paths.open_(f"{RUN}/eval/results.jsonl").read().splitlines()]
    assert {(r["run"], r["step"], r["task"]) for r in rows} == {("run", 6, "ppl")}
    with paths.open_(f"{RUN}/metrics.jsonl") as f:
        steps = [json.loads(x)["step"] for x in f.read().splitlines() if '"loss"' in x]
    assert steps[-1] == 6 and 4 in steps                  # the resumed run's lines were added
    assert os.listdir(work) == []                         # nothing was written locally
