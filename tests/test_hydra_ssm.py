"""Hydra's SSM path (layers/hydra_ssm.py; specs/hydra.md §2.2, §7.1-7.2): the associative scan
== a token loop written here (carried state, document start, pads), the Mamba correspondence
through the selective_scan op (N = 1, A = −λ, input B U / Δ, read before the update), the
geometric decay with no input, y_0 = x_0 W_skip from a zero state, prefill + continue, and the
parameter count."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from asserts import assert_close
from flax import nnx

from layers.hydra_ssm import HydraSSM, hydra_ssm_params
from pallas_kernels.diag_scan import diag_scan
from pallas_kernels.selective_scan import selective_scan

D = 6


def _ssm():
    return HydraSSM(D, rngs=nnx.Rngs(params=0), init_std=0.5)


def _x(T=11):
    return jax.random.normal(jax.random.key(1), (2, T, D))


def test_scan_equals_the_token_loop_with_state_resets_and_pads():
    ssm = _ssm()
    x = _x()
    s0 = jax.random.normal(jax.random.key(2), (2, D))
    seg = jnp.asarray(np.where(np.arange(11) < 5, 0, 1)[None].repeat(2, 0))
    mask = jnp.asarray(np.arange(11)[None] < np.array([[11], [8]]))
    st = ssm.init_state(2).replace(s=s0)
    y, new, _ = nnx.jit(lambda m, x, st, s, mk: m(x, st, segment_ids=s, mask=mk))(ssm, x, st, seg, mask)
    alpha, inp, c = ssm.gates(x)
    skip = ssm.w_skip(x)
    for b in range(2):
        s = s0[b]
        for t in range(11):
            if not bool(mask[b, t]):
                continue
            if t == 5:
                s = jnp.zeros(D)
            np.testing.assert_allclose(y[b, t], c[b, t] * s + skip[b, t], rtol=1e-5, atol=1e-5)
            s = alpha[b, t] * s + inp[b, t]
        np.testing.assert_allclose(new.s[b], s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [1, 13, 40])
def test_chunked_scan_equals_the_reference_forward_and_gradients(T):
    """The diag_scan op's chunked form (block 8: T = 13 and 40 leave ragged chunks) == its token
    loop, outputs, final state and gradients, with a carried state and resets."""
    k = jax.random.split(jax.random.key(3), 4)
    alpha = jax.nn.sigmoid(jax.random.normal(k[0], (2, T, D)))
    inp = jax.random.normal(k[1], (2, T, D))
    s0 = jax.random.normal(k[2], (2, D))
    reset = jax.random.uniform(k[3], (2, T)) < 0.15

    def f(impl):
        def loss(alpha, inp, s0):
            s, fin = diag_scan(alpha, inp, s0, reset, impl=impl, block=8)
            return jnp.sum(jnp.sin(s)) + jnp.sum(fin ** 2), (s, fin)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(alpha, inp, s0)

    (_, ref), g_ref = f("reference")
    (_, got), g = f("chunked")
    assert_close(got, ref, atol=1e-5, rtol=1e-5, what="chunked scan")
    assert_close(g, g_ref, atol=1e-4, rtol=1e-4, what="chunked scan gradients")


def test_mamba_correspondence_through_the_selective_scan_op():
    """Hydra's scan is Mamba's with N = 1, A = −λ, Δ = softplus(Δ_t), input B_t U_t (given to
    the op as x = B U / Δ to undo its Δ-scaling, B = C = 1) and the read one step earlier."""
    ssm = _ssm()
    x = _x()
    d = D
    p = ssm.w_param(x)
    dt = jax.nn.softplus(p[..., :d])
    inp = p[..., d:2 * d] * p[..., 3 * d:]
    lam = jax.nn.softplus(ssm.lam_base[...])
    ones = jnp.ones((2, 11, 1))
    h, _ = selective_scan(inp / dt, dt, -lam[:, None], ones, ones, impl="reference")
    alpha, inp2, _ = ssm.gates(x)
    s, _ = diag_scan(alpha, inp2, jnp.zeros((2, d)), jnp.zeros((2, 11), bool))
    assert_close(s[:, 1:], h[:, :-1], atol=1e-5, rtol=1e-5, what="exclusive = shifted Mamba")


def test_decay_without_input_and_the_first_output():
    ssm = _ssm()
    alpha = jnp.full((1, 6, D), 0.5)
    s, final = diag_scan(alpha, jnp.zeros((1, 6, D)), jnp.ones((1, D)), jnp.zeros((1, 6), bool))
    np.testing.assert_allclose(s[0, :, 0], 0.5 ** np.arange(6), rtol=1e-6)
    np.testing.assert_allclose(final[0, 0], 0.5 ** 6, rtol=1e-6)
    x = _x()
    np.testing.assert_allclose(ssm(x)[0][:, 0], ssm.w_skip(x)[:, 0], rtol=1e-6, atol=1e-6)


def test_prefill_continue_and_parameter_count():
    ssm = _ssm()
    x = _x()
    full = ssm(x)[0]
    a, st, _ = ssm(x[:, :4])
    b, _, _ = ssm(x[:, 4:], st)
    assert_close(jnp.concatenate([a, b], 1), full, atol=1e-5, rtol=1e-5, what="prefill + continue")
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(ssm, nnx.Param)))
    assert n == hydra_ssm_params(D)
    lam = jax.nn.softplus(ssm.lam_base[...])
    assert float(lam.min()) >= 1e-3 * 0.999 and float(lam.max()) <= 1.0 * 1.001
