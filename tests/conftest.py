"""Test setup: 8 virtual CPU devices before any JAX operation, absl flags parsed, a persistent
compilation cache inside the repository (git-ignored)."""
import os
import pathlib

import jax

jax.config.update("jax_num_cpu_devices", 8)
_cache = pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"
jax.config.update("jax_compilation_cache_dir", str(_cache))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
os.environ.setdefault("MPLBACKEND", "Agg")
