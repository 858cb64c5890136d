"""The shared conformance suite: every registered model, every equality of the mixer contract.

Each model registers a `ConformanceSpec` (tiny config, test length, cut points, fast forms). A
model added later is checked here with no extra work. Tolerances are float32 (1e-5 unless the
spec states a reason for more).
"""
from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from asserts import assert_close
from flax import nnx

import zoo
from pallas_kernels.impl import Impl, available
from train.sharding import batch_sharding, make_mesh, param_shardings

NAMES = zoo.names()


def spec_of(name):
    spec = zoo.get(name).conformance
    assert spec is not None, f"model {name!r} is registered without a ConformanceSpec"
    return spec


def overrides_key(name, overrides) -> tuple:
    """The overrides that change the spec's config (sorted), so that a "reference" override equal
    to the config itself shares the default build and its compiled functions."""
    cfg = spec_of(name).config
    return tuple(sorted((k, v) for k, v in dict(overrides).items() if getattr(cfg, k) != v))


@functools.lru_cache(maxsize=None)
def setup(name, overrides=()):
    spec = spec_of(name)
    cfg = dataclasses.replace(spec.config, **dict(overrides))
    model = zoo.build(name, cfg, rngs=0)
    graphdef, params = nnx.split(model)
    return model, graphdef, params


def tokens_for(name, batch, seed=0):
    spec = spec_of(name)
    vocab = spec.config.vocab_size
    return jax.random.randint(jax.random.key(seed), (batch, spec.length), 0, vocab, jnp.int32)


@functools.lru_cache(maxsize=None)
def jitted(name):
    """(full forward, forward with explicit state and mask) for the model's reference form."""
    _, graphdef, _ = setup(name)

    @jax.jit
    def full(params, tokens):
        return zoo.lm.forward(graphdef, params, tokens)[0]

    @jax.jit
    def stateful(params, tokens, state, mask):
        logits, new_state, _ = zoo.lm.forward(graphdef, params, tokens, state, mask=mask)
        return logits, new_state

    return full, stateful


def loss_of_logits(name, logits, x):
    """The LM loss (next-token cross-entropy); for a non-causal pooled entry, the cross-entropy of
    its pooled logits [B, classes] against labels derived from the tokens."""
    if zoo.get(name).causal:
        ce, n = zoo.lm.cross_entropy(logits, jnp.roll(x, -1, axis=1), jnp.ones(x.shape))
        return ce / n
    labels = x[:, 0] % logits.shape[-1]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1))


@functools.lru_cache(maxsize=None)
def logits_and_grads(name, key=()):
    """jit(params, tokens) -> (logits, d loss / d params) for the build with overrides `key`:
    one compile gives both the forward and the gradients."""
    _, graphdef, _ = setup(name, key)

    def f(params, x):
        logits = zoo.lm.forward(graphdef, params, x)[0]
        return loss_of_logits(name, logits, x), logits

    vg = jax.jit(jax.value_and_grad(f, has_aux=True))
    return lambda params, x: (lambda out: (out[0][1], out[1]))(vg(params, x))


def close(a, b, spec, what):
    assert_close(a, b, atol=spec.atol, rtol=spec.rtol, what=what)


@pytest.mark.parametrize("name", NAMES)
def test_causal(name):
    spec = spec_of(name)
    if not zoo.get(name).causal:
        pytest.skip("non-causal entry (pooled head): causality does not apply")
    _, _, params = setup(name)
    full, _ = jitted(name)
    x = tokens_for(name, 2)
    T = spec.length
    for s in (T // 3, T - 2):
        y = x.at[:, s:].set((x[:, s:] + 7) % spec.config.vocab_size)
        a, b = full(params, x), full(params, y)
        np.testing.assert_allclose(np.asarray(a[:, :s]), np.asarray(b[:, :s]), atol=1e-6, rtol=0,
                                   err_msg=f"output before {s} depends on later tokens")
        assert not np.allclose(np.asarray(a[:, s:]), np.asarray(b[:, s:]), atol=1e-6), \
            "perturbation had no effect at all: the test would not bite"


@pytest.mark.parametrize("name", NAMES)
def test_batch_independent(name):
    spec = spec_of(name)
    _, _, params = setup(name)
    full, _ = jitted(name)
    x = tokens_for(name, 2)
    y = x.at[1].set(tokens_for(name, 1, seed=5)[0])
    close(full(params, x)[0], full(params, y)[0], spec, "row 0 changed with row 1")


@pytest.mark.parametrize("name", NAMES)
def test_prefill_continue_and_decode(name):
    """full forward == prefill(x[:c]) + continue(x[c:]) at every cut (one row per cut, fixed
    shapes with `mask`), == token-by-token decode; the returned state follows the last real token."""
    spec = spec_of(name)
    if not zoo.get(name).causal:
        pytest.skip("non-causal entry")
    model, graphdef, params = setup(name)
    full, stateful = jitted(name)
    cuts = np.asarray(spec.cuts)
    B, T = len(cuts), spec.length
    x = tokens_for(name, B, seed=1)
    ref = np.asarray(full(params, x))
    t = np.arange(T)[None, :]
    state0 = model.init_state(B, T)
    pre_mask = jnp.asarray(t < cuts[:, None])
    pre, st = stateful(params, x, state0, pre_mask)
    # continuation tokens shifted left by each row's cut, right padded
    idx = np.minimum(t + cuts[:, None], T - 1)
    x2 = jnp.take_along_axis(x, jnp.asarray(idx), axis=1)
    cont, _ = stateful(params, x2, st, jnp.asarray(t < (T - cuts)[:, None]))
    pre, cont = np.asarray(pre), np.asarray(cont)
    for r, c in enumerate(cuts):
        close(pre[r, :c], ref[r, :c], spec, f"prefill of {c} tokens")
        close(cont[r, :T - c], ref[r, c:], spec, f"continuation after a cut at {c}")
    if not spec.decode:
        return

    @jax.jit
    def decode(params, x, state):
        def step(s, tok):
            logits, s, _ = zoo.lm.forward(graphdef, params, tok[:, None], s)
            return s, logits[:, 0]
        _, out = jax.lax.scan(step, state, jnp.moveaxis(x, 1, 0))
        return jnp.moveaxis(out, 0, 1)

    close(decode(params, x, model.init_state(B, T)), ref, spec, "token-by-token decode")


@pytest.mark.parametrize("name", NAMES)
def test_fast_forms_equal_reference(name):
    """Each fast form (chunked, Pallas interpret) == the reference form, forward and gradients,
    at the spec's length (chosen not to be a multiple of any block)."""
    spec = spec_of(name)
    if not spec.fast:
        pytest.skip("model has no fast form besides its reference")
    x = tokens_for(name, 2, seed=2)

    def value_and_grad(overrides):
        key = overrides_key(name, overrides)
        params = setup(name, key)[2]
        return (*logits_and_grads(name, key)(params, x), params)

    ref_logits, ref_grads, ref_params = value_and_grad(spec.reference)
    for fast in spec.fast:
        logits, grads, params = value_and_grad(fast)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), ref_params, params)
        close(logits, ref_logits, spec, f"forward of {fast}")
        assert_close(grads, ref_grads, atol=spec.atol * 10, rtol=spec.rtol * 10,
                     what=f"gradient of {fast}")


@pytest.mark.parametrize("name", NAMES)
def test_gradients_finite_and_jit_equals_eager(name):
    spec = spec_of(name)
    model, graphdef, params = setup(name)
    x = tokens_for(name, 2, seed=3)
    # the reference build's gradient step: compiled once, shared with the fast-forms test
    key = overrides_key(name, spec.reference)
    _, grads = logits_and_grads(name, key)(setup(name, key)[2], x)
    flat = jax.tree_util.tree_leaves_with_path(grads)
    for path, g in flat:
        assert np.all(np.isfinite(np.asarray(g))), f"non-finite gradient at {jax.tree_util.keystr(path)}"
    assert sum(float(jnp.sum(jnp.abs(g))) for _, g in flat) > 0
    full, _ = jitted(name)
    close(full(params, x), model(x)[0], spec, "jit vs eager")


@pytest.mark.parametrize("name", NAMES)
def test_sharded_equals_unsharded(name):
    """Parameters sharded by the logical rules on a (2, 2, 2) mesh, batch over data x fsdp."""
    spec = spec_of(name)
    _, graphdef, params = setup(name)
    full, _ = jitted(name)
    mesh = make_mesh((2, 2, 2))
    x = tokens_for(name, 4, seed=4)
    shardings = param_shardings(params, mesh)
    sp = jax.device_put(jax.tree.map(np.asarray, params), shardings)
    sx = jax.device_put(np.asarray(x), batch_sharding(mesh))
    out = jax.jit(lambda p, t: zoo.lm.forward(graphdef, p, t)[0])(sp, sx)
    close(out, full(params, x), spec, "sharded forward")


@pytest.mark.parametrize("name", NAMES)
def test_document_resets(name):
    """Packed [doc A | doc B] with segment ids == doc B run alone (for models that can reset)."""
    entry, spec = zoo.get(name), spec_of(name)
    if not entry.resets:
        pytest.skip("model cannot reset its state at document starts (never fed packed data)")
    model, graphdef, params = setup(name)
    _, stateful = jitted(name)
    B, T = len(spec.cuts), spec.length   # the prefill test's shapes: its compiled forward is reused
    a = T // 2 - 1
    x = tokens_for(name, B, seed=6)
    seg = jnp.asarray(np.where(np.arange(T) < a, 0, 1)[None].repeat(B, 0), jnp.int32)
    packed = jax.jit(lambda p, t, s: zoo.lm.forward(graphdef, p, t, segment_ids=s)[0])(params, x, seg)
    t = np.arange(T)[None, :]
    # doc B alone: shifted to the front, right padded (mask); doc A alone: the prefix of a run
    second = jnp.take_along_axis(x, jnp.asarray(np.minimum(t + a, T - 1)).repeat(B, 0), axis=1)
    alone, _ = stateful(params, second, model.init_state(B, T), jnp.asarray(t < T - a).repeat(B, 0))
    first, _ = stateful(params, x, model.init_state(B, T), jnp.asarray(t < a).repeat(B, 0))
    close(packed[:, a:], alone[:, :T - a], spec, "second document of a packed row")
    close(packed[:, :a], first[:, :a], spec, "first document of a packed row")


@pytest.mark.parametrize("name", NAMES)
def test_param_count_formula(name):
    entry, spec = zoo.get(name), spec_of(name)
    assert entry.param_count is not None, f"{name} has no documented parameter-count formula"
    model, _, _ = setup(name)
    assert zoo.lm.count_params(nnx.state(model, nnx.Param)) == entry.param_count(spec.config)


@pytest.mark.parametrize("name", NAMES)
def test_learned_position_limit(name):
    entry, spec = zoo.get(name), spec_of(name)
    limit = entry.max_len(spec.config)
    if limit is None:
        pytest.skip("no learned-position limit")
    model, _, _ = setup(name)
    x = jnp.zeros((1, limit + 1), jnp.int32)
    with pytest.raises(ValueError, match="max_len"):
        model(x)


@pytest.mark.parametrize("name", NAMES)
def test_validate_rejects_unknown_or_missing_implementation(name):
    """One `impl` per model: an unknown value, or a kernel one of the model's ops lacks, and a
    bad `block` fail in `validate()` with one line naming the key (before anything compiles);
    so does a zero size (`zoo.registry.check_config`)."""
    cfg = spec_of(name).config
    fields = {f.name for f in dataclasses.fields(cfg)}
    assert "impl" in fields, f"{name}: no `impl` field (one implementation choice per model)"
    assert not fields & {"attn_impl", "scan_impl", "mem_impl", "attn_block", "chunk_size"}, fields
    with pytest.raises(ValueError, match=r"^model\.impl='cuda' is not one of"):
        dataclasses.replace(cfg, impl="cuda").validate()
    # a kernel request names the first of the model's ops that has none (models whose every op
    # has a kernel, like the Transformer on the flash-attention kernel, accept it)
    # (or, for an op whose kernels cover some of its rules, like the neural memory's matrix
    # memory, names the op whose kernel cannot run this configuration)
    try:
        dataclasses.replace(cfg, impl="pallas").validate()
    except ValueError as e:
        m = re.match(r"^model\.impl='pallas': op '(\w+)'", str(e))
        partial = re.match(r"^model\.impl='pallas': the (\w+) kernel cannot run this", str(e))
        assert (m and Impl.PALLAS not in available(m.group(1))
                or partial and Impl.PALLAS in available(partial.group(1))), str(e)
    if "block" in fields:
        with pytest.raises(ValueError, match=r"^model\.block=0 must be"):
            dataclasses.replace(cfg, block=0).validate()
    # the shared sizes (zoo.registry.SIZE_FIELDS), checked before the config's own validate():
    # n_heads=0 was a ZeroDivisionError inside validate() for 13 entries, vocab_size=0 an
    # IndexError at trace time for all
    for key in sorted(fields & set(zoo.registry.SIZE_FIELDS)):
        with pytest.raises(ValueError, match=rf"^model\.{key}=0 must be a positive integer"):
            zoo.registry.check_config(name, dataclasses.replace(cfg, **{key: 0}))
    zoo.registry.check_config(name, cfg)


@pytest.mark.parametrize("name", ["transformer", "titans_mac", "titans_mag", "titans_mal", "rat",
                                  "rat_hybrid", "swdt", "deep_transformer"])
def test_odd_rope_head_dim_rejected_before_build(name):
    """A width of n_heads x (head dim - 1), an odd head dim: one line naming the key from
    `zoo.registry.check_config`, not a ValueError from inside RoPE at trace time."""
    cfg = spec_of(name).config
    hd = cfg.dim // cfg.n_heads
    assert hd % 2 == 0
    with pytest.raises(ValueError, match=r"^model\.dim=\d+ .*RoPE needs an even head dim"):
        zoo.registry.check_config(name, dataclasses.replace(cfg, dim=cfg.n_heads * (hd - 1)))
