"""Transformer baseline: the invariants of specs/transformer.md §6 and its presets."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from layers.common import count_params
from layers.norms import rms_norm
from zoo.transformer import (
    PRESETS,
    TransformerConfig,
    gam_transformer,
    transformer_param_count,
    zoology_attention,
)

TINY = TransformerConfig(vocab_size=29, dim=32, n_layers=2, n_heads=4, max_len=32, init_std=0.1)


def jit_forward(model):
    graphdef, _ = nnx.split(model)
    f = jax.jit(lambda p, x, **kw: zoo.lm.forward(graphdef, p, x, **kw)[0])
    return lambda x, **kw: f(nnx.state(model), x, **kw)


def toks(B, T, V=29, seed=0):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, V)


def test_zero_residual_branch_is_identity():
    model = zoo.build("transformer", TINY)
    for blk in model.blocks:
        blk.mixer.wo.weight[...] = jnp.zeros_like(blk.mixer.wo.weight[...])
        blk.ffn.w2.weight[...] = jnp.zeros_like(blk.ffn.w2.weight[...])
    x = toks(2, 9)
    E = model.embed.embedding[...]
    want = rms_norm(E[x], model.final_norm.weight[...], 1e-5) @ E.T
    np.testing.assert_allclose(jit_forward(model)(x), want, atol=1e-5, rtol=1e-5)


def test_gqa_with_copied_kv_heads_equals_mha():
    gqa_cfg = dataclasses.replace(TINY, n_kv_heads=2)
    gqa, mha = zoo.build("transformer", gqa_cfg, 1), zoo.build("transformer", TINY, 2)
    # copy every shared parameter, then expand kv heads: head h uses kv head h // 2
    for bg, bm in zip(gqa.blocks, mha.blocks):
        for name in ("wq", "wo"):
            getattr(bm.mixer, name).weight[...] = getattr(bg.mixer, name).weight[...]
        for name in ("wk", "wv"):
            w = getattr(bg.mixer, name).weight[...].reshape(32, 2, 8)
            getattr(bm.mixer, name).weight[...] = jnp.repeat(w, 2, axis=1).reshape(32, 32)
        for a, b in ((bm.ffn.w1, bg.ffn.w1), (bm.ffn.w2, bg.ffn.w2), (bm.ffn.w3, bg.ffn.w3),
                     (bm.norm1, bg.norm1), (bm.norm2, bg.norm2)):
            a.weight[...] = b.weight[...]
    mha.embed.embedding[...] = gqa.embed.embedding[...]
    mha.final_norm.weight[...] = gqa.final_norm.weight[...]
    x = toks(2, 11)
    np.testing.assert_allclose(jit_forward(mha)(x), jit_forward(gqa)(x), atol=1e-5, rtol=1e-5)


def test_presets_parameter_counts():
    assert transformer_param_count(gam_transformer()) == 24_166_400  # GAM README: 24.2 M
    for name, make in PRESETS.items():
        cfg = make()
        abstract = nnx.eval_shape(lambda: zoo.build("transformer", cfg))
        assert count_params(nnx.state(abstract, nnx.Param)) == transformer_param_count(cfg), name
    # Llama block formula of §6.8: D(H+2Hkv)d_h + H d_h D + 3 D d_ff + 2D
    c = PRESETS["llama_small_gqa"]()
    D, H, Hkv, dh, F = c.dim, c.n_heads, c.kv, c.hd, c.d_ff
    assert F == 1536
    block = D * (H + 2 * Hkv) * dh + H * dh * D + 3 * D * F + 2 * D
    assert transformer_param_count(c) == c.vocab_size * D + c.n_layers * block + D


def test_learned_positions_restart_at_documents_and_decode():
    cfg = zoology_attention(dim=32, max_len=16, vocab_size=29, embed_dropout=0.0, attn_dropout=0.0)
    model = zoo.build("transformer", cfg)
    x = toks(2, 12)
    seg = jnp.asarray(np.where(np.arange(12) < 5, 0, 1)[None].repeat(2, 0))
    fwd = jit_forward(model)
    packed = fwd(x, segment_ids=seg)
    np.testing.assert_allclose(packed[:, 5:], fwd(x[:, 5:]), atol=1e-5, rtol=1e-5)
    full = fwd(x)
    graphdef, params = nnx.split(model)
    step = jax.jit(lambda p, t, s: zoo.lm.forward(graphdef, p, t, s)[:2])
    state = model.init_state(2, 16)
    outs = []
    for t in range(12):
        lo, state = step(params, x[:, t:t + 1], state)
        outs.append(lo[:, 0])
    np.testing.assert_allclose(jnp.stack(outs, 1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="max_len"):
        model(toks(1, 17))
    graphdef, params = nnx.split(model)
    with pytest.raises(ValueError, match="max_len"):
        zoo.lm.generate(graphdef, params, x, 8)


def test_dropout_only_with_a_key():
    cfg = zoology_attention(dim=32, max_len=16, vocab_size=29)
    model = zoo.build("transformer", cfg)
    x = toks(2, 10)
    fwd = jit_forward(model)
    a, b = fwd(x), fwd(x)
    np.testing.assert_array_equal(a, b)
    c = fwd(x, key=jax.random.key(0))
    assert float(jnp.max(jnp.abs(c - a))) > 1e-3


def test_greedy_generate_matches_recomputed_argmax():
    cfg = dataclasses.replace(TINY, n_kv_heads=2, window=3)
    model = zoo.build("transformer", cfg)
    graphdef, params = nnx.split(model)
    prompt = toks(2, 5)
    mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
    out = zoo.lm.generate(graphdef, params, prompt, 6, prompt_mask=mask)
    fwd = jit_forward(model)
    for r, n in enumerate((5, 3)):
        seq = np.zeros((1, 11), np.int32)  # fixed shape: causal, so trailing zeros do not matter
        seq[0, :n] = np.asarray(prompt[r, :n])
        for i in range(6):
            lo = fwd(jnp.asarray(seq))
            seq[0, n + i] = int(jnp.argmax(lo[0, n + i - 1]))
        np.testing.assert_array_equal(np.asarray(out[r]), seq[0, n:n + 6])


def test_kv_cache_rejects_overrun():
    model = zoo.build("transformer", dataclasses.replace(TINY, n_layers=1))
    state = model.init_state(1, 8)
    _, state, _ = model(toks(1, 6), state)
    with pytest.raises(ValueError, match="overrun"):
        model(toks(1, 3), state)


def test_unknown_model_and_key_give_one_line():
    with pytest.raises(KeyError, match="unknown model 'nope'; known models: .*transformer"):
        zoo.build("nope")
    with pytest.raises(ValueError, match="unknown config key model.dimm"):
        zoo.make_config("transformer", {"dimm": 3})
    with pytest.raises(ValueError, match="model.n_heads=3 is not a multiple of model.n_kv_heads=2"):
        zoo.make_config("transformer", {"n_heads": 3, "n_kv_heads": 2, "dim": 48})
