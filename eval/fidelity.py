"""MemMamba's memory-fidelity metrics (specs/memmamba.md §2.4), for any causal LM of the zoo.

    etmf(logits, tokens, embedding, shift=0)   horizontal: mean cos(E[x_{j+shift}], Σ_v p_j(v) E[v])
                                               with p_j = softmax(logits_j / tau); shift 0 is the
                                               paper-literal estimator, shift 1 compares the
                                               prediction with the token it predicts (§8)
    eclmf(hiddens, gap, lam=1e-4)              vertical: mean over l of 1 - ||Y - X W|| / (||X|| + eps),
                                               X = H_l, Y = H_{l+gap}, W the ridge decoder
                                               (X^T X + lam I)^{-1} X^T Y, solved in float64
    hidden_states(model, tokens)               the residual stream after each block [L][B, T, D]

ETMF_Δ (the distance-sensitive variant) is `etmf(..., shift=Δ)`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def etmf(logits, tokens, embedding, *, shift: int = 0, tau: float = 1.0, mask=None) -> float:
    """logits [B, T, V], tokens [B, T], embedding [V, D]; `mask` [B, T] marks real tokens (a
    position counts when it and its partner at +shift are real)."""
    logits, tokens = jnp.asarray(logits, jnp.float32), jnp.asarray(tokens)
    emb = jnp.asarray(embedding, jnp.float32)
    T = tokens.shape[1]
    if not 0 <= shift < T:
        raise ValueError(f"shift={shift} must be in [0, {T})")
    p = jax.nn.softmax(logits / tau, axis=-1)
    expected = p @ emb                                        # [B, T, D]
    target = emb[tokens]
    a, b = target[:, shift:], expected[:, :T - shift]          # t_{j+shift} vs t̂_j
    cos = jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + 1e-12)
    m = jnp.ones(tokens.shape, bool) if mask is None else jnp.asarray(mask, bool)
    w = (m[:, shift:] & m[:, :T - shift]).astype(jnp.float32)
    return float(jnp.sum(cos * w) / jnp.maximum(jnp.sum(w), 1.0))


def eclmf(hiddens, gap: int, *, lam: float = 1e-4, eps: float = 1e-6, mask=None) -> float:
    """hiddens: a list of [B, T, D] per layer (float32 or wider); `mask` [B, T] drops pads."""
    hs = [np.asarray(h, np.float64) for h in hiddens]
    if not 1 <= gap < len(hs):
        raise ValueError(f"gap={gap} needs at least {gap + 1} layers, got {len(hs)}")
    keep = None if mask is None else np.asarray(mask, bool).reshape(-1)
    scores = []
    for lo in range(len(hs) - gap):
        X = hs[lo].reshape(-1, hs[lo].shape[-1])
        Y = hs[lo + gap].reshape(-1, hs[lo + gap].shape[-1])
        if keep is not None:
            X, Y = X[keep], Y[keep]
        W = np.linalg.solve(X.T @ X + lam * np.eye(X.shape[1]), X.T @ Y)
        r = np.linalg.norm(Y - X @ W) / (np.linalg.norm(X) + eps)
        scores.append(1.0 - r)
    return float(np.mean(scores))


def hidden_states(model, tokens, *, mask=None) -> list:
    """The residual stream after each block of a zoo CausalLM (before the final norm)."""
    B, T = tokens.shape
    h0 = model.embed_tokens(tokens, jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)))
    out: list = []
    model.run_blocks(h0, (None,) * len(model.blocks), mask=mask, segment_ids=None, key=None,
                     hiddens=out)
    return out
