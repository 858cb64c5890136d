"""GAM (specs/gam.md): the §9 invariants beyond the shared conformance suite, and the whole model
against a float64 NumPy transcription of the official `gam_model.py` (test-only maths).

One tiny config (D 16, S 10 slots, k 3, N 2, T 13); every model-level check shares one compiled
forward (parameters are arguments, so edited weights reuse it).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from asserts import assert_close
from flax import nnx

import zoo
from layers.common import count_params
from layers.conv import causal_conv1d
from layers.gam import GAMMixer, memory_read
from zoo.gam import PRESETS, GAMConfig, gam_param_count

CFG = GAMConfig(vocab_size=37, dim=16, n_layers=2, n_slots=10, kernel_size=3, max_len=32)
T = 13


@functools.lru_cache(maxsize=None)
def compiled(cfg: GAMConfig = CFG):
    """(graph definition, parameters, jitted forward) of one build: built and compiled once."""
    graphdef, params = nnx.split(zoo.build("gam", cfg, rngs=0))
    return graphdef, params, jax.jit(lambda p, x: zoo.lm.forward(graphdef, p, x)[0])


def model_and_forward(cfg: GAMConfig = CFG):
    """A fresh model (its weights may be edited) and the shared forward of (model, tokens)."""
    graphdef, params, fwd = compiled(cfg)
    fresh = jax.tree.map(jnp.array, params)   # new leaves: edits stay in this model
    return nnx.merge(graphdef, fresh), lambda m, x: np.asarray(fwd(nnx.split(m)[1], x))


def tokens(batch: int, seed: int = 0, length: int = T) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, CFG.vocab_size, jnp.int32)


# ----------------------------------------------------------------------------- NumPy reference

def _ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def _torch_causal_conv(x, w, b):
    """PyTorch Conv1d(groups=D, padding=k-1) over [B, D, T], first T outputs kept (§3.2)."""
    B, T_, D = x.shape
    k = w.shape[1]
    xp = np.pad(x, ((0, 0), (k - 1, k - 1), (0, 0)))
    full = np.stack([sum(xp[:, s + j] * w[:, j] for j in range(k)) + b
                     for s in range(T_ + k - 1)], axis=1)
    return full[:, :T_]


def reference_logits(model, tok) -> np.ndarray:
    """`GAM_Model.forward` of the official code (specs/gam.md §3-4), float64, dropout off."""
    f = lambda v: np.asarray(v[...], np.float64)
    tok = np.asarray(tok)
    E = f(model.embed.embedding)
    h = E[tok] + f(model.positions.table)[np.arange(tok.shape[1])]
    for blk in model.blocks:
        mx = blk.mixer
        x = _ln(h, f(blk.norm1.weight), f(blk.norm1.bias))
        local = _torch_causal_conv(x, f(mx.conv.weight), f(mx.conv.bias))
        M = f(mx.memory)
        s = x @ M.T
        a = np.exp(s - s.max(-1, keepdims=True))
        glob = (a / a.sum(-1, keepdims=True)) @ M
        g = x @ f(mx.gate.weight) + f(mx.gate.bias)
        D = x.shape[-1]
        sig = lambda z: 1.0 / (1.0 + np.exp(-z))
        h = h + sig(g[..., :D]) * local + sig(g[..., D:]) * glob
        y = _ln(h, f(blk.norm2.weight), f(blk.norm2.bias)) @ f(blk.ffn.fc1.weight) + f(blk.ffn.fc1.bias)
        y = 0.5 * y * (1.0 + np.vectorize(math.erf)(y / math.sqrt(2.0)))
        h = h + y @ f(blk.ffn.fc2.weight) + f(blk.ffn.fc2.bias)
    return _ln(h, f(model.final_norm.weight), f(model.final_norm.bias)) @ E.T


def test_model_equals_official_code_transcription():
    model, fwd = model_and_forward()
    x = tokens(2)
    assert_close(fwd(model, x), reference_logits(model, x), atol=2e-5, rtol=1e-4,
                 what="GAM logits vs gam_model.py (float64)")


def test_conv_orientation_last_tap_is_current_token():
    """w[:, k-1] multiplies the current input, w[:, 0] the oldest (§3.2, §8.2)."""
    x = jax.random.normal(jax.random.key(1), (1, 7, 4))
    for tap, lag in ((2, 0), (0, 2)):
        w = jnp.zeros((4, 3)).at[:, tap].set(1.0)
        y, _ = causal_conv1d(x, w, None)
        want = jnp.pad(x, ((0, 0), (lag, 0), (0, 0)))[:, :7]
        assert_close(y, want, atol=0, rtol=0, what=f"tap {tap}")


# ----------------------------------------------------------------------------- §9.2 receptive field

def test_receptive_field_is_exactly_n_times_k_minus_1():
    """Changing token s moves the logits at s..s+N(k-1) and leaves every later one bit-identical:
    the memory is static, so nothing carries the token beyond the conv's reach (§3.1, §9.2)."""
    model, fwd = model_and_forward()
    reach = CFG.receptive_field - 1
    assert reach == CFG.n_layers * (CFG.kernel_size - 1) == 4
    x = tokens(2, seed=3)
    s = 3
    y = x.at[:, s].set((x[:, s] + 5) % CFG.vocab_size)
    a, b = fwd(model, x), fwd(model, y)
    np.testing.assert_array_equal(a[:, :s], b[:, :s])
    np.testing.assert_array_equal(a[:, s + reach + 1:], b[:, s + reach + 1:])
    for t in range(s, s + reach + 1):
        assert np.abs(a[:, t] - b[:, t]).max() > 1e-6, f"position {t} inside the reach unchanged"


def test_beyond_the_conv_only_the_memory_path_sees_a_token_and_only_at_its_own_position():
    """Local gates closed (b_loc = -inf): the conv contributes nothing, and a changed token moves
    only its own position's logits: the memory path reads one token at a time (§3.1)."""
    model, fwd = model_and_forward()
    for blk in model.blocks:
        gate = blk.mixer.gate
        gate.bias[...] = gate.bias[...].at[:CFG.dim].set(-jnp.inf)
    x = tokens(2, seed=4)
    s = 5
    y = x.at[:, s].set((x[:, s] + 3) % CFG.vocab_size)
    a, b = fwd(model, x), fwd(model, y)
    keep = np.arange(T) != s
    np.testing.assert_array_equal(a[:, keep], b[:, keep])
    assert np.abs(a[:, s] - b[:, s]).max() > 1e-4


# ----------------------------------------------------------------------------- §9.3-9.5 the mixer

def mixers():
    """Mixers of every fusion sharing the gated one's conv and memory parameters."""
    D, S = CFG.dim, CFG.n_slots
    out = {f: GAMMixer(D, rngs=nnx.Rngs(params=7), n_slots=S, fusion=f)
           for f in ("gated", "sum", "local", "global")}
    g = out["gated"]
    for f in ("sum", "local"):
        out[f].conv.weight[...], out[f].conv.bias[...] = g.conv.weight[...], g.conv.bias[...]
    for f in ("sum", "global"):
        out[f].memory[...] = g.memory[...]
    return out


def _x(seed=5):
    return jax.random.normal(jax.random.key(seed), (2, T, CFG.dim))


def test_memory_read_is_a_convex_combination_of_the_slots():
    M = jax.random.normal(jax.random.key(0), (CFG.n_slots, CFG.dim))
    x = 3.0 * _x()
    read = jax.jit(memory_read, static_argnames=("scale", "impl"))
    g = read(x, M, impl="reference")
    A = jax.nn.softmax(jnp.einsum("btd,sd->bts", x, M), axis=-1)
    assert_close(A.sum(-1), np.ones((2, T)), atol=1e-6, rtol=0, what="rows of A")
    assert_close(g, jnp.einsum("bts,sd->btd", A, M), atol=1e-5, rtol=1e-5, what="g = A M")
    assert np.all(g >= M.min(0) - 1e-6) and np.all(g <= M.max(0) + 1e-6)
    row = jnp.broadcast_to(M[0], M.shape)
    assert_close(read(x, row, impl="reference"), np.broadcast_to(M[0], g.shape), atol=1e-6, rtol=1e-6,
                 what="equal slots: constant read")
    scaled = read(x, M, scale=CFG.dim ** -0.5, impl="reference")
    A = jax.nn.softmax(jnp.einsum("btd,sd->bts", x, M) / CFG.dim ** 0.5, axis=-1)
    assert_close(scaled, jnp.einsum("bts,sd->btd", A, M), atol=1e-5, rtol=1e-5, what="1/sqrt(D)")


def test_chunked_memory_read_equals_reference_forward_and_gradient():
    """Slot blocks of 4 over 10 slots (not a multiple), forward and gradients."""
    M = jax.random.normal(jax.random.key(2), (CFG.n_slots, CFG.dim))
    x = 2.0 * _x(6)
    loss = lambda impl: lambda x, M: jnp.sum(jnp.sin(memory_read(x, M, impl=impl, block=4)))
    ref = jax.jit(jax.value_and_grad(loss("reference"), argnums=(0, 1)))(x, M)
    fast = jax.jit(jax.value_and_grad(loss("chunked"), argnums=(0, 1)))(x, M)
    assert_close(fast, ref, atol=1e-5, rtol=1e-5, what="chunked memory read")


def test_zero_gates_give_half_the_sum_and_closed_gates_give_one_path():
    """W_g = b_g = 0: c = 0.5 (l + g) (§9.4); a gate's logits at -inf leave the other path times
    its own gate (§9.5)."""
    ms, x = mixers(), _x()
    g = ms["gated"]
    run = lambda m: np.asarray(m(x)[0])
    a = np.asarray(jnp.einsum("btd,de->bte", x, g.gate.weight[...]) + g.gate.bias[...])
    sig = 1.0 / (1.0 + np.exp(-a))
    D = CFG.dim
    w, b = g.gate.weight[...], g.gate.bias[...]
    g.gate.bias[...] = b.at[D:].set(-jnp.inf)
    assert_close(run(g), sig[..., :D] * run(ms["local"]), atol=1e-6, rtol=1e-5, what="local only")
    g.gate.bias[...] = b.at[:D].set(-jnp.inf)
    assert_close(run(g), sig[..., D:] * run(ms["global"]), atol=1e-6, rtol=1e-5,
                 what="global only")
    g.gate.weight[...], g.gate.bias[...] = jnp.zeros_like(w), jnp.zeros_like(b)
    assert_close(run(g), 0.5 * run(ms["sum"]), atol=1e-6, rtol=1e-5, what="zero gates")
    assert 0 < sig.min() and sig.max() < 1


def test_position_only_model_when_both_gates_are_closed():
    """W_g = 0, b_g = -inf: every block is h + FFN(LN(h)) per position, so the logits at t depend
    on (token_t, t) only (§9.8)."""
    model, fwd = model_and_forward()
    for blk in model.blocks:
        blk.mixer.gate.weight[...] = jnp.zeros_like(blk.mixer.gate.weight[...])
        blk.mixer.gate.bias[...] = jnp.full_like(blk.mixer.gate.bias[...], -jnp.inf)
    x, y = tokens(2, seed=7), tokens(2, seed=8)
    y = y.at[:, 6].set(x[:, 6])
    a, b = fwd(model, x), fwd(model, y)
    np.testing.assert_array_equal(a[:, 6], b[:, 6])
    assert np.abs(a[:, 5] - b[:, 5]).max() > 1e-4


# ----------------------------------------------------------------------------- §9.6 decode

def test_step_decode_equals_parallel_at_1e_6():
    """Token-by-token decode through the (k-1)-token conv buffers == the parallel forward, fp32,
    atol 1e-6 (§5, §9.6)."""
    model, fwd = model_and_forward()
    graphdef, params = nnx.split(model)
    x = tokens(2, seed=9)

    @jax.jit
    def decode(params, x):
        def step(s, tok):
            logits, s, _ = zoo.lm.forward(graphdef, params, tok[:, None], s)
            return s, logits[:, 0]
        return jnp.moveaxis(jax.lax.scan(step, model.init_state(2), x.T)[1], 0, 1)

    assert_close(decode(params, x), fwd(model, x), atol=1e-6, rtol=1e-6, what="decode")


# ----------------------------------------------------------------------------- §9.7, §6, config

@pytest.mark.parametrize("preset, count", [("gam_paper", 22_599_680),
                                           ("gam_global_only", 19_435_520),
                                           ("gam_sum_fusion", 19_447_808),
                                           ("gam_local_only", 17_874_944)])
def test_parameter_counts_of_the_paper_and_its_ablations(preset, count):
    cfg = PRESETS[preset]()
    model = nnx.eval_shape(lambda: zoo.build("gam", cfg, rngs=0))
    assert count_params(nnx.state(model, nnx.Param)) == gam_param_count(cfg) == count
    assert gam_param_count(dataclasses.replace(cfg, pe="none")) == count - 256 * 512


def test_torch_default_initialisation_bounds():
    """§6: memory Xavier-uniform, conv U(+-1/sqrt(k)), Linear U(+-1/sqrt(fan_in)), the tied
    embedding at the head's U(+-1/sqrt(D)), positions N(0, 1), LayerNorms (1, 0)."""
    D, S = CFG.dim, CFG.n_slots
    model, _ = model_and_forward()
    blk = model.blocks[0]
    for name, v, bound in (("memory", blk.mixer.memory, math.sqrt(6 / (S + D))),
                           ("conv", blk.mixer.conv.weight, 1 / math.sqrt(3)),
                           ("gate", blk.mixer.gate.weight, 1 / math.sqrt(D)),
                           ("gate_b", blk.mixer.gate.bias, 1 / math.sqrt(D)),
                           ("fc1", blk.ffn.fc1.weight, 1 / math.sqrt(D)),
                           ("fc2", blk.ffn.fc2.weight, 1 / math.sqrt(4 * D)),
                           ("embed", model.embed.embedding, 1 / math.sqrt(D))):
        a = np.abs(np.asarray(v[...]))
        assert a.max() <= bound and a.max() > 0.9 * bound, name
    assert abs(float(np.std(np.asarray(model.positions.table[...]))) - 1.0) < 0.1
    np.testing.assert_array_equal(np.asarray(blk.norm1.weight[...]), np.ones(D))
    np.testing.assert_array_equal(np.asarray(blk.norm1.bias[...]), np.zeros(D))
    small = GAMMixer(D, rngs=nnx.Rngs(params=0), n_slots=S, init="normal_0.02")
    assert abs(float(np.std(np.asarray(small.memory[...]))) - 0.02) < 0.004
    np.testing.assert_array_equal(np.asarray(small.gate.bias[...]), np.zeros(2 * D))


def test_no_positions_has_no_length_limit_and_bad_values_fail_in_validate():
    cfg = dataclasses.replace(CFG, pe="none", max_len=4)
    assert zoo.get("gam").max_len(cfg) is None
    model = nnx.eval_shape(lambda: zoo.build("gam", cfg, rngs=0))
    assert model.positions is None and model.max_len is None
    for key, value in (("fusion", "product"), ("pe", "rope"), ("init", "xavier")):
        with pytest.raises(ValueError, match=rf"^model\.{key}="):
            dataclasses.replace(CFG, **{key: value}).validate()
