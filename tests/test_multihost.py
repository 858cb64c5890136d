"""Multi-host: two `python -m train` processes on 127.0.0.1 (jax.distributed, gloo collectives,
2 CPU devices each) train a few steps with the losses of a one-process run on the same number of
devices (4), save a checkpoint together, and one process then restores it onto a different device
count (2) and continues with the losses of the uninterrupted run."""
import os
import subprocess
import sys

import numpy as np
import portpicker
from train_helpers import REPO, TINY_FLAGS, run_cli

from train.metrics import read_jsonl
from train.rundir import RunDir

COMMON = TINY_FLAGS + ["--config.train.steps=6", "--config.train.log_every=1",
                       "--config.checkpoint.every=100", "--config.train.compilation_cache_dir=",
                       "--config.eval.max_batches=1"]


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_jsonl(RunDir(run_dir).metrics_path)
            if "split" not in r}


def test_two_processes_match_one_and_restore_elsewhere(tmp_path):
    ref_dir, mp_dir = str(tmp_path / "ref"), str(tmp_path / "mp")
    ref = run_cli(COMMON + ["--config.mesh.num_cpu_devices=4", f"--config.checkpoint.dir={ref_dir}"],
                  timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref_losses = _losses(ref_dir)
    assert sorted(ref_losses) == [1, 2, 3, 4, 5, 6]

    port = portpicker.pick_unused_port()
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    procs = []
    try:
        for i in range(2):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "train", *COMMON, "--config.train.stop_at_step=4",
                 "--config.mesh.num_cpu_devices=2", "--config.mesh.distributed=on",
                 f"--config.mesh.coordinator_address=127.0.0.1:{port}",
                 "--config.mesh.num_processes=2", f"--config.mesh.process_id={i}",
                 "--config.mesh.init_timeout_s=120", f"--config.checkpoint.dir={mp_dir}"],
                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "on 4 cpu devices, 2 process(es)" in outs[0][0]
    mp_losses = _losses(mp_dir)
    assert sorted(mp_losses) == [1, 2, 3, 4]
    # cross-process all-reduces sum in a different order than in-process ones
    np.testing.assert_allclose([mp_losses[k] for k in range(1, 5)],
                               [ref_losses[k] for k in range(1, 5)], rtol=1e-5)
    assert RunDir(mp_dir).steps() == [4]
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(
        os.listdir(os.path.join(mp_dir, "checkpoints", "4", "data")))

    # one process, 2 devices, continues the 2-process run from its checkpoint
    cont = run_cli(COMMON + ["--config.mesh.num_cpu_devices=2", f"--config.checkpoint.dir={mp_dir}"],
                   timeout=300)
    assert cont.returncode == 0, cont.stderr[-3000:]
    assert "resumed from" in cont.stdout and "at step 4" in cont.stdout
    assert "on 2 cpu devices, 1 process(es)" in cont.stdout
    all_losses = _losses(mp_dir)
    np.testing.assert_allclose([all_losses[5], all_losses[6]], [ref_losses[5], ref_losses[6]],
                               rtol=1e-4)
    assert RunDir(mp_dir).steps()[-1] == 6
