"""Flash attention as Pallas kernels: the forward and the backward's dq and dk/dv kernels, in a
`jax.custom_vjp`, with exactly `reference.attention`'s masks (causal positions, the sliding
window W: W + 1 keys, groups: documents or segments, invalid keys, the always-visible prefix
keys, an additive per-key bias) and GQA (query head h reads kv head h // (H / Hkv)).

Layout: heads first ([B, H, T, d]); the grid is (B, H, query blocks) for the forward and dq
kernels and (B, H, key blocks) for dk/dv; each program loops over the other axis's blocks
(`lax.fori_loop`), keeps the online softmax (running max m, sum l, accumulator) in float32 and
skips a block in which no query sees any key (`lax.cond` on the block's visibility), which is
what makes causal and windowed attention cheaper than dense. The forward also writes the row
log-sum-exp (the backward's residual); the backward recomputes the probabilities from it:

    p = exp(s − lse) on visible pairs,  dv = pᵀ do,  ds = p (do vᵀ − δ),  δ = rowsum(o ∘ do)
    dq = scale ds k,  dk = scale dsᵀ q,  dbias_j = Σ_i ds_ij

Under a mesh (`jax.set_mesh`, the trainer's) the call runs per shard (`harness.over_mesh`: batch
over the data axes, heads over "tensor"). dk, dv and dbias are written per query head and summed over the heads that share a kv head (or
the bias row) outside the kernel. Queries and keys are padded to whole blocks (padded keys are
invalid, padded query rows are dropped); the block sizes never change the function. A query
that sees no key outputs 0, like the reference.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.harness import block_size, call, over_mesh, round_up

Array = jax.Array
NEG = -1e30
VALID, ALWAYS = 1, 2          # key flags


def _vis(qp, qg, kp, kg, kf, causal: bool, window: int | None):
    """[bq, bk] visibility (reference.visibility on one block)."""
    vis = qg[:, None] == kg[None, :]
    if causal:
        vis = vis & (kp[None, :] <= qp[:, None])
    if window is not None:
        vis = vis & ((qp[:, None] - kp[None, :]) <= window)
    vis = vis | ((kf & ALWAYS) != 0)[None, :]
    return vis & ((kf & VALID) != 0)[None, :]


def _any(vis):
    """Whether any pair of the block is visible (jnp.any lowers to no Triton primitive)."""
    return jnp.max(vis.astype(jnp.int32)) > 0


def _qk(q, k):
    return jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _tq(a, b):          # aᵀ b
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _fwd_kernel(q_ref, k_ref, v_ref, qp_ref, qg_ref, kp_ref, kg_ref, kf_ref, kb_ref, o_ref,
                lse_ref, *, bk: int, nk: int, scale: float, causal: bool, window):
    q = q_ref[0, 0].astype(jnp.float32) * scale                      # [bq, d]
    qp, qg = qp_ref[0, 0], qg_ref[0, 0]                              # [bq]
    bq, dv = q.shape[0], v_ref.shape[-1]

    def body(j, carry):
        ks = pl.ds(j * bk, bk)
        vis = _vis(qp, qg, kp_ref[0, 0, ks], kg_ref[0, 0, ks], kf_ref[0, 0, ks], causal, window)

        def update(carry):
            m, den, acc = carry
            s = _qk(q, k_ref[0, 0, ks, :].astype(jnp.float32)) + kb_ref[0, 0, 0, ks][None, :]
            s = jnp.where(vis, s, NEG)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            p = jnp.where(vis, jnp.exp(s - m_new[:, None]), 0.0)
            corr = jnp.exp(m - m_new)
            acc = acc * corr[:, None] + jnp.dot(p, v_ref[0, 0, ks, :].astype(jnp.float32),
                                                preferred_element_type=jnp.float32)
            return m_new, den * corr + jnp.sum(p, axis=1), acc
        return jax.lax.cond(_any(vis), update, lambda c: c, carry)

    init = (jnp.full((bq,), NEG, jnp.float32), jnp.zeros((bq,), jnp.float32),
            jnp.zeros((bq, dv), jnp.float32))
    m, den, acc = jax.lax.fori_loop(0, nk, body, init)
    seen = den > 0
    o_ref[0, 0] = (acc / jnp.where(seen, den, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[0, 0, 0] = jnp.where(seen, m + jnp.log(jnp.where(seen, den, 1.0)), 0.0)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qp_ref, qg_ref, kp_ref, kg_ref,
               kf_ref, kb_ref, dq_ref, *, bk: int, nk: int, scale: float, causal: bool, window):
    q = q_ref[0, 0].astype(jnp.float32) * scale
    do = do_ref[0, 0].astype(jnp.float32)
    lse, delta = lse_ref[0, 0, 0], dl_ref[0, 0, 0]
    qp, qg = qp_ref[0, 0], qg_ref[0, 0]

    def body(j, dq):
        ks = pl.ds(j * bk, bk)
        vis = _vis(qp, qg, kp_ref[0, 0, ks], kg_ref[0, 0, ks], kf_ref[0, 0, ks], causal, window)

        def update(dq):
            kb = k_ref[0, 0, ks, :].astype(jnp.float32)
            s = _qk(q, kb) + kb_ref[0, 0, 0, ks][None, :]
            p = jnp.where(vis, jnp.exp(jnp.where(vis, s, 0.0) - lse[:, None]), 0.0)
            dp = _qk(do, v_ref[0, 0, ks, :].astype(jnp.float32))
            ds = p * (dp - delta[:, None])
            return dq + jnp.dot(ds, kb, preferred_element_type=jnp.float32)
        return jax.lax.cond(_any(vis), update, lambda d: d, dq)

    dq = jax.lax.fori_loop(0, nk, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[0, 0] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qp_ref, qg_ref, kp_ref, kg_ref,
                kf_ref, kb_ref, dk_ref, dv_ref, db_ref, *, bq: int, nq: int, scale: float,
                causal: bool, window):
    k = k_ref[0, 0].astype(jnp.float32)                              # [bk, d]
    v = v_ref[0, 0].astype(jnp.float32)
    kp, kg, kf = kp_ref[0, 0], kg_ref[0, 0], kf_ref[0, 0]
    kbias = kb_ref[0, 0, 0]

    def body(i, carry):
        qs = pl.ds(i * bq, bq)
        vis = _vis(qp_ref[0, 0, qs], qg_ref[0, 0, qs], kp, kg, kf, causal, window)

        def update(carry):
            dk, dv, db = carry
            q = q_ref[0, 0, qs, :].astype(jnp.float32) * scale
            do = do_ref[0, 0, qs, :].astype(jnp.float32)
            s = _qk(q, k) + kbias[None, :]
            p = jnp.where(vis, jnp.exp(jnp.where(vis, s, 0.0) - lse_ref[0, 0, 0, qs][:, None]),
                          0.0)
            ds = p * (_qk(do, v) - dl_ref[0, 0, 0, qs][:, None])
            return dk + _tq(ds, q), dv + _tq(p, do), db + jnp.sum(ds, axis=0)
        return jax.lax.cond(_any(vis), update, lambda c: c, carry)

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros((k.shape[0], v.shape[1]), jnp.float32),
            jnp.zeros((k.shape[0],), jnp.float32))
    dk, dv, db = jax.lax.fori_loop(0, nq, body, init)
    dk_ref[0, 0] = dk.astype(dk_ref.dtype)             # scale is already in q
    dv_ref[0, 0] = dv.astype(dv_ref.dtype)
    db_ref[0, 0, 0] = db


# ----------------------------------------------------------------------------- the calls

def _kv(h, rep: int):
    """The kv head of query head h (lax.div: jnp's floor division lowers through `sign`, which
    the Mosaic lowering resolves against the device it runs on)."""
    return h if rep == 1 else jax.lax.div(h, rep)


def _specs(B, H, rep, Hb, bq, bk, Tp, Sp, d, dv, *, q_blocked: bool):
    """BlockSpecs of (q-side arrays, k-side arrays) for a grid (B, H, n) over query blocks
    (`q_blocked`) or key blocks."""
    if q_blocked:
        qrow = pl.BlockSpec((1, 1, bq, d), lambda b, h, i: (b, h, i, 0))
        qdo = pl.BlockSpec((1, 1, bq, dv), lambda b, h, i: (b, h, i, 0))
        qvec = pl.BlockSpec((1, 1, 1, bq), lambda b, h, i: (b, h, 0, i))
        qmeta = pl.BlockSpec((1, 1, bq), lambda b, h, i: (b, 0, i))
        krow = pl.BlockSpec((1, 1, Sp, d), lambda b, h, i: (b, _kv(h, rep), 0, 0))
        kval = pl.BlockSpec((1, 1, Sp, dv), lambda b, h, i: (b, _kv(h, rep), 0, 0))
        kmeta = pl.BlockSpec((1, 1, Sp), lambda b, h, i: (b, 0, 0))
        kbias = pl.BlockSpec((1, 1, 1, Sp), lambda b, h, i: (b, h if Hb > 1 else 0, 0, 0))
    else:
        qrow = pl.BlockSpec((1, 1, Tp, d), lambda b, h, j: (b, h, 0, 0))
        qdo = pl.BlockSpec((1, 1, Tp, dv), lambda b, h, j: (b, h, 0, 0))
        qvec = pl.BlockSpec((1, 1, 1, Tp), lambda b, h, j: (b, h, 0, 0))
        qmeta = pl.BlockSpec((1, 1, Tp), lambda b, h, j: (b, 0, 0))
        krow = pl.BlockSpec((1, 1, bk, d), lambda b, h, j: (b, _kv(h, rep), j, 0))
        kval = pl.BlockSpec((1, 1, bk, dv), lambda b, h, j: (b, _kv(h, rep), j, 0))
        kmeta = pl.BlockSpec((1, 1, bk), lambda b, h, j: (b, 0, j))
        kbias = pl.BlockSpec((1, 1, 1, bk), lambda b, h, j: (b, h if Hb > 1 else 0, 0, j))
    return qrow, qdo, qvec, qmeta, krow, kval, kmeta, kbias


def _forward(cfg, q, k, v, qp, qg, kp, kg, kf, kb):
    backend, bq, bk, scale, causal, window = cfg
    B, H, Tp, d = q.shape
    Hkv, Sp, dv = k.shape[1], k.shape[2], v.shape[-1]
    rep, Hb = H // Hkv, kb.shape[1]
    qrow, qdo, qvec, qmeta, krow, kval, kmeta, kbias = _specs(B, H, rep, Hb, bq, bk, Tp, Sp, d,
                                                              dv, q_blocked=True)
    kern = functools.partial(_fwd_kernel, bk=bk, nk=Sp // bk, scale=scale, causal=causal,
                             window=window)
    return call(kern, backend=backend, grid=(B, H, Tp // bq), name="flash_attention_fwd",
                in_specs=[qrow, krow, kval, qmeta, qmeta, kmeta, kmeta, kmeta, kbias],
                out_specs=[qdo, qvec],
                out_shape=[jax.ShapeDtypeStruct((B, H, Tp, dv), q.dtype),
                           jax.ShapeDtypeStruct((B, H, 1, Tp), jnp.float32)])(
        q, k, v, qp, qg, kp, kg, kf, kb)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, qp, qg, kp, kg, kf, kb):
    return _forward(cfg, q, k, v, qp, qg, kp, kg, kf, kb)[0]


def _flash_fwd(cfg, q, k, v, qp, qg, kp, kg, kf, kb):
    o, lse = _forward(cfg, q, k, v, qp, qg, kp, kg, kf, kb)
    return o, (q, k, v, qp, qg, kp, kg, kf, kb, o, lse)


def _flash_bwd(cfg, res, do):
    backend, bq, bk, scale, causal, window = cfg
    q, k, v, qp, qg, kp, kg, kf, kb, o, lse = res
    B, H, Tp, d = q.shape
    Hkv, Sp, dv = k.shape[1], k.shape[2], v.shape[-1]
    rep, Hb = H // Hkv, kb.shape[1]
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)[:, :, None, :]
    kw = dict(scale=scale, causal=causal, window=window)
    qrow, qdo, qvec, qmeta, krow, kval, kmeta, kbias = _specs(B, H, rep, Hb, bq, bk, Tp, Sp, d,
                                                              dv, q_blocked=True)
    dq = call(functools.partial(_dq_kernel, bk=bk, nk=Sp // bk, **kw), backend=backend,
              grid=(B, H, Tp // bq), name="flash_attention_dq",
              in_specs=[qrow, krow, kval, qdo, qvec, qvec, qmeta, qmeta, kmeta, kmeta, kmeta,
                        kbias],
              out_specs=qrow, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype))(
        q, k, v, do, lse, delta, qp, qg, kp, kg, kf, kb)
    qrow, qdo, qvec, qmeta, krow, kval, kmeta, kbias = _specs(B, H, rep, Hb, bq, bk, Tp, Sp, d,
                                                              dv, q_blocked=False)
    per_head = lambda spec, w: pl.BlockSpec((1, 1, bk, w), lambda b, h, j: (b, h, j, 0))  # noqa: E731
    dk, dvv, db = call(
        functools.partial(_dkv_kernel, bq=bq, nq=Tp // bq, **kw), backend=backend,
        grid=(B, H, Sp // bk), name="flash_attention_dkv",
        in_specs=[qrow, krow, kval, qdo, qvec, qvec, qmeta, qmeta, kmeta, kmeta, kmeta, kbias],
        out_specs=[per_head(krow, d), per_head(kval, dv),
                   pl.BlockSpec((1, 1, 1, bk), lambda b, h, j: (b, h, 0, j))],
        out_shape=[jax.ShapeDtypeStruct((B, H, Sp, d), jnp.float32),
                   jax.ShapeDtypeStruct((B, H, Sp, dv), jnp.float32),
                   jax.ShapeDtypeStruct((B, H, 1, Sp), jnp.float32)])(
        q, k, v, do, lse, delta, qp, qg, kp, kg, kf, kb)
    dk = jnp.sum(dk.reshape(B, Hkv, rep, Sp, d), axis=2).astype(k.dtype)
    dvv = jnp.sum(dvv.reshape(B, Hkv, rep, Sp, dv), axis=2).astype(v.dtype)
    db = (db if Hb == H else jnp.sum(db, axis=1, keepdims=True)).astype(kb.dtype)
    return dq, dk, dvv, None, None, None, None, None, db


_flash.defvjp(_flash_fwd, _flash_bwd)


def attention(q: Array, k: Array, v: Array, *, q_pos: Array, k_pos: Array, q_group: Array,
              k_group: Array, k_valid: Array, k_always: Array | None = None,
              k_bias: Array | None = None, causal: bool = True, window: int | None = None,
              scale: float | None = None, block: int = 128, block_q: int | None = None,
              backend: str = "interpret") -> Array:
    """`reference.attention`'s function (q [B, T, H, d]; k, v [B, S, Hkv, d]) by the kernels;
    `block` keys (and, unless `block_q`, queries) per block."""
    B, T, H, d = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    if H % Hkv:
        raise ValueError(f"attention: {H} query heads are not a multiple of {Hkv} kv heads")
    scale = d ** -0.5 if scale is None else float(scale)
    bq, bk = block_size(block_q or block, T), block_size(block, S)
    Tp, Sp = round_up(T, bq), round_up(S, bk)

    def pad(x, n, axis, value=0):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, n - x.shape[axis])
        return jnp.pad(x, widths, constant_values=value)

    qh = pad(jnp.swapaxes(q, 1, 2), Tp, 2)
    kh, vh = pad(jnp.swapaxes(k, 1, 2), Sp, 2), pad(jnp.swapaxes(v, 1, 2), Sp, 2)
    meta = lambda x, n: pad(x.astype(jnp.int32), n, 1)[:, None, :]      # noqa: E731
    flags = k_valid.astype(jnp.int32) * VALID
    if k_always is not None:
        flags = flags + k_always.astype(jnp.int32) * ALWAYS
    if k_bias is None:
        kb = jnp.zeros((B, 1, 1, Sp), jnp.float32)
    else:
        kb = pad(jnp.broadcast_to(k_bias, (B, k_bias.shape[1], S)).astype(jnp.float32), Sp, 2)
        kb = kb[:, :, None, :]
    cfg = (backend, bq, bk, scale, bool(causal), None if window is None else int(window))
    per_head_bias = kb.shape[1] > 1
    (o,) = over_mesh(lambda *a: (_flash(cfg, *a),),
                     (qh, kh, vh, meta(q_pos, Tp), meta(q_group, Tp), meta(k_pos, Sp),
                      meta(k_group, Sp), meta(flags, Sp), kb),
                     ("bh", "bh", "bh", "b", "b", "b", "b", "b", "bh" if per_head_bias else "b"),
                     ("bh",), batch=B, heads=(H, Hkv) + ((kb.shape[1],) if per_head_bias else ()))
    return jnp.swapaxes(o[:, :, :T], 1, 2)
