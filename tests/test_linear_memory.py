"""Linear-memory ops and mixers (specs/mom.md §2.6, §2.8, §7).

* External truth: our `gla` (linear attention, normalised linear attention, GLA) and
  `gated_delta` (delta rule with g = 0, gated delta rule) equal flash-linear-attention's own
  naive PyTorch recurrences (tests/fixtures/fla/naive.npz, made by
  tests/fixtures/make_fla_fixtures.py), outputs and final states, in the reference AND chunked
  forms (block 4: no fixture length is a multiple of it).
* Invariants: DeltaNet == Gated DeltaNet with the decay switched off (A_log = -inf: g = 0);
  linear attention == GLA with zero decay; the mixers' chunked form == their reference form,
  forward and gradients (parameters and input), at T = 13 with block 4, with right padding and a
  document reset inside the call (linear attention with the normaliser, Gated DeltaNet).
The shared conformance suite checks the registered models (causality, prefill + continuation,
decode, resets, sharding).
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from asserts import assert_close
from flax import nnx

from layers.linear_memory import LinearMemoryMixer, normalized_linear_attention
from pallas_kernels.gated_delta import gated_delta as _gated_delta
from pallas_kernels.gla import gla as _gla

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "fla" / "naive.npz"
IMPLS = (("reference", {}), ("chunked", {"block": 4}))
gla = jax.jit(_gla, static_argnames=("scale", "impl", "block"))
gated_delta = jax.jit(_gated_delta, static_argnames=("scale", "impl", "block"))


@pytest.fixture(scope="module")
def fla():
    d = np.load(FIXTURE)
    assert str(d["fla_version"]) == "0.6.0" and str(d["torch_version"]).startswith("2.13.0")
    return lambda case: {k.split("/", 1)[1]: d[k] for k in d.files if k.startswith(case + "/")}


def _scale(c) -> float:
    return float(c["scale"])


@pytest.mark.parametrize("impl,kw", IMPLS)
def test_linear_attention_and_gla_equal_fla(fla, impl, kw):
    for case in ("linear_attn", "gla_11", "gla_21"):
        c = fla(case)
        o, S = gla(c["q"], c["k"], c["v"], c.get("g"), scale=_scale(c), initial_state=c["S0"],
                   impl=impl, **kw)
        assert_close((o, S), (c["o"], c["S"]), atol=2e-5, rtol=2e-5, what=f"{case} {impl}")


@pytest.mark.parametrize("impl,kw", IMPLS)
def test_normalized_linear_attention_equals_fla(fla, impl, kw):
    c = fla("linear_attn_norm")
    z0 = c["z0"][:, 0][..., None]                                      # [B, H, dk, 1]
    S0 = np.concatenate([c["S0"], z0], -1)
    o, S = jax.jit(normalized_linear_attention, static_argnames=("scale", "impl", "block"))(
        c["q"], c["k"], c["v"], None, scale=_scale(c), initial_state=S0, impl=impl, **kw)
    assert_close((o, S[..., :-1], S[..., -1]), (c["o"], c["S"], c["z"][:, 0]), atol=2e-5,
                 rtol=2e-5, what=impl)


@pytest.mark.parametrize("impl,kw", IMPLS)
def test_delta_rules_equal_fla(fla, impl, kw):
    for case in ("delta", "gdn_11", "gdn_21"):
        c = fla(case)
        g = c["g"] if "g" in c else np.zeros_like(c["beta"])           # DeltaNet: g = 0
        o, S = gated_delta(c["q"], c["k"], c["v"], g, c["beta"], scale=_scale(c),
                           initial_state=c["S0"], impl=impl, **kw)
        assert_close((o, S), (c["o"], c["S"]), atol=2e-5, rtol=2e-5, what=f"{case} {impl}")


# ----------------------------------------------------------------------------- mixers

D, H, DK, DV, T = 16, 2, 8, 8, 13


def _mixer(kind, **kw):
    args = dict(kind=kind, n_heads=H, head_dim_k=DK, head_dim_v=DV, impl="reference", block=4)
    return LinearMemoryMixer(D, rngs=nnx.Rngs(params=0), **{**args, **kw})


def _x(seed=1, B=2):
    return jax.random.normal(jax.random.key(seed), (B, T, D), jnp.float32)


def _copy_shared(src: nnx.Module, dst: nnx.Module):
    """Assign every parameter of `dst` from the one of the same path in `src`."""
    s = dict(nnx.to_flat_state(nnx.state(src, nnx.Param)))
    for path, var in nnx.to_flat_state(nnx.state(dst, nnx.Param)):
        var[...] = s[path][...]


def test_deltanet_is_gated_deltanet_without_decay():
    gdn = _mixer("gated_deltanet", output_gate=True)
    gdn.A_log[...] = jnp.full((H,), -jnp.inf)                           # g = -0 * softplus = 0
    dn = _mixer("deltanet", output_gate=True)
    _copy_shared(gdn, dn)
    x = _x()
    y1, s1, _ = gdn(x)
    y2, s2, _ = dn(x)
    assert_close((y1, s1.memory), (y2, s2.memory), atol=1e-6, rtol=1e-6)


def test_linear_attention_is_gla_with_zero_decay():
    g = _mixer("gla", conv_size=4, output_gate=True)
    g.gk_up.weight[...] = jnp.zeros_like(g.gk_up.weight[...])
    g.gk_up.bias[...] = jnp.full_like(g.gk_up.bias[...], 1e4)         # logsigmoid(1e4) == 0
    la = _mixer("linear_attention", conv_size=4, output_gate=True)
    _copy_shared(g, la)
    x = _x()
    y1, s1, _ = g(x)
    y2, s2, _ = la(x)
    assert_close((y1, s1.memory), (y2, s2.memory), atol=1e-6, rtol=1e-6)


# linear attention (no decay: resets pass their own; the normaliser column) and Gated DeltaNet
# (the delta op with a decay); GLA's per-key decay and DeltaNet's g = 0 differ only inside the
# ops, whose gradients tests/test_gla.py and tests/test_gated_delta.py check
@pytest.mark.parametrize("kind,kw", [("linear_attention", dict(feature_map="elu1", normalize=True,
                                                               conv_size=4)),
                                     ("gated_deltanet", {})])
def test_chunked_equals_reference_with_resets_forward_and_gradients(kind, kw):
    m = _mixer(kind, **kw)
    graphdef, params = nnx.split(m)
    x = _x(2)
    mask = jnp.arange(T)[None, :] < jnp.array([[T], [T - 3]])
    seg = (jnp.arange(T)[None, :] >= jnp.array([[5], [8]])).astype(jnp.int32)
    w = jax.random.normal(jax.random.key(3), (2, T, D))

    def run(impl, params, x):
        mod = nnx.merge(graphdef, params)
        mod.impl = impl
        y, s, _ = mod(x, mask=mask, segment_ids=seg)
        y = jnp.where(mask[..., None], y, 0.0)
        return jnp.sum(y * w) + jnp.sum(jnp.sin(s.memory)), (y, s)

    out = {}
    for impl in ("reference", "chunked"):
        out[impl] = jax.jit(jax.grad(lambda p, x, impl=impl: run(impl, p, x), argnums=(0, 1),
                                     has_aux=True))(params, x)
    (g_c, (y_c, s_c)), (g_r, (y_r, s_r)) = out["chunked"], out["reference"]
    assert_close((y_c, s_c), (y_r, s_r), atol=1e-5, rtol=1e-5, what="forward")
    assert_close(g_c, g_r, atol=1e-4, rtol=1e-4, what="gradients")
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(g_r))

