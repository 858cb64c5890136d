"""Mamba / Mamba2 checkpoints from the real `transformers` library reproduce its logits
(fixtures in tests/fixtures/hf/, made by tests/fixtures/make_hf_fixtures.py; nothing in them is
computed by seqzoo)."""
import json
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

import zoo.hf

FIX = pathlib.Path(__file__).parent / "fixtures" / "hf"

# float32 on both sides; transformers sums in a different order (its chunked SSD pads to the
# chunk and uses exp(segsum) products; Mamba-1's slow path a sequential loop): observed max
# |diff| 3e-6..1e-5 on logits of size ~10.
ATOL, RTOL = 1e-4, 1e-5


@pytest.mark.parametrize("name,impl", [("mamba", "reference"), ("mamba", "chunked"),
                                       ("mamba2", "reference"), ("mamba2", "chunked"),
                                       ("mamba2_groups", "chunked")])
def test_mamba_logits_match_transformers(name, impl):
    model = zoo.hf.load(str(FIX / name))
    for blk in model.blocks:
        blk.mixer.impl = impl
    exp = np.load(FIX / name / "expected.npz")
    logits = jax.jit(lambda t: model(t)[0])(exp["tokens"])
    assert logits.shape == exp["logits"].shape
    np.testing.assert_allclose(np.asarray(logits), exp["logits"], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_mamba_prefill_and_decode_match_transformers(name):
    """Prefill 5 tokens (mid-chunk for Mamba2's chunk 8), then decode the rest one token at a
    time through the recurrent state: transformers' full-sequence logits (T = 19 / 21)."""
    model = zoo.hf.load(str(FIX / name))
    exp = np.load(FIX / name / "expected.npz")
    toks = exp["tokens"]
    graphdef, params = nnx.split(model)
    fwd = jax.jit(lambda p, t, s: zoo.lm.forward(graphdef, p, t, s)[:2])
    state = model.init_state(toks.shape[0])
    lo, state = fwd(params, toks[:, :5], state)
    outs = [np.asarray(lo)]
    for t in range(5, toks.shape[1]):
        lo, state = fwd(params, toks[:, t:t + 1], state)
        outs.append(np.asarray(lo))
    np.testing.assert_allclose(np.concatenate(outs, 1), exp["logits"], atol=ATOL, rtol=RTOL)


def test_converter_rejects_missing_and_extra_tensors():
    cfg = zoo.hf.load_config(str(FIX / "mamba2"))
    tensors = zoo.hf.read_safetensors(str(FIX / "mamba2" / "model.safetensors"))
    conv = zoo.hf._CONVERTERS["Mamba2ForCausalLM"]
    missing = {k: v for k, v in tensors.items() if not k.endswith("layers.1.mixer.D")}
    with pytest.raises(ValueError, match="layers.1.mixer.D"):
        conv(cfg, missing)
    with pytest.raises(ValueError, match="not used"):
        conv(cfg, {**tensors, "backbone.layers.0.mixer.extra": np.zeros(3, np.float32)})
    bad = dict(tensors)
    bad["backbone.layers.0.mixer.A_log"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match="A_log"):
        conv(cfg, bad)


def test_converted_config():
    m = zoo.hf.load(str(FIX / "mamba2_groups"))
    mx = m.blocks[0].mixer
    assert (mx.n_heads, mx.head_dim, mx.n_groups, mx.d_state) == (4, 16, 2, 8)
    assert m.head is None                      # tied
    assert zoo.hf.load(str(FIX / "mamba2")).head is not None


@pytest.mark.parametrize("name", ["mamba", "mamba2_groups"])
def test_export_roundtrip(name, tmp_path):
    """save_hf writes the same tensors, config.json fields equal to the transformers-made
    fixture's, and loads back to the same logits."""
    from zoo.mamba import save_hf
    model = zoo.hf.load(str(FIX / name))
    save_hf(model, str(tmp_path))
    orig = zoo.hf.read_safetensors(str(FIX / name / "model.safetensors"))
    back = zoo.hf.read_safetensors(str(tmp_path / "model.safetensors"))
    assert sorted(orig) == sorted(back)
    for k in orig:
        np.testing.assert_array_equal(orig[k], back[k], err_msg=k)
    # every config.json field written equals the transformers-made fixture's
    written = json.loads((tmp_path / "config.json").read_text())
    made = json.loads((FIX / name / "config.json").read_text())
    assert {k: made.get(k, "<absent>") for k in written} == written
    exp = np.load(FIX / name / "expected.npz")
    again = zoo.hf.load(str(tmp_path))
    np.testing.assert_allclose(np.asarray(again(exp["tokens"])[0]), exp["logits"], atol=ATOL,
                               rtol=RTOL)
