"""`python -m eval`: evaluate checkpoints of one or many runs on a list of tasks.

    python -m eval --run_dir=runs/mqar --tasks=ppl,mqar --mqar_kv=4,8,16 --lengths=64,128
    python -m eval --run_dir='runs/*' --steps=all --tasks=passkey --passkey_depths=0,0.5,1 \
        --out=results/sweep

For every run directory (several may be given, comma separated or repeated, and each may be a
glob) and every selected step, the checkpoint is restored onto the current devices with the
config saved beside it (`train.rundir.RunDir.restore_params`; each run's config is read once),
every (task, setting) unit is scored and its rows are appended to results.jsonl / results.csv
(in DIR/eval/ unless --out is given). A rerun skips the units already present unless --force. A
tqdm bar covers the sweep; a markdown table of the selected results is printed at the end and
PNG plots are written next to the results. Bad input (a missing directory, a run without a
checkpoint, a checkpoint that does not fit the code) ends with one line `eval: error: ...` on
stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import sys
from typing import Sequence

from eval import tasks as tasks_lib
from eval.results import ResultsStore, markdown_table
from train import paths as fs
from train.errors import one_line


class EvalError(Exception):
    """Bad input: reported as one line, exit status 2."""


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", action="append", required=True,
                   help="run directory; comma separated, repeatable, globs allowed ('runs/*')")
    p.add_argument("--steps", default="latest", help="latest | all | N,M,... (default latest)")
    p.add_argument("--tasks", default="ppl",
                   help=f"comma separated, from: {', '.join(tasks_lib.TASKS)} (default ppl)")
    p.add_argument("--out", default="", help="results directory (default: DIR/eval per run)")
    p.add_argument("--force", action="store_true", help="recompute finished entries")
    p.add_argument("--n_examples", type=int, default=64, help="examples per setting")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seed", type=int, default=None,
                   help="data seed of the held-out examples (default: the run's data.seed)")
    p.add_argument("--lengths", type=_ints, default=None,
                   help="context lengths (default: T_train x 1,2,4)")
    p.add_argument("--mqar_kv", type=_ints, default=None,
                   help="numbers of key-value pairs (default: the run's)")
    p.add_argument("--copy_tokens", type=int, default=None,
                   help="selective copying: tokens to copy (default: the run's)")
    p.add_argument("--passkey_depths", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--passkey_format", default="auto", choices=("auto", "tokens", "bytes"))
    p.add_argument("--passkey_new", type=int, default=10,
                   help="tokens generated for the byte-level passkey")
    p.add_argument("--niah_haystack", default=None,
                   help="local text for niah_single_2/3 (essay-substituted)")
    p.add_argument("--ppl_batches", type=int, default=8, help="held-out batches (0: all)")
    p.add_argument("--decode_prompt", type=int, default=None, help="decode: prompt length")
    p.add_argument("--decode_new", type=int, default=32, help="decode: generated tokens")
    p.add_argument("--mesh", type=_ints, default=[-1, 1, 1],
                   help="device mesh (data,fsdp,tensor) the parameters are restored onto")
    p.add_argument("--no_plots", action="store_true")
    p.add_argument("--no_progress", action="store_true")
    return p


def expand_run_dirs(specs: Sequence[str]) -> list[str]:
    out: list[str] = []
    for spec in specs:
        for part in (x.strip() for x in spec.split(",")):
            if not part:
                continue
            if glob.has_magic(part):
                hits = [d for d in fs.glob_(part) if fs.isdir(d)]
                if not hits:
                    raise EvalError(f"no run directory matches {part!r}")
                out.extend(hits)
            else:
                if not fs.isdir(part):
                    raise EvalError(f"run directory {part!r} does not exist")
                out.append(part)
    seen, uniq = set(), []
    for d in out:
        key = fs.absolute(d)
        if key not in seen:
            seen.add(key)
            uniq.append(d)
    return uniq


def select_steps(spec: str, available: list[int], run_dir: str) -> list[int]:
    if spec == "latest":
        return available[-1:]
    if spec == "all":
        return list(available)
    try:
        want = _ints(spec)
    except ValueError:
        raise EvalError(f"--steps={spec!r}: expected latest, all or N,M,...") from None
    missing = [s for s in want if s not in available]
    if missing:
        raise EvalError(f"run directory {run_dir!r} has no checkpoint at step(s) "
                        f"{','.join(map(str, missing))} (steps: {available})")
    return want


def run_name(run_dir: str) -> str:
    return fs.basename(fs.absolute(run_dir))



@dataclasses.dataclass
class RunPlan:
    run_dir: str
    run: object          # train.rundir.RunDir (holds the config it read)
    name: str
    model_name: str
    model_cfg: object
    data: object
    steps: list[int]
    store: ResultsStore


def plan_runs(args, run_dirs: list[str]) -> list[RunPlan]:
    """Check every run before any work: config, checkpoints, model config, steps."""
    from train.rundir import RunDir
    plans, stores = [], {}
    base = [run_name(d) for d in run_dirs]
    for d in run_dirs:
        run = RunDir(d)
        try:
            cfg = run.read_config()
            steps = run.steps()
        except (FileNotFoundError, OSError, ValueError) as e:
            raise EvalError(one_line(e)) from None
        if not steps:
            raise EvalError(f"run directory {d!r} has no checkpoint")
        try:
            model_name, model_cfg = run.model_config()
        except (ValueError, KeyError, TypeError) as e:
            raise EvalError(f"{d}: config does not fit the code: {one_line(e)}") from None
        out = args.out or run.eval_path
        key = fs.absolute(out)
        if key not in stores:
            stores[key] = ResultsStore(out)
        # a run is named by its directory; by its path where two directories share a name
        name = (run_name(d) if base.count(run_name(d)) == 1
                else d if fs.is_remote(d) else os.path.normpath(d))
        plans.append(RunPlan(d, run, name, model_name, model_cfg, cfg.get("data"),
                             select_steps(args.steps, steps, d), stores[key]))
    return plans


def options(args) -> tasks_lib.Options:
    return tasks_lib.Options(
        n_examples=args.n_examples, batch_size=args.batch_size, seed=args.seed,
        lengths=args.lengths, mqar_kv=args.mqar_kv, copy_tokens=args.copy_tokens,
        passkey_depths=tuple(args.passkey_depths), passkey_format=args.passkey_format,
        passkey_new=args.passkey_new, niah_haystack=args.niah_haystack,
        ppl_batches=args.ppl_batches, decode_prompt=args.decode_prompt,
        decode_new=args.decode_new)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except EvalError as e:
        print(f"eval: error: {e}", file=sys.stderr)
        return 2


def _main(argv) -> int:
    args = parser().parse_args(argv)
    if args.n_examples < 1 or args.batch_size < 1:
        raise EvalError("--n_examples and --batch_size must be >= 1")
    try:
        task_list = [tasks_lib.get_task(t.strip()) for t in args.tasks.split(",") if t.strip()]
    except ValueError as e:
        raise EvalError(one_line(e)) from None
    run_dirs = expand_run_dirs(args.run_dir)
    plans = plan_runs(args, run_dirs)
    opts = options(args)

    import jax
    from absl import logging as absl_logging
    from tqdm import tqdm
    absl_logging.set_verbosity(absl_logging.ERROR)   # orbax warns on every restore

    import zoo
    from eval.scoring import Model
    from train.sharding import make_mesh
    try:
        mesh = make_mesh(args.mesh)
    except ValueError as e:
        raise EvalError(f"--mesh: {one_line(e)}") from None

    # every unit of the sweep, known before restoring anything
    units = []
    for plan in plans:
        run = tasks_lib.Run(plan.data, plan.name)
        max_len = zoo.get(plan.model_name).max_len(plan.model_cfg)
        vocab = int(getattr(plan.model_cfg, "vocab_size"))
        probe = Model(None, None, vocab_size=vocab, max_len=max_len, name=plan.model_name, mesh=mesh)
        per_task = [(task, task.settings(run, probe, opts)) for task in task_list]
        for step in plan.steps:
            for task, settings in per_task:
                for setting in settings:
                    units.append((plan, run, step, task, setting))

    from train.rundir import CorruptCheckpoint
    failures = 0
    loaded: tuple | None = None
    corrupt: set = set()       # (run dir, step) skipped: one line each, the sweep goes on
    bar = tqdm(units, desc="eval", unit="unit", disable=args.no_progress, file=sys.stderr)
    for plan, run, step, task, setting in bar:
        if not args.force and plan.store.has(plan.name, step, task.name, setting.name):
            continue
        if (plan.run_dir, step) in corrupt:
            continue
        bar.set_postfix_str(f"{plan.name}@{step} {task.name} {setting.name}", refresh=False)
        if loaded is None or loaded[0] != (plan.run_dir, step):
            try:
                name, model_cfg, graphdef, params = plan.run.restore_params(step, mesh=mesh)
            except CorruptCheckpoint as e:
                failures += 1
                corrupt.add((plan.run_dir, step))
                tqdm.write(f"eval: skipping {plan.name}@{step}: {one_line(e)}", file=sys.stderr)
                continue
            except (FileNotFoundError, ValueError, KeyError) as e:
                raise EvalError(one_line(e)) from None
            model = Model(graphdef, params, vocab_size=int(model_cfg.vocab_size),
                          max_len=zoo.get(name).max_len(model_cfg), name=name, mesh=mesh)
            loaded = ((plan.run_dir, step), model)
        model = loaded[1]
        try:
            metrics = task.evaluate(run, model, setting, opts)
        except (ValueError, RuntimeError) as e:
            failures += 1
            tqdm.write(f"eval: {plan.name}@{step} {task.name} {setting.name} failed: "
                       f"{one_line(e)}", file=sys.stderr)
            continue
        plan.store.append([dict(run=plan.name, model=plan.model_name, step=step, task=task.name,
                                setting=setting.name, metric=k, value=v)
                           for k, v in metrics.items()])
    bar.close()
    del loaded
    jax.clear_caches()

    # the table: every selected (run, step, task) present in the stores
    wanted = {(p.name, s, t.name) for p in plans for s in p.steps for t in task_list}
    stores = list({id(p.store): p.store for p in plans}.values())
    rows = [r for st in stores for r in st.rows() if (r["run"], r["step"], r["task"]) in wanted]
    if not args.no_plots:
        from eval import plots
        for st in stores:
            mine = [r for r in rows if any(p.store is st and p.name == r["run"] for p in plans)]
            pdir = fs.join(st.out_dir, "plots")
            plots.passkey_heatmaps(mine, pdir)
            plots.accuracy_vs_length(mine, pdir)
            plots.loss_curves([p.run_dir for p in plans if p.store is st],
                              fs.join(pdir, "loss_curves.png"))
    print(markdown_table(rows))
    return 1 if failures else 0
