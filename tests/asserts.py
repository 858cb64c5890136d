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


def assert_kernel_calls(fwd, grad, tpu_fwd, tpu_grad, tpu_args, gpu_fwd, gpu_grad, gpu_args,
                        small_args) -> None:
    """A kernel's forward and its gradient are Pallas calls that cannot be a fallback: one
    `pallas_call` in the forward's jaxpr and two in the gradient's (the forward with residuals,
    the backward), as many `tpu_custom_call`s in the TPU export and Triton calls in the CUDA
    lowering. `fwd`/`grad` are the interpret-mode functions (on `small_args`), `tpu_*`/`gpu_*`
    the same built for those backends."""
    assert str(jax.make_jaxpr(fwd)(*small_args)).count("pallas_call") == 1
    assert str(jax.make_jaxpr(grad)(*small_args)).count("pallas_call") == 2
    for fn, n in ((tpu_fwd, 1), (tpu_grad, 2)):
        text = jax.export.export(jax.jit(fn), platforms=["tpu"])(*tpu_args)
        assert text.mlir_module().count("stablehlo.custom_call @tpu_custom_call") == n
    for fn, n in ((gpu_fwd, 1), (gpu_grad, 2)):
        text = jax.jit(fn).trace(*gpu_args).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == n
