"""`python -m train [--config=configs/<file>.py[:variant]] [--config.<section>.<key>=value ...]`

With no --config the built-in default runs (train.config.default_config(): MQAR, 8 key-value
pairs in 64 tokens, vocabulary 128, a 2-layer attention-only Transformer, dim 128). A bad config (unknown key,
impossible value, missing file, an unwritable or full checkpoint directory) prints one line and
exits with status 2 before anything compiles; a run stopped by a fault (train.nonfinite=stop, a
final checkpoint that could not be written) prints one line and exits with status 3.

The config file is executed once (here, before absl parses the flags; the --config.* overrides
are then applied by ml_collections to that config) and the config is resolved once, before JAX
starts; only its device-dependent part (`config.fit_devices`) waits for the devices.
"""
from __future__ import annotations

import re
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = None   # the config flag, defined by parse_flags around the loaded config


def _fail(msg: str) -> None:
    print(f"config error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def _unknown_override(argv, base) -> str | None:
    """The first --config.a.b=... override naming a key the loaded config lacks."""
    for a in argv:
        m = re.match(r"--config\.([\w.]+)(=|$)", a)
        if not m:
            continue
        node = base
        for part in m.group(1).split("."):
            if hasattr(node, "keys") and part in node:
                node = node[part]
            else:
                return m.group(1)
    return None


def _load(arg: str):
    path, _, variant = arg.partition(":")
    import importlib.util
    import os
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    spec = importlib.util.spec_from_file_location("_seqzoo_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(variant) if variant else mod.get_config()


def _normalise(argv):
    """`--config path` -> `--config=path` (absl accepts both; the checks below read one form)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--config" and i + 1 < len(argv):
            out.append(f"--config={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def parse_flags(argv, flag_values=None):
    """absl's flags parser for `app.run`: the config file loaded once, then its overrides.
    `flag_values` (default absl's global FLAGS) lets the fuzz tests parse many command lines."""
    global _CONFIG
    fv = flags.FLAGS if flag_values is None else flag_values
    argv = _normalise(argv)
    cfg_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if cfg_arg is not None:
        path = cfg_arg.partition(":")[0]
        import os
        if not os.path.isfile(path):
            _fail(f"--config: file {path!r} not found")
        try:
            cfg = _load(cfg_arg)
        except Exception as e:  # a get_config that rejects its variant, a syntax error, ...
            _fail(f"--config={cfg_arg}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        # the loaded config takes the flag's place: overrides apply to it, nothing re-executes it
        argv = [a for a in argv if not a.startswith("--config=")]
    else:
        from train import config as config_lib
        cfg = config_lib.default_config()
    bad = _unknown_override(argv, cfg)
    if bad is not None:
        _fail(f"unknown config key {bad}")
    try:
        _CONFIG = config_flags.DEFINE_config_dict(
            "config", cfg, "ml_collections config file (configs/<file>.py[:variant]); default: "
            "built-in", flag_values=fv, lock_config=True, sys_argv=argv)
        return fv(argv)
    except flags.Error as e:
        _fail(str(e).splitlines()[0])
    except (AttributeError, KeyError, ValueError, TypeError) as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


def main(argv) -> None:
    del argv
    from absl import logging
    logging.set_verbosity(logging.WARNING)   # orbax and grain log every save at INFO
    from train import config as config_lib
    # validate everything before JAX starts (no device needed)
    try:
        cfg, model_cfg = config_lib.resolve(_CONFIG.value)
    except config_lib.ConfigError as e:
        _fail(str(e))
    from train import distributed
    distributed.setup(cfg)
    import jax

    from train import faults, trainer
    try:
        config_lib.fit_devices(cfg, jax.device_count())
        trainer.Trainer(cfg, model_cfg).run()
    except config_lib.ConfigError as e:
        _fail(str(e))
    except faults.TrainingFault as e:   # a non-finite step, a disk that failed: nothing lost
        print(f"train: stopped: {e}", file=sys.stderr, flush=True)
        sys.exit(3)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
