"""Fuzzed inputs (issue 16 item 6): the `--config.x=...` override parser, the config resolver (what
a JSON config or a config file can hold), a run directory's config.json, and the data readers get
hypothesis-generated input; nothing but the clean errors comes out (one line naming the key or
file; exit code 2 from the command line). Derandomised: CI sees the same examples every run."""
import contextlib
import io
import json
import os

import ml_collections
import numpy as np
import pytest
from absl import flags
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from train import __main__ as train_main
from train import config as C
from train import data
from train.rundir import RunDir

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

_DEFAULT = C.default_config()
KEYS = [f"{s}.{k}" for s in ("model", "data", "train", "mesh", "checkpoint", "eval")
        for k in _DEFAULT[s].keys() if k != "aux_weights"]
# the data sources that read nothing from disk (file sources are fuzzed below)
SAFE_KEYS = [k for k in KEYS if k not in ("data.path", "data.needle_haystack_path",
                                          "checkpoint.dir", "train.compilation_cache_dir")]

scalars = st.one_of(st.integers(-2**40, 2**40), st.floats(allow_nan=True, allow_infinity=True),
                    st.booleans(), st.text(max_size=12), st.none(),
                    st.sampled_from(["mqar", "text", "tokens", "transformer", "mamba", "stop",
                                     "skip", "auto", "-1", "0", "1e-3", "(1, 1, 1)", "[8]"]))
values = st.one_of(scalars, st.lists(st.integers(-4, 16), max_size=4),
                   st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


def _one_line(msg: str) -> bool:
    return bool(msg.strip()) and "\n" not in msg.strip() and "Traceback" not in msg


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(SAFE_KEYS + ["train.nope", "model", "x.y.z"]),
                          st.one_of(st.text(max_size=16), scalars.map(str))),
                min_size=1, max_size=3))
def test_override_parser(overrides):
    argv = ["train"] + [f"--config.{k}={v}" for k, v in overrides]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            train_main.parse_flags(argv, flag_values=flags.FlagValues())
            C.resolve(train_main._CONFIG.value)
        except SystemExit as e:
            assert e.code == 2, err.getvalue()
            assert _one_line(err.getvalue()) and err.getvalue().startswith("config error: ")
        except C.ConfigError as e:
            assert _one_line(str(e))


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(SAFE_KEYS + ["train.aux_weights"]), values),
                min_size=1, max_size=3))
def test_resolve_takes_any_values(changes):
    d = C.default_config().to_dict()
    for key, v in changes:
        sec, k = key.split(".", 1)
        d[sec][k] = v
    try:
        C.resolve(ml_collections.ConfigDict(d))
    except C.ConfigError as e:
        assert _one_line(str(e)), str(e)


@FUZZ
@given(st.one_of(st.binary(max_size=64), st.text(max_size=64).map(str.encode),
                 st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                           st.dictionaries(st.text(max_size=6), c,
                                                                           max_size=3)),
                              max_leaves=8).map(lambda x: json.dumps(x).encode())))
def test_run_config_json(tmp_path_factory, payload):
    run = tmp_path_factory.mktemp("run")
    (run / "config.json").write_bytes(payload)
    try:
        RunDir(run).model_config()
    except ValueError as e:          # what eval's plan_runs turns into its one line
        assert _one_line(str(e)), str(e)


@pytest.fixture(scope="module")
def files_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@FUZZ
@given(kind=st.sampled_from(["text", "npy", "bin"]), payload=st.binary(max_size=400),
       dtype=st.sampled_from(["uint16", "int32", "uint8", "int64"]),
       vocab=st.integers(1, 70000), seq_len=st.integers(1, 40))
def test_data_readers(files_dir, kind, payload, dtype, vocab, seq_len):
    path = os.path.join(files_dir, f"f.{'txt' if kind == 'text' else kind}")
    if kind == "npy" and payload[:1] == b"\x00":   # half the .npy files are real arrays
        arr = np.frombuffer(payload[1:len(payload) - (len(payload) - 1) % 4], np.int32)
        np.save(path, arr)
    else:
        with open(path, "wb") as f:
            f.write(payload)
    cfg = data.data_defaults()
    cfg.source = "text" if kind == "text" else "tokens"
    cfg.path, cfg.dtype, cfg.seq_len, cfg.vocab_size = path, dtype, seq_len, vocab
    try:
        data.validate(cfg)
        batch = next(data.make_iterator(cfg, split="train", global_batch=2, seed=0))
        assert batch["inputs"].shape == (2, seq_len)
        assert batch["inputs"].min() >= 0 and batch["inputs"].max() < data.vocab_size(cfg)
    except ValueError as e:
        msg = str(e)
        assert _one_line(msg) and msg.startswith("data."), msg
