"""Hydra's causal workspace (layers/workspace.py, zoo.hydra.HydraLM; specs/hydra.md §2.5, §7.7,
§7.10 and the contract note "The workspace is model-level state"): the scan over workspace chunks
against a plain per-chunk loop over the same blocks, decode == forward across chunk edges, calls
that start inside a chunk, rows at different chunk offsets, causality, η ≡ 0 keeps M_0, writes
only at completed chunks, parameters and FLOPs.

The config has SSM, SGA (with globals) and the workspace, no MoE or PKM: its only discrete
decision is the global test r_j > 0, made on the input of the SGA block (block 2), which does not
read the slots; its margins are asserted (`check_margins`)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from zoo.hydra import _TINY, HydraConfig, HydraLM, check_margins, workspace_steps

CFG = HydraConfig(**{**_TINY, "moe_every": 4, "pkm_layer": 0, "workspace": True, "ws_slots": 3,
                     "ws_rank": 4, "ws_chunk": 5, "ws_slot_std": 0.25})
B, T, C = 2, 13, 5          # 13 tokens: chunks [0, 5), [5, 10), [10, 13) (the last one open)
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def model():
    return zoo.build("hydra", CFG, rngs=0)


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (B, T), 0, CFG.vocab_size, jnp.int32)


@pytest.fixture(scope="module")
def fns(model):
    gd, params = nnx.split(model)
    full = jax.jit(lambda p, t: zoo.lm.forward(gd, p, t)[0])
    stateful = jax.jit(lambda p, t, s, m: zoo.lm.forward(gd, p, t, s, mask=m)[:2])
    return params, full, stateful


def chunk_loop(model, tokens):
    """The contract's form written plainly: chunk by chunk (aligned, no gathers), the block
    stack reading that chunk's slots, then the write from the chunk's final-norm mean."""
    b, t = tokens.shape
    h = model.embed_tokens(tokens, jnp.broadcast_to(jnp.arange(t), (b, t)))
    layers = [blk.init_state(b) for blk in model.blocks]
    slots = model.workspace.init_state(b).slots
    outs, written = [], [slots]
    for c0 in range(0, t, C):
        x = h[:, c0:c0 + C]
        for i, blk in enumerate(model.blocks):
            x, layers[i], _ = blk(x, layers[i], context=slots)
        z = model.final_norm(x)
        outs.append(model.embed.attend(z))
        if x.shape[1] == C:
            slots = model.workspace.write(slots, jnp.mean(z, axis=1))
            written.append(slots)
    return jnp.concatenate(outs, axis=1), written


def test_scan_equals_the_plain_chunk_loop(model, tokens, fns):
    params, full, stateful = fns
    check_margins(model, tokens)
    want, written = chunk_loop(model, tokens)
    np.testing.assert_allclose(full(params, tokens), want, **TOL)
    _, state = stateful(params, tokens, model.init_state(B), None)
    ws = state["workspace"]
    np.testing.assert_allclose(ws.slots, written[-1], **TOL)        # M_2: after chunks 0 and 1
    assert [int(c) for c in ws.count] == [T % C] * B                 # the open chunk's 3 tokens
    # the slots are read: without them (M ≡ 0 and no writes) the logits after chunk 0 change
    assert not np.allclose(want[:, C:], chunk_loop_without_slots(model, tokens)[:, C:], atol=1e-4)


def chunk_loop_without_slots(model, tokens):
    b, t = tokens.shape
    h = model.embed_tokens(tokens, jnp.broadcast_to(jnp.arange(t), (b, t)))
    for blk in model.blocks:
        h = blk(h, None)[0]
    return model.embed.attend(model.final_norm(h))


@pytest.mark.parametrize("cut", [1, 4, 5, 6, 12])
def test_prefill_then_decode_equals_forward(model, tokens, fns, cut):
    """Prefill `cut` tokens, then one token per call: crosses the chunk edges at 5 and 10 in
    both phases (cut 4: the edge is the first decoded token's; cut 6: the prefill wrote once)."""
    params, full, stateful = fns
    want = full(params, tokens)
    logits, state = stateful(params, tokens[:, :cut], model.init_state(B), None)
    got = [logits]
    for t in range(cut, T):
        logits, state = stateful(params, tokens[:, t:t + 1], state, None)
        got.append(logits)
    np.testing.assert_allclose(jnp.concatenate(got, axis=1), want, **TOL)


def test_a_call_starting_inside_a_chunk_and_rows_at_different_offsets(model, tokens, fns):
    """Two multi-token calls, the second starting inside chunk 1 (7 = 5 + 2); and a right-padded
    prefill (rows of 3 and 8 real tokens), so that the continuation's rows sit at different
    chunk offsets within one call (gathered per row)."""
    params, full, stateful = fns
    want = full(params, tokens)
    a, s = stateful(params, tokens[:, :7], model.init_state(B), None)
    b, _ = stateful(params, tokens[:, 7:], s, None)
    np.testing.assert_allclose(jnp.concatenate([a, b], axis=1), want, **TOL)
    lens = np.array([3, 8])
    mask = jnp.asarray(np.arange(T)[None] < lens[:, None])
    _, s = stateful(params, tokens, model.init_state(B), mask)
    rest = jnp.stack([tokens[0, 3:8], tokens[1, 8:13]])             # 5 more tokens per row
    out, _ = stateful(params, rest, s, None)
    np.testing.assert_allclose(out[0], want[0, 3:8], **TOL)
    np.testing.assert_allclose(out[1], want[1, 8:13], **TOL)


def test_causal(model, tokens, fns):
    params, full, _ = fns
    want = full(params, tokens)
    for t in (4, 5, 9):
        x2 = tokens.at[:, t:].set((tokens[:, t:] + 7) % CFG.vocab_size)
        got = full(params, x2)
        np.testing.assert_allclose(got[:, :t], want[:, :t], **TOL)
        assert not np.allclose(got[:, t:], want[:, t:])


def test_no_write_keeps_the_initial_slots_and_writes_fall_on_chunk_edges(model, tokens, fns):
    """§7.7: η ≡ 0 leaves M_0; decoding token by token, the slots change exactly after the
    tokens that close a chunk (positions 4 and 9)."""
    params, _, stateful = fns
    state = model.init_state(B)
    before = state["workspace"].slots
    changed = []
    for t in range(T):
        _, state = stateful(params, tokens[:, t:t + 1], state, None)
        now = state["workspace"].slots
        changed.append(not np.allclose(now, before, atol=0, rtol=0))
        before = now
    assert [t for t, c in enumerate(changed) if c] == [C - 1, 2 * C - 1]
    p0 = jax.tree.map(lambda x: x, params)
    p0["workspace"]["b_eta"] = jnp.asarray(-1e4)                      # σ(-1e4) = 0
    _, s = stateful(p0, tokens, model.init_state(B), None)
    np.testing.assert_array_equal(s["workspace"].slots, model.init_state(B)["workspace"].slots)


def test_gradients_reach_the_write_path(model, tokens):
    """The write is functional (not the prototype's no-grad EMA): the loss on chunk 1 has
    gradients on every workspace parameter, finite."""
    gd, params = nnx.split(model)

    def loss(p):
        logits = zoo.lm.forward(gd, p, tokens)[0][:, C:2 * C]
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

    g = jax.jit(jax.grad(loss))(params)["workspace"]
    for name, leaf in jax.tree_util.tree_flatten_with_path(g)[0]:
        assert np.all(np.isfinite(leaf)) and float(jnp.max(jnp.abs(leaf))) > 0, name


def test_parameters_flops_steps_and_bad_configs(model):
    entry = zoo.get("hydra")
    assert isinstance(model, HydraLM)
    assert entry.param_count(CFG) == zoo.lm.count_params(nnx.state(model, nnx.Param))
    assert [workspace_steps(t, 5, aligned=a) for t, a in ((13, True), (13, False), (1, False),
                                                          (4, True), (4, False), (10, True))] \
        == [3, 4, 1, 1, 2, 2]
    from test_flops import xla_train_flops
    declared = entry.flops(CFG, T) * 2 * T
    xla = xla_train_flops("hydra", dataclasses.replace(CFG, impl="reference"), T)
    assert 0.95 * declared <= xla <= 1.4 * declared, (xla, declared)
    with pytest.raises(ValueError, match="model.workspace=True needs an SGA block"):
        zoo.registry.check_config("hydra", dataclasses.replace(CFG, sga_every=4))
    with pytest.raises(ValueError, match="model.ws_chunk=0 must be a positive integer"):
        zoo.registry.check_config("hydra", dataclasses.replace(CFG, ws_chunk=0))
    seg = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="takes no packed documents"):
        model(jnp.zeros((1, 4), jnp.int32), segment_ids=seg)
