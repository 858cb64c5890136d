"""The run directory: the one object that knows its layout. The trainer writes it and `python -m
eval` / `python -m eval.table` read it, only through `RunDir`.

  <run>/config.json       the resolved config (all sections) as JSON, written at start.
  <run>/checkpoints/      an orbax CheckpointManager directory: one sub-directory per saved
                          step, each with three items saved together (one step = one unit):
                            "state"   StandardSave of {"params": <pure dict of the model's
                                      nnx state>, "opt_state": <optax state over the same
                                      pure dict>, "step": int32}
                            "config"  JsonSave of the resolved config
                            "data"    the grain iterator state (grain.checkpoint.CheckpointSave),
                                      one file per process: process_<i>-of-<n>.json
                          Incomplete (still writing, or killed) steps are ignored.
  <run>/metrics.jsonl     one JSON object per logged step ({"step", "loss", "tokens_per_s",
                          "mfu", ...}) and per evaluation ({"step", "split": "val",
                          "val_loss", "val_accuracy", ...}).
  <run>/tb/               tensorboardX event files.
  <run>/eval/             `python -m eval`'s results (results.jsonl, .csv, plots) by default.
  <run>/wall.json         the training wall time that `python -m eval.table` recorded.
  <run>/checksums/<step>.json
                          sha256 and size of every file of a complete step, written once the
                          step is committed (`seal`); `verify` checks a step against it (a
                          truncated, bit-flipped or deleted file), `quarantine` moves a damaged
                          step to <run>/corrupt/<step> (nothing is deleted).

Parameters are stored as the *pure dict* of the model's nnx state (`nnx.to_pure_dict(state)`;
`nnx.merge(graphdef, pure_dict)` rebuilds the model), float32.

    run = RunDir(path)              # made absolute here, once; messages show `path` as given
    run.write_config(resolved)      run.read_config()   (read once per object, then cached)
    run.steps()  run.latest_step()  run.manager(...)  run.save(...)  run.restore(...)
    run.restore_params(step=None, mesh=None) -> (model_name, model_cfg, graphdef, params)
    run.metrics_writer(enabled)     run.config_path  .checkpoints_path  .metrics_path  .tb_path
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import TYPE_CHECKING

from train import paths as pth
from train.errors import one_line

if TYPE_CHECKING:   # imported where used: reading the layout needs neither JAX nor orbax
    import ml_collections
    import orbax.checkpoint as ocp

CONFIG_JSON = "config.json"
CHECKPOINTS = "checkpoints"
METRICS_JSONL = "metrics.jsonl"
TB = "tb"
EVAL = "eval"
WALL_JSON = "wall.json"
CHECKSUMS = "checksums"
CORRUPT = "corrupt"
# the items of one checkpoint step
STATE, CONFIG, DATA = "state", "config", "data"


class CorruptCheckpoint(ValueError):
    """A checkpoint step whose files do not match its checksums, or cannot be read."""


def _why(e: BaseException) -> str:
    return one_line(e, with_type=True)



def _file_digests(root: str) -> dict:
    """{relative path: [size, sha256]} of every file under `root`."""
    return {rel: [size, _sha256(pth.join(root, rel), size)]
            for rel, size in pth.file_sizes(root).items()}


def _sha256(path: str, size: int) -> str:
    h = hashlib.sha256()
    for block in pth.read_blocks(path, size):
        h.update(block)
    return h.hexdigest()


class RunDir:
    """A run directory (it need not exist yet: the trainer creates it)."""

    def __init__(self, path):
        self.given = os.fspath(path)          # as the caller named it (error messages)
        self.path = pth.absolute(self.given)    # a local path made absolute, or gs://...
        self._config: ml_collections.ConfigDict | None = None

    def __repr__(self) -> str:
        return f"RunDir({self.given!r})"

    def __fspath__(self) -> str:
        return self.path

    # -- paths
    @property
    def name(self) -> str:
        return pth.basename(self.path)

    @property
    def config_path(self) -> str:
        return pth.join(self.path, CONFIG_JSON)

    @property
    def checkpoints_path(self) -> str:
        return pth.join(self.path, CHECKPOINTS)

    @property
    def metrics_path(self) -> str:
        return pth.join(self.path, METRICS_JSONL)

    @property
    def tb_path(self) -> str:
        return pth.join(self.path, TB)

    @property
    def eval_path(self) -> str:
        return pth.join(self.path, EVAL)

    @property
    def wall_path(self) -> str:
        return pth.join(self.path, WALL_JSON)

    def step_path(self, step: int) -> str:
        return pth.join(self.checkpoints_path, str(int(step)))

    def checksum_path(self, step: int) -> str:
        return pth.join(self.path, CHECKSUMS, f"{int(step)}.json")

    @property
    def remote(self) -> bool:
        """On object storage (gs://...): train.paths."""
        return pth.is_remote(self.path)

    def exists(self) -> bool:
        return pth.isdir(self.path)

    def create(self) -> None:
        pth.makedirs(self.path)

    def _require(self) -> None:
        if not self.exists():
            raise FileNotFoundError(f"run directory {self.given!r} does not exist")

    # -- the resolved config
    def write_config(self, resolved) -> None:
        """Write the resolved config (a ConfigDict or its JSON form) as config.json."""
        from train import config as config_lib
        pth.makedirs(self.path)
        with pth.open_(self.config_path, "w") as f:
            f.write(json.dumps(config_lib.to_jsonable(resolved), indent=2, sort_keys=True))
        self._config = None

    def read_config(self) -> ml_collections.ConfigDict:
        """The resolved config of the run (config.json), read on the first call and kept."""
        if self._config is None:
            from train import config as config_lib
            self._require()
            if not pth.isfile(self.config_path):
                raise FileNotFoundError(f"{os.path.join(self.given, CONFIG_JSON)} not found: "
                                        "not a seqzoo run directory")
            where = os.path.join(self.given, CONFIG_JSON)
            try:
                with pth.open_(self.config_path, "r") as f:
                    d = json.loads(f.read())
            except ValueError as e:   # not JSON (a truncated or foreign file)
                raise ValueError(f"{where} is not valid JSON ({_why(e)})") from None
            sections = ("model", "data", "train", "mesh", "checkpoint", "eval")
            if not isinstance(d, dict) or not all(isinstance(d.get(k), dict) for k in sections):
                raise ValueError(f"{where} is not a seqzoo config (a JSON object with the "
                                 f"sections {', '.join(sections)})")
            if not isinstance(d["model"].get("name"), str):
                raise ValueError(f"{where} has no model.name")
            try:
                self._config = config_lib.from_jsonable(d)
            except (TypeError, ValueError, KeyError, AttributeError) as e:
                raise ValueError(f"{where} is not a seqzoo config ({_why(e)})") from None
        return self._config

    def model_config(self):
        """(model name, typed model config) of the run's config; ValueError (one line) when
        config.json does not describe a model this code builds."""
        from train import config as config_lib
        cfg = self.read_config()
        try:
            return config_lib.model_config_from(cfg)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"{os.path.join(self.given, CONFIG_JSON)}: the model section does "
                             f"not fit the code ({_why(e)})") from None

    # -- checkpoints
    def steps(self) -> list[int]:
        """Steps with a complete checkpoint, ascending ([] when none)."""
        self._require()
        d = self.checkpoints_path
        if not pth.isdir(d):
            return []
        # orbax writes a step under a temporary name and renames it when complete (on an
        # object store: a commit_success marker file)
        return sorted(int(n) for n in pth.listdir(d) if n.isdigit() and self._complete(pth.join(d, n)))

    def _complete(self, step_dir: str) -> bool:
        if not self.remote:
            return os.path.isdir(os.path.join(step_dir, STATE))
        return pth.isfile(pth.join(step_dir, "commit_success.txt"))

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    # -- integrity
    def seal(self) -> list[int]:
        """Write the checksums of every complete step that has none (call once the saves are
        committed: after `manager.wait_until_finished()`); drop those of pruned steps. Returns
        the steps sealed now."""
        steps = self.steps()
        pth.makedirs(pth.join(self.path, CHECKSUMS))
        sealed = []
        for st in steps:
            path = self.checksum_path(st)
            if not pth.isfile(path):
                tmp = path + ".tmp"
                with pth.open_(tmp, "w") as f:
                    f.write(json.dumps(_file_digests(self.step_path(st)), indent=0,
                                       sort_keys=True))
                pth.replace(tmp, path)
                sealed.append(st)
        checksums = pth.join(self.path, CHECKSUMS)
        for name in (pth.listdir(checksums) if pth.isdir(checksums) else []):
            stem = name.split(".")[0]
            if stem.isdigit() and int(stem) not in steps:
                pth.remove(pth.join(checksums, name))
        return sealed

    def is_sealed(self, step: int) -> bool:
        return pth.isfile(self.checksum_path(step))

    def verify(self, step: int) -> str | None:
        """What is wrong with a complete step's files against its checksums (None: nothing, or
        no checksums yet: a step killed between its commit and its seal)."""
        if not self.is_sealed(step):
            return None
        try:
            with pth.open_(self.checksum_path(step), "r") as f:
                want = json.loads(f.read())
        except (OSError, ValueError) as e:
            return f"its checksum file cannot be read ({_why(e)})"
        root = self.step_path(step)
        have = pth.file_sizes(root)
        for rel, (size, digest) in sorted(want.items()):
            if rel not in have:
                return f"{rel} is missing"
            if have[rel] != size:
                return f"{rel} has {have[rel]} bytes, {size} were written"
            if _sha256(pth.join(root, rel), size) != digest:
                return f"{rel} does not match its sha256"
        return None

    def quarantine(self, step: int) -> str:
        """Move a damaged step (and its checksums) to <run>/corrupt/<step>; returns the path."""
        dest = pth.join(self.path, CORRUPT, str(int(step)))
        n = 1
        while pth.exists(dest):
            dest = pth.join(self.path, CORRUPT, f"{int(step)}-{n}")
            n += 1
        pth.makedirs(pth.dirname(dest))
        pth.move(self.step_path(step), dest)
        if self.is_sealed(step):
            pth.move(self.checksum_path(step), pth.join(dest, "checksums.json"))
        return dest

    def probe_writable(self, need_bytes: int = 0) -> None:
        """OSError naming the directory when checkpoints/ cannot be written (a probe file is
        written and removed), or when its disk has fewer than `need_bytes` free."""
        d = self.checkpoints_path
        try:
            pth.makedirs(d)
            probe = pth.join(d, ".seqzoo-write-probe")
            with pth.open_(probe, "w") as f:
                f.write("probe")
            pth.remove(probe)
        except Exception as e:   # OSError locally; the object store's client errors remotely
            if not isinstance(e, OSError) and not self.remote:
                raise
            why = e.strerror if isinstance(e, OSError) and e.strerror else _why(e)
            raise OSError(f"checkpoint directory {pth.join(self.given, CHECKPOINTS)!r} is not "
                          f"writable ({why})") from None
        if self.remote:       # an object store has no free-space figure
            return
        free = shutil.disk_usage(d).free
        if need_bytes and free < need_bytes:
            raise OSError(f"checkpoint directory {os.path.join(self.given, CHECKPOINTS)!r} has "
                          f"{free / 2**20:.1f} MiB free; one checkpoint needs about "
                          f"{need_bytes / 2**20:.1f} MiB")

    def manager(self, *, keep: int = 3, async_save: bool = True, read_only: bool = False,
                ocdbt: bool = True) -> ocp.CheckpointManager:
        """The orbax CheckpointManager of checkpoints/ (created unless read_only). `ocdbt`:
        the state's arrays in orbax's OCDBT store (its default) or one zarr array each
        (checkpoint.ocdbt=False; restore reads either)."""
        import orbax.checkpoint as ocp
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=1, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only, create=not read_only, read_only=read_only)
        handlers = None if ocdbt else {STATE: ocp.StandardCheckpointHandler(use_ocdbt=False),
                                       CONFIG: ocp.JsonCheckpointHandler()}
        if handlers is not None:
            import grain
            handlers[DATA] = grain.checkpoint.CheckpointHandler()
        return ocp.CheckpointManager(self.checkpoints_path, options=options,
                                     item_handlers=handlers)

    def save(self, mngr: ocp.CheckpointManager, step: int, state: dict, cfg_json: dict,
             data_iter=None) -> None:
        """Save state + resolved config + grain iterator state as one step (async)."""
        import orbax.checkpoint as ocp
        items = {STATE: ocp.args.StandardSave(state), CONFIG: ocp.args.JsonSave(cfg_json)}
        if data_iter is not None:
            import grain
            items[DATA] = grain.checkpoint.CheckpointSave(data_iter)
        mngr.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, mngr: ocp.CheckpointManager, step: int, target: dict, data_iter=None) -> dict:
        """Restore "state" onto `target` (ShapeDtypeStructs with shardings) and the iterator in
        place. Entries of `target` the step did not save are left out of the result.

        The iterator state is read from this process's file `data/process_<i>-of-<n>.json`; when
        the checkpoint was written by a different number of processes, from process 0's file (the
        data package's iterator state is the number of global batches consumed, the same on every
        process, so it restores onto any process count)."""
        import jax
        import orbax.checkpoint as ocp

        from train import checkpoint as ckpt
        saved = ckpt.saved_tree_keys(pth.join(self.step_path(step), STATE))
        target = {k: v for k, v in target.items() if k in saved}   # older steps lack "guard"
        restored = mngr.restore(step, args=ocp.args.Composite(
            **{STATE: ocp.args.StandardRestore(target)}))
        if data_iter is not None:
            data_dir = pth.join(self.step_path(step), DATA)
            own = pth.join(data_dir, f"process_{jax.process_index()}-of-{jax.process_count()}.json")
            if not pth.isfile(own):
                own = pth.glob_(pth.join(data_dir, "process_0-of-*.json"))[0]
            with pth.open_(own, "r") as f:
                data_iter.set_state(json.loads(f.read()))
        return restored[STATE]

    def restore_params(self, step: int | None = None, mesh=None):
        """Restore only the parameters of a run onto the current devices.

        Returns (model_name, model_cfg, graphdef, params) with params a pure dict (use
        `nnx.merge(graphdef, params)` or the pure forms of zoo.lm). With `mesh`, parameters are
        sharded by the logical-axis rules (train.sharding.RULES); otherwise replicated on all
        devices. Raises FileNotFoundError for a missing run dir / checkpoint and ValueError for a
        checkpoint whose parameters do not fit the model the config builds (naming the first bad
        parameter).
        """
        import jax
        from flax import nnx
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from train import checkpoint as ckpt
        from train import config as config_lib
        from train import sharding as sharding_lib
        cfg = self.read_config()
        steps = self.steps()
        if not steps:
            raise FileNotFoundError(f"run directory {self.given!r} has no complete checkpoint")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(f"run directory {self.given!r} has no checkpoint at step "
                                    f"{step} (steps: {steps})")
        name, model_cfg = config_lib.model_config_from(cfg)
        graphdef, state = ckpt.abstract_model(name, model_cfg)
        if mesh is None:
            mesh = sharding_lib.make_mesh((1, 1, -1))
            shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), nnx.to_pure_dict(state))
        else:
            shardings = nnx.to_pure_dict(sharding_lib.param_shardings(state, mesh))
        problem = self.verify(step)
        if problem:
            raise CorruptCheckpoint(f"checkpoint step {step} of {self.given!r} is corrupt: {problem}")
        try:
            params = ckpt.restore_params_item(pth.join(self.step_path(step), STATE),
                                              nnx.to_pure_dict(state), shardings, model_name=name,
                                              where=self.step_path(step))
        except ckpt.ParamMismatch:
            raise
        except Exception as e:   # tensorstore / orbax on a damaged step that has no checksums
            raise CorruptCheckpoint(f"checkpoint step {step} of {self.given!r} cannot be read: "
                                    f"{_why(e)}") from None
        return name, model_cfg, graphdef, params

    # -- logs
    def metrics_writer(self, enabled: bool = True):
        """The writer of metrics.jsonl and tb/ (process 0 only: `enabled`)."""
        from train.metrics import MetricsWriter
        return MetricsWriter(self.metrics_path, self.tb_path, enabled=enabled)
