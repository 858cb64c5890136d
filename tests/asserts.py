"""The one closeness assertion of the test suite: arrays or pytrees of arrays, with the path of
the first leaf that differs in the message."""
from __future__ import annotations

import jax
import numpy as np


def assert_close(actual, desired, *, atol: float = 1e-6, rtol: float = 1e-6, what: str = "") -> None:
    """`np.testing.assert_allclose` on every leaf of two pytrees of the same structure."""
    a_leaves, a_def = jax.tree_util.tree_flatten_with_path(actual)
    d_leaves, d_def = jax.tree_util.tree_flatten_with_path(desired)
    assert a_def == d_def, f"{what}: tree structures differ:\n{a_def}\n{d_def}"
    for (path, a), (_, d) in zip(a_leaves, d_leaves):
        where = jax.tree_util.keystr(path)
        np.testing.assert_allclose(np.asarray(a), np.asarray(d), atol=atol, rtol=rtol,
                                   err_msg=f"{what}{': ' if what and where else ''}{where}")
