"""Test setup: 8 virtual CPU devices before any JAX operation, absl flags parsed.

No persistent compilation cache: writing one segfaulted inside jax's `put_executable_and_time`
(serialising an XLA:CPU executable: Titans MAC's packed forward with its `lax.cond`) during a
clean-clone CI run here (jaxlib 0.10.2); the suite shares compiles in-process instead
(`functools.lru_cache` of built models and jitted steps)."""
import os

import jax

jax.config.update("jax_num_cpu_devices", 8)

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
os.environ.setdefault("MPLBACKEND", "Agg")
