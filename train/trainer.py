"""The trainer: a functional, sharded train step over (graphdef, params) and the loop around it.

    state   params (pure dict of the model's nnx state, float32), opt_state (optax), step (int32)
    step    jax.jit with NamedSharding in/out shardings from train.sharding's rules, donated state
    loop    grain iterator -> global arrays (each process its own rows) -> step; progress line,
            metrics.jsonl + TensorBoard, periodic held-out eval, async orbax checkpoints, resume
            from the latest complete step, SIGTERM -> save and exit.

Objective of one optimizer step over a global batch split into `grad_accum` micro-batches:
    sum over micro-batches of ce_sum_i / n_tokens(global batch)
    + sum over named aux terms of weight * mean over micro-batches of the term
so that for per-token losses accumulation equals the big batch exactly (up to float summation
order). The aux terms are the model's `aux_terms(aux)` (statistics summed over the whole global
batch inside a micro-batch), weighted by name from `train.aux_weights`.
"""
from __future__ import annotations

import dataclasses
import signal
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import zoo
from train import allocator, faults, init_from, optim
from train import checkpoint as ckpt
from train import config as config_lib
from train import guard as guard_lib
from train import mfu as mfu_lib
from train import sharding as sh
from train.metrics import Progress, StepMeter, fmt_time
from train.rundir import RunDir
from train.step import BATCH_KEYS, make_eval_step, make_train_step  # noqa: F401 (re-exported)


def _data():
    from train import data
    return data


@dataclasses.dataclass
class Setup:
    """Everything derived from a resolved config before training starts."""
    cfg: Any
    model_name: str
    model_cfg: Any
    mesh: Any
    graphdef: Any
    abstract_params: dict
    param_shardings: dict
    opt: optax.GradientTransformation
    abstract_opt_state: Any
    opt_shardings: Any
    train_step: Any          # the pure step function
    eval_step: Any
    batch_spec: P
    flops_per_token: float


def build_setup(cfg, model_cfg, devices=None) -> Setup:
    name = cfg.model.name
    mesh = sh.make_mesh(tuple(cfg.mesh.shape), devices)
    graphdef, state = ckpt.abstract_model(name, model_cfg, cfg.train.seed)
    abstract_params = nnx.to_pure_dict(state)
    p_sh = nnx.to_pure_dict(sh.param_shardings(state, mesh))
    opt = optim.make_optimizer(cfg.train, zoo.get(name).groups, abstract_params)
    abstract_opt = jax.eval_shape(opt.init, abstract_params)
    o_sh = optim.opt_state_shardings(opt, abstract_opt, p_sh, mesh)
    t = cfg.train
    table = optim.parse_anneal(t.get("anneal", ""))
    try:
        optim.check_anneal(abstract_params, table)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None
    step = make_train_step(graphdef, opt, aux_weights=dict(t.aux_weights), grad_accum=t.grad_accum,
                           dropout_seed=(t.seed + 1 if t.dropout else None),
                           batch_spec=sh.BATCH_AXES_SPEC, anneal=tuple(table), steps=int(t.steps))
    fpt = mfu_lib.flops_per_token(name, model_cfg, cfg.data.seq_len)
    return Setup(cfg=cfg, model_name=name, model_cfg=model_cfg, mesh=mesh, graphdef=graphdef,
                 abstract_params=abstract_params, param_shardings=p_sh, opt=opt,
                 abstract_opt_state=abstract_opt, opt_shardings=o_sh, train_step=step, eval_step=make_eval_step(graphdef),
                 batch_spec=sh.BATCH_AXES_SPEC, flops_per_token=fpt)


def abstract_batch(cfg, batch_size: int | None = None) -> dict:
    B = batch_size or cfg.train.batch_size
    T = cfg.data.seq_len
    b = {"inputs": jax.ShapeDtypeStruct((B, T), jnp.int32),
         "targets": jax.ShapeDtypeStruct((B, T), jnp.int32),
         "loss_mask": jax.ShapeDtypeStruct((B, T), jnp.float32)}
    if cfg.data.get("pack", False):
        b["segment_ids"] = jax.ShapeDtypeStruct((B, T), jnp.int32)
    return b


def eval_shape_step(cfg, model_cfg=None):
    """`jax.eval_shape` of one train step of a config (nothing allocated, nothing compiled).

    `cfg` is resolved here unless `model_cfg` (from `config.resolve`) is given.
    Returns (abstract params, abstract updated params, abstract metrics)."""
    if model_cfg is None:
        cfg, model_cfg = config_lib.resolve(cfg)
    graphdef, state = ckpt.abstract_model(cfg.model.name, model_cfg, cfg.train.seed)
    params = nnx.to_pure_dict(state)
    opt = optim.make_optimizer(cfg.train, zoo.get(cfg.model.name).groups, params)
    opt_state = jax.eval_shape(opt.init, params)
    t = cfg.train
    step = make_train_step(graphdef, opt, aux_weights=dict(t.aux_weights), grad_accum=t.grad_accum,
                           dropout_seed=(t.seed + 1 if t.dropout else None),
                           anneal=tuple(optim.parse_anneal(t.get("anneal", ""))), steps=int(t.steps))
    new_p, _, _, metrics = jax.eval_shape(step, params, opt_state,
                                          jax.ShapeDtypeStruct((), jnp.int32), abstract_batch(cfg))
    return params, new_p, metrics


def init_params(s: Setup) -> dict:
    """Initialise parameters directly into their shardings (same values on any mesh)."""
    name, mcfg, seed = s.model_name, s.model_cfg, s.cfg.train.seed

    def init():
        return nnx.to_pure_dict(nnx.split(zoo.build(name, mcfg, nnx.Rngs(params=seed)))[1])
    return jax.jit(init, out_shardings=s.param_shardings)()


def to_global(batch: Mapping[str, np.ndarray], mesh, spec: P) -> dict:
    """This process's rows -> global arrays sharded over the batch axes."""
    out = {}
    for k, v in batch.items():
        if k not in BATCH_KEYS:
            continue
        v = np.asarray(v)
        sharding = NamedSharding(mesh, P(*spec, *([None] * (v.ndim - len(spec)))))
        gshape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
        out[k] = jax.make_array_from_process_local_data(sharding, v, gshape)
    return out


# ----------------------------------------------------------------------------- the loop

class Trainer:
    """One training run in a run directory (resumes from its latest complete checkpoint)."""

    def __init__(self, cfg, model_cfg, *, verbose: bool = True, devices=None):
        self.cfg = cfg
        self.s = build_setup(cfg, model_cfg, devices)
        self.rundir = RunDir(cfg.checkpoint.dir)
        self.run_dir = self.rundir.path
        if cfg.checkpoint.init_from and not (self.rundir.exists() and self.rundir.steps()):
            init_from.check(cfg.checkpoint.init_from)        # before anything compiles
        self.is_main = jax.process_index() == 0
        self.verbose = verbose and self.is_main
        self._stop_signal = False
        s, mesh = self.s, self.s.mesh
        rep = NamedSharding(mesh, P())
        bspec = s.batch_spec
        self.batch_sharding = NamedSharding(mesh, P(*bspec, None))
        t = cfg.train
        step = guard_lib.guarded(s.train_step, nonfinite=t.nonfinite, spike_factor=t.spike_factor)
        self.step_fn = jax.jit(step, in_shardings=(s.param_shardings, s.opt_shardings, rep, rep,
                                                   self.batch_sharding),
                               out_shardings=(s.param_shardings, s.opt_shardings, rep, rep, rep),
                               donate_argnums=(0, 1, 2, 3))
        self.eval_fn = jax.jit(s.eval_step, in_shardings=(s.param_shardings, self.batch_sharding),
                               out_shardings=rep)

    # -- data
    def train_iterator(self):
        c = self.cfg
        return _data().make_iterator(c.data, split="train", global_batch=c.train.batch_size,
                                     seed=c.data.seed, process_index=jax.process_index(),
                                     process_count=jax.process_count())

    def val_iterator(self):
        c = self.cfg
        return _data().make_iterator(c.data, split="val", global_batch=c.eval.batch_size,
                                     seed=c.data.seed, process_index=jax.process_index(),
                                     process_count=jax.process_count())

    def evaluate(self, params) -> dict:
        tot = {"ce_sum": 0.0, "n_tokens": 0.0, "correct": 0.0}
        n = 0
        for batch in self.val_iterator():
            with jax.set_mesh(self.s.mesh):     # (as for the train step)
                out = self.eval_fn(params, to_global(batch, self.s.mesh, self.s.batch_spec))
            for k in tot:
                tot[k] += float(out[k])
            n += 1
            if self.cfg.eval.max_batches and n >= self.cfg.eval.max_batches:
                break
        nt = max(tot["n_tokens"], 1.0)
        return {"val_loss": tot["ce_sum"] / nt, "val_accuracy": tot["correct"] / nt,
                "val_tokens": tot["n_tokens"], "val_batches": n}

    # -- signals
    def _on_sigterm(self, signum, frame):
        if not self._stop_signal:
            self._signal_t = time.perf_counter()
        self._stop_signal = True

    def _stop_requested(self) -> bool:
        flag = self._stop_signal
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            flag = bool(np.max(multihost_utils.process_allgather(np.int32(flag))))
        return flag

    def log(self, text: str) -> None:
        if self.verbose:
            print(text, flush=True)

    def warn(self, text: str) -> None:
        if self.is_main:
            print(f"warning: {text}", flush=True)

    def run(self) -> dict:
        cfg = self.cfg
        s = self.s
        state_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in
                          jax.tree.leaves((s.abstract_params, s.abstract_opt_state)))
        # an unwritable or full disk is reported before anything compiles
        faults.probe_storage(self.rundir, state_bytes)   # creates the run directory
        cfg_json = config_lib.to_jsonable(cfg)
        if self.is_main:
            self.rundir.write_config(cfg_json)
        mngr = self.rundir.manager(keep=cfg.checkpoint.keep,
                                   async_save=cfg.checkpoint.async_save,
                                   ocdbt=cfg.checkpoint.get("ocdbt", True))
        self.ckpts = faults.Checkpoints(self.rundir, mngr, is_main=self.is_main, warn=self.warn)
        writer = self.rundir.metrics_writer(enabled=self.is_main)
        old_handler = None
        try:
            old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:   # not the main thread
            pass
        try:
            return self._run(self.ckpts, writer, cfg_json)
        finally:
            try:
                mngr.wait_until_finished()
            except Exception:    # reported where the save was waited for
                pass
            mngr.close()
            writer.close()
            if old_handler is not None:
                signal.signal(signal.SIGTERM, old_handler)

    def _run(self, ck: faults.Checkpoints, writer, cfg_json) -> dict:
        cfg, s = self.cfg, self.s
        t = cfg.train
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(s.abstract_params))
        self.log(f"model {s.model_name}: {n_params:,} parameters; mesh {dict(s.mesh.shape)} on "
                 f"{jax.device_count()} {jax.devices()[0].platform} devices, "
                 f"{jax.process_count()} process(es); allocator {allocator.name()}; "
                 f"run dir {self.run_dir}")
        it = self.train_iterator()
        rep = NamedSharding(s.mesh, P())
        params = init_params(s)
        opt_state = jax.jit(s.opt.init, out_shardings=s.opt_shardings)(params)
        step = jax.device_put(np.int32(0), rep)
        guard = jax.device_put(guard_lib.init_guard(t.spike_window if t.spike_factor else 1), rep)
        start = 0
        target = jax.tree.map(
            lambda a, sd: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sd),
            {"params": params, "opt_state": opt_state, "step": step, "guard": guard},
            {"params": s.param_shardings, "opt_state": s.opt_shardings, "step": rep,
             "guard": jax.tree.map(lambda _: rep, guard)})
        restored, _ = ck.resume(target, it)
        if restored is not None:
            params, opt_state, step = restored["params"], restored["opt_state"], restored["step"]
            guard = restored.get("guard", guard)
            start = int(step)
            self.log(f"resumed from {self.rundir.checkpoints_path} at step {start}")
        elif cfg.checkpoint.init_from:
            params, line = init_from.initialise(params, cfg.checkpoint.init_from, s.mesh)
            self.log(line)
        end = t.steps if not t.stop_at_step else min(t.steps, t.stop_at_step)

        meter = StepMeter(start=start, total=t.steps, tokens_per_step=t.batch_size * cfg.data.seq_len,
                          flops_per_token=s.flops_per_token, schedule=optim.schedule(t),
                          peak=mfu_lib.total_peak_flops(probe=t.mfu_probe))
        losses: dict[int, float] = {}
        history = []
        status = "done"
        t_start = time.perf_counter()
        compile_s = 0.0
        last_eval = (None, None)
        progress = Progress(t.steps, enabled=self.verbose)

        def state():
            return {"params": params, "opt_state": opt_state, "step": step, "guard": guard}

        for k in range(start, end):
            batch = to_global(next(it), s.mesh, s.batch_spec)
            if k == start:
                tc = time.perf_counter()
                # compile ahead of time (an unknown aux weight name fails here, while tracing)
                # the mesh is set while the step traces: Pallas kernels run per shard under it
                # (pallas_kernels.harness.over_mesh)
                with jax.set_mesh(s.mesh):
                    step_fn = self.step_fn.lower(params, opt_state, step, guard, batch).compile()
                compile_s = time.perf_counter() - tc
                self.log(f"compiled the train step in {compile_s:.1f} s; "
                         f"{s.flops_per_token / 1e6:.2f} MFLOP/token (analytic)")
            params, opt_state, step, guard, metrics = step_fn(params, opt_state, step, guard, batch)
            done = k + 1
            if k == start:
                meter.started(done, metrics)
            if done % t.log_every == 0 or done == end:
                m = jax.device_get(metrics)
                rec, eta = meter.record(done, m, elapsed_s=time.perf_counter() - t_start)
                writer.write(rec)
                history.append(rec)
                losses[done] = rec["loss"]
                progress.update(done, rec["loss"], rec["tokens_per_s"], rec["mfu"], eta)
                if int(m["first_bad"]) >= 0:
                    ck.stop_nonfinite(writer, int(m["first_bad"]))
            if cfg.eval.every and done % cfg.eval.every == 0 and done != end:
                ev = self.evaluate(params)
                last_eval = (done, ev)
                writer.write({"step": done, "split": "val", **ev})
                progress.message(f"eval @ step {done}: val_loss {ev['val_loss']:.4f}  "
                                 f"val_accuracy {ev['val_accuracy']:.4f}")
                meter.restart(done)   # tokens/s excludes evals
                target = cfg.eval.early_stop_accuracy
                if target and ev["val_accuracy"] >= target:
                    progress.message(f"val_accuracy {ev['val_accuracy']:.4f} >= "
                                     f"eval.early_stop_accuracy {target}: stopping")
                    status = "early_stop"
                    end = done
                    break
            if done % cfg.checkpoint.every == 0 and done != end:
                if not ck.save(done, state(), cfg_json, it):
                    if int(guard["first_bad"]) >= 0:
                        ck.stop_nonfinite(writer, int(guard["first_bad"]))
                meter.restart(done)
            if self._stop_requested():
                status = "preempted"
                end = done
                break
        train_s = time.perf_counter() - t_start
        final = int(step)
        if int(guard["first_bad"]) >= 0:
            ck.stop_nonfinite(writer, int(guard["first_bad"]))
        ck.finish(final, state(), cfg_json, it)
        if status == "preempted":   # no final eval: the preemption deadline is short
            took = time.perf_counter() - getattr(self, "_signal_t", time.perf_counter())
            deadline = cfg.checkpoint.preempt_deadline_s
            self.log(f"SIGTERM: saved step {final} and stopped ({took:.1f} s after the signal; "
                     f"checkpoint.preempt_deadline_s {deadline:g})")
            if deadline and took > deadline:
                self.warn(f"the preemption save took {took:.1f} s, more than "
                          f"checkpoint.preempt_deadline_s={deadline:g}: a step or a save is "
                          "longer than the notice; save more often or shorten the steps")
            ev = last_eval[1] if last_eval[0] == final else None
        elif last_eval[0] == final:
            ev = last_eval[1]
        else:
            ev = self.evaluate(params)
            writer.write({"step": final, "split": "val", **ev})
        if ev is not None:
            self.log(f"final @ step {final}: val_loss {ev['val_loss']:.4f}  "
                     f"val_accuracy {ev['val_accuracy']:.4f}  (train {fmt_time(train_s)}, "
                     f"compile {compile_s:.1f} s)")
        self.log(f"checkpoints: {self.rundir.checkpoints_path}  (steps {ck.mngr.all_steps()})")
        self.log(f"metrics:     {self.rundir.metrics_path}")
        self.log(f"tensorboard: tensorboard --logdir {self.rundir.tb_path}")
        return {"status": status, "step": final, "losses": losses, "history": history,
                "eval": ev, "params": params, "train_s": train_s, "compile_s": compile_s,
                "run_dir": self.run_dir, "skipped": int(guard["skipped"])}


def train(cfg, *, verbose: bool = True, devices=None) -> dict:
    """Resolve `cfg` against the devices (default: all) and run it (JAX already set up)."""
    devices = list(jax.devices() if devices is None else devices)
    cfg, model_cfg = config_lib.resolve(cfg, device_count=len(devices))
    return Trainer(cfg, model_cfg, verbose=verbose, devices=devices).run()
