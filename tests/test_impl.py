"""The one implementation vocabulary (pallas_kernels/impl.py): parsing, per-op resolution, and
the rejection of an implementation an op lacks (there is no silent fallback)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import attention
from pallas_kernels.gated_delta import gated_delta
from pallas_kernels.impl import Impl, available, check, parse, resolve
from pallas_kernels.selective_scan import selective_scan
from pallas_kernels.ssd import ssd

OPS = ("attention", "gated_delta", "lssl", "neural_memory", "selective_scan", "ssd")


def test_parse_names_the_key():
    assert parse("chunked") is Impl.CHUNKED and parse(Impl.AUTO) is Impl.AUTO
    with pytest.raises(ValueError, match=r"^model\.impl='cuda' is not one of"):
        parse("cuda", key="model.impl")


@pytest.mark.parametrize("op", OPS)
def test_every_op_registers_reference_and_chunked(op):
    assert set(available(op)) >= {Impl.REFERENCE, Impl.CHUNKED}
    assert Impl.AUTO not in available(op)


def test_resolve_auto_runs_the_rule_and_rejects_what_the_op_lacks():
    assert resolve("ssd", "auto", auto=Impl.CHUNKED) is Impl.CHUNKED
    assert resolve("ssd", "auto", auto=lambda: Impl.REFERENCE) is Impl.REFERENCE
    assert resolve("ssd", "chunked", auto=Impl.REFERENCE) is Impl.CHUNKED
    if Impl.PALLAS not in available("ssd"):
        with pytest.raises(ValueError, match="ssd: impl='pallas' is not available"):
            resolve("ssd", "pallas", auto=Impl.REFERENCE)


def test_check_names_key_and_op():
    assert check("auto", OPS) is Impl.AUTO
    assert check("reference", OPS) is Impl.REFERENCE
    with pytest.raises(ValueError, match=r"^model\.impl='nope' is not one of"):
        check("nope", OPS)
    lacking = [op for op in OPS if Impl.PALLAS_INTERPRET not in available(op)]
    if lacking:
        with pytest.raises(ValueError, match=rf"model\.impl='pallas_interpret': op '{lacking[0]}'"):
            check("pallas_interpret", lacking)


def test_explicit_kernel_request_on_op_without_one_is_an_error():
    """Was a silent fallback to "chunked"; now every op without a kernel raises."""
    key = jax.random.split(jax.random.key(0), 8)
    B, T, H, d = 1, 5, 2, 4
    q = jax.random.normal(key[0], (B, T, H, d))
    x = jax.random.normal(key[1], (B, T, 6))
    dt = jax.nn.softplus(jax.random.normal(key[2], (B, T, 6)))
    A = -jnp.ones((6, 3))
    Bm = jax.random.normal(key[3], (B, T, 3))
    pos = jnp.arange(T)[None]
    grp, valid = jnp.zeros((B, T), jnp.int32), jnp.ones((B, T), bool)
    calls = {
        "attention": lambda impl: (attention(q, q, q, q_pos=pos, k_pos=pos, q_group=grp, k_group=grp,
                                             k_valid=valid, causal=True, impl=impl, block=2),),
        "gated_delta": lambda impl: gated_delta(q, q, q, -jnp.ones((B, T, H)), 0.5 * jnp.ones((B, T, H)),
                                                scale=1.0, impl=impl),
        "selective_scan": lambda impl: selective_scan(x, dt, A, Bm, Bm, impl=impl),
        "ssd": lambda impl: ssd(q, dt[..., :H], -jnp.ones((H,)), Bm[:, :, None], Bm[:, :, None],
                                impl=impl),
    }
    for op, call in calls.items():
        ref = call("reference")[0]
        np.testing.assert_allclose(call("chunked")[0], ref, atol=1e-5, rtol=1e-5, err_msg=op)
        for kernel in ("pallas", "pallas_interpret"):
            if Impl(kernel) not in available(op):
                with pytest.raises(ValueError, match=f"{op}: impl='{kernel}' is not available"):
                    call(kernel)
