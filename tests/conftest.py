"""Test setup: 8 virtual CPU devices before any JAX operation, absl flags parsed, XLA's backend
at optimisation level 0 and its classic CPU emitters (below).

No persistent compilation cache: writing one segfaulted inside jax's `put_executable_and_time`
(serialising an XLA:CPU executable: Titans MAC's packed forward with its `lax.cond`) during a
clean-clone CI run here (jaxlib 0.10.2); the suite shares compiles in-process instead
(`functools.lru_cache` of built models and jitted steps)."""
import os

# XLA's backend (LLVM) at optimisation level 0: the suite is compile-bound (tiny shapes, hundreds
# of distinct programs), and level 0 compiles faster while the tests' programs run no slower that
# matters. Measured on the 2-core CPU: titans_lmm's conformance 82 -> 57 s (CPU 120 -> 74 s),
# tests/test_train_optim.py 67 -> 46 s. Every assertion compares programs compiled the same way
# or against committed fixtures, at unchanged tolerances. The subprocesses that tests start
# (`python -m train`, the two-process run) inherit it.
# XLA:CPU's newer MLIR fusion emitters off (`--xla_cpu_use_fusion_emitters=false`: the classic
# LLVM-IR emitters): compiling Titans MAC's chunked value-and-grad step 10.5 -> 5.0 s, its whole
# conformance set about 2x faster (measured; same assertions, same tolerances).
for _flag in ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_configure(config):
    """The fast allocator (train/allocator.py): before any test runs or any xdist worker starts,
    the suite re-executes itself once with tcmalloc preloaded where it is installed; workers and
    the subprocesses tests start inherit it. pytest's output capture is stopped first, else the
    new process would write into the old one's capture files."""
    from train import allocator

    if allocator.wants_reexec():
        capture = config.pluginmanager.getplugin("capturemanager")
        if capture is not None:
            capture.stop_global_capturing()
        allocator.ensure()


def pytest_report_header(config):
    from train import allocator

    return f"allocator: {allocator.name()}"


def pytest_collection_modifyitems(items):
    """Under pytest-xdist's `--dist loadgroup`, keep one model's conformance tests on one worker so
    they share that model's cached builds and compiled steps (`test_conformance`'s lru_caches);
    every other test file stays together as its own group (its module fixtures compile once)."""
    import pytest

    for item in items:
        callspec = getattr(item, "callspec", None)
        if item.module.__name__.endswith("test_conformance") and callspec is not None:
            group = f"conformance-{callspec.params.get('name')}"
        else:
            group = item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))
