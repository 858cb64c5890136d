"""selective_scan (Mamba-1) and ssd (Mamba-2) ops: the chunked XLA forms equal the sequential
reference, forward and gradients, at awkward lengths, with initial state and document resets,
under extreme decays. (The dispatcher's rejection of a missing kernel is tests/test_impl.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from asserts import assert_close

from pallas_kernels.selective_scan import chunked as ss_chunked
from pallas_kernels.selective_scan import reference as ss_ref
from pallas_kernels.ssd import chunked as ssd_chunked
from pallas_kernels.ssd import reference as ssd_ref


def ss_inputs(T, seed=0, B=2, Di=5, N=4, dt_scale=1.0, p_reset=0.15):
    k = jax.random.split(jax.random.key(seed), 8)
    return dict(
        x=jax.random.normal(k[0], (B, T, Di)),
        dt=dt_scale * jax.nn.softplus(jax.random.normal(k[1], (B, T, Di))),
        A=-jnp.exp(jax.random.normal(k[2], (Di, N))),
        Bm=jax.random.normal(k[3], (B, T, N)), C=jax.random.normal(k[4], (B, T, N)),
        h0=jax.random.normal(k[5], (B, Di, N)),
        reset=jax.random.bernoulli(k[6], p_reset, (B, T)))


def ssd_inputs(T, seed=0, B=2, H=4, P=3, G=2, N=4, dt_scale=1.0, p_reset=0.15):
    k = jax.random.split(jax.random.key(seed), 8)
    return dict(
        x=jax.random.normal(k[0], (B, T, H, P)),
        dt=dt_scale * jax.nn.softplus(jax.random.normal(k[1], (B, T, H))),
        A=-jnp.exp(jax.random.normal(k[2], (H,))),
        Bm=jax.random.normal(k[3], (B, T, G, N)), C=jax.random.normal(k[4], (B, T, G, N)),
        h0=jax.random.normal(k[5], (B, H, P, N)),
        reset=jax.random.bernoulli(k[6], p_reset, (B, T)))


DIFF = ("x", "dt", "A", "Bm", "C", "h0")


def value_and_grads(fn, inp):
    """(y, h_T) and the gradient of a random linear functional of both w.r.t. every input
    (one compile per form)."""
    y_shape, h_shape = jax.eval_shape(lambda: fn(**inp))
    wy = jax.random.normal(jax.random.key(9), y_shape.shape)
    wh = jax.random.normal(jax.random.key(10), h_shape.shape)

    def f(diff):
        y, hT = fn(**{**inp, **diff})
        return jnp.sum(y * wy) + jnp.sum(hT * wh), (y, hT)

    (_, out), grads = jax.jit(jax.value_and_grad(f, has_aux=True))({k: inp[k] for k in DIFF})
    return out, grads


# float32 throughout; the two forms sum the same terms in different orders (observed max
# |diff| ~2e-6 on outputs of size ~10 and gradients of size ~100).
ATOL, RTOL = 2e-5, 2e-5


_REF_CACHE = {}


def check_pair(ref_fn, fast_fn, inp, what, ref_key=None):
    """`ref_key` names a reference run to reuse across chunk sizes (one compile fewer)."""
    if ref_key is None:
        (y0, h0), g0 = value_and_grads(ref_fn, inp)
    else:
        if ref_key not in _REF_CACHE:
            _REF_CACHE[ref_key] = value_and_grads(ref_fn, inp)
        (y0, h0), g0 = _REF_CACHE[ref_key]
    (y, h), g = value_and_grads(fast_fn, inp)
    for v in (y, h, *g.values()):
        assert np.all(np.isfinite(np.asarray(v))), what
    np.testing.assert_allclose(y, y0, atol=ATOL, rtol=RTOL, err_msg=f"y, {what}")
    np.testing.assert_allclose(h, h0, atol=ATOL, rtol=RTOL, err_msg=f"h_T, {what}")
    assert_close(g, g0, atol=1e-4, rtol=1e-4, what=f"gradients, {what}")


# lengths 1, 7, 37 against chunks 8 and 16: shorter than a chunk, ragged, several chunks
CASES = [(1, 8), (7, 8), (37, 8), (37, 16)]


@pytest.mark.parametrize("T,Q", CASES)
def test_selective_scan_chunked_equals_reference(T, Q):
    """With an initial state and random document resets (about 15% of positions)."""
    inp = ss_inputs(T, seed=T)
    check_pair(ss_ref.selective_scan, lambda **a: ss_chunked.selective_scan(**a, block=Q), inp,
               f"T={T} chunk={Q}", ref_key=("ss", T))


def test_selective_scan_exact_zoh_chunked_equals_reference():
    inp = ss_inputs(37, seed=2)
    check_pair(lambda **a: ss_ref.selective_scan(**a, exact_zoh=True),
               lambda **a: ss_chunked.selective_scan(**a, exact_zoh=True, block=8), inp, "ZOH")


def test_no_state_no_resets():
    inp = ss_inputs(19, seed=4)
    inp["h0"] = jnp.zeros_like(inp["h0"])
    args = (inp["x"], inp["dt"], inp["A"], inp["Bm"], inp["C"])
    y0, h0 = jax.jit(ss_ref.selective_scan)(*args)
    y, h = jax.jit(lambda *a: ss_chunked.selective_scan(*a, block=8))(*args)
    np.testing.assert_allclose(y, y0, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(h, h0, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("T,Q", CASES)
def test_ssd_chunked_equals_reference(T, Q):
    """Grouped B/C (4 heads, 2 groups), initial state, random document resets."""
    inp = ssd_inputs(T, seed=T)
    check_pair(ssd_ref.ssd, lambda **a: ssd_chunked.ssd(**a, block=Q), inp, f"T={T} chunk={Q}",
               ref_key=("ssd", T))


def test_reference_matches_closed_form_float64():
    """specs/mamba.md §2.4: h_t = sum_{s<=t} exp(S_t - S_s) dt_s B_s x_s + exp(S_t) h0, with the
    sum cut at the last document start; y_t = C_t . h_t. Float64, direct double loop."""
    with jax.enable_x64():
        inp = ss_inputs(11, seed=3)
        inp = {k: (v.astype(jnp.float64) if v.dtype == jnp.float32 else v) for k, v in inp.items()}
        y, hT = ss_ref.selective_scan(**inp)
        x, dt, A, Bm, C, h0, rs = (np.asarray(inp[k]) for k in ("x", "dt", "A", "Bm", "C", "h0", "reset"))
        B, T, Di = x.shape
        a = dt[..., None] * A                            # [B, T, Di, N]
        y_cf = np.zeros((B, T, Di))
        for b in range(B):
            for t in range(T):
                starts = [s for s in range(t + 1) if rs[b, s]]
                first = max(starts) if starts else 0
                h = np.zeros(A.shape)
                if not starts:
                    h += np.exp(a[b, :t + 1].sum(0)) * h0[b]
                for s in range(first, t + 1):
                    h += np.exp(a[b, s + 1:t + 1].sum(0)) * (dt[b, s] * x[b, s])[:, None] * Bm[b, s]
                y_cf[b, t] = h @ C[b, t]
                if t == T - 1:
                    np.testing.assert_allclose(np.asarray(hT[b]), h, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(y), y_cf, rtol=1e-12, atol=1e-12)


def test_extreme_decay_no_overflow():
    """Per-step log-decays down to -800 (dt up to ~50, A down to -16): a naive factorisation
    exp(S_t) * exp(-S_s) overflows float32; the chunked forms stay finite and equal the
    reference, gradients included."""
    inp = ss_inputs(37, seed=5, dt_scale=25.0)
    inp["A"] = -jnp.linspace(1.0, 16.0, inp["A"].size).reshape(inp["A"].shape)
    S = np.cumsum(np.asarray(inp["dt"])[..., None] * np.asarray(inp["A"]), axis=1, dtype=np.float32)
    with np.errstate(over="ignore"):
        assert not np.all(np.isfinite(np.exp(-S))), "the test would not bite: no overflow"
    check_pair(ss_ref.selective_scan, lambda **a: ss_chunked.selective_scan(**a, block=16), inp,
               "extreme decay")
    sinp = ssd_inputs(37, seed=6, dt_scale=25.0)
    sinp["A"] = -jnp.linspace(1.0, 16.0, sinp["A"].size)
    check_pair(ssd_ref.ssd, lambda **a: ssd_chunked.ssd(**a, block=16), sinp, "ssd extreme decay")


def test_padding_with_zero_dt_keeps_state():
    """dt = 0 (and any x) at right pads leaves the state untouched: the final state of a padded
    call equals that of the unpadded one (what the layers rely on for `mask`)."""
    inp = ss_inputs(13, seed=7)
    chunked4 = jax.jit(lambda **a: ss_chunked.selective_scan(**a, block=4))
    y, h = chunked4(**inp)
    pad = {k: v for k, v in inp.items()}
    for k in ("x", "Bm", "C"):
        pad[k] = jnp.concatenate([inp[k], jnp.ones_like(inp[k][:, :5])], axis=1)
    pad["dt"] = jnp.concatenate([inp["dt"], jnp.zeros_like(inp["dt"][:, :5])], axis=1)
    pad["reset"] = jnp.concatenate([inp["reset"], jnp.zeros_like(inp["reset"][:, :5])], axis=1)
    for fn in (jax.jit(ss_ref.selective_scan), chunked4):
        yp, hp = fn(**pad)
        np.testing.assert_allclose(hp, h, atol=1e-6, rtol=1e-6)
        np.testing.assert_allclose(yp[:, :13], y, atol=1e-5, rtol=1e-5)


def test_mamba1_scan_with_head_constant_A_is_ssd():
    """specs/mamba.md §9.4: the Mamba-1 scan with A[d, n] = A_h on each head's P channels, dt
    shared by the head and B/C shared by all heads reproduces the SSD recurrence."""
    inp = ssd_inputs(9, seed=8, G=1)
    B, T, H, P = inp["x"].shape
    N = inp["Bm"].shape[-1]
    y2, h2 = ssd_ref.ssd(**inp)
    A1 = jnp.repeat(inp["A"], P)[:, None] * jnp.ones((1, N))
    y1, h1 = ss_ref.selective_scan(
        inp["x"].reshape(B, T, H * P), jnp.repeat(inp["dt"], P, axis=2), A1,
        inp["Bm"][:, :, 0], inp["C"][:, :, 0], h0=inp["h0"].reshape(B, H * P, N), reset=inp["reset"])
    np.testing.assert_allclose(y1.reshape(B, T, H, P), y2, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(h1.reshape(B, H, P, N), h2, atol=1e-5, rtol=1e-5)
