"""Numerical faults: what a train step does when its loss or gradients are not finite, or spike.

    guarded(step_fn, nonfinite=..., spike_factor=...) wraps a pure step
        step_fn(params, opt_state, step, batch) -> (params, opt_state, step + 1, metrics)
    into
        fn(params, opt_state, step, guard, batch) -> (params, opt_state, step + 1, guard, metrics)

The update of a step is applied only when it is good:

    finite_t = isfinite(loss_t) and isfinite(||g_t||)
    spike_t  = spike_factor > 0 and the window is full and loss_t > spike_factor * median(window)
    good_t   = finite_t and not spike_t                      (train.nonfinite = "skip")
             = finite_t and not spike_t and no earlier step was non-finite   ("stop")

otherwise params and optimiser state stay as they were (a `jnp.where` per leaf) and the step
counter still advances (the batch is consumed, as in an uninterrupted run). The guard state is
checkpointed with the train state, so a resumed run decides exactly as an uninterrupted one:

    skipped    int32    updates not applied so far (metrics: "skipped")
    first_bad  int32    the first non-finite step (1-based, as logged), -1 while none
    recent     f32[W]   the last W applied losses (a ring buffer; W = train.spike_window)
    n_recent   int32    how many losses it has seen

Under "stop" the trainer stops when it next reads the guard (at the next log line, checkpoint or
the end) without saving: the last complete checkpoint is the last good state. "off" applies every
update (no guard, no cost).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

POLICIES = ("stop", "skip", "off")


def init_guard(window: int) -> dict:
    return {"skipped": jnp.int32(0), "first_bad": jnp.int32(-1),
            "recent": jnp.zeros((max(int(window), 1),), jnp.float32), "n_recent": jnp.int32(0)}


def guarded(step_fn, *, nonfinite: str = "stop", spike_factor: float = 0.0):
    if nonfinite not in POLICIES:
        raise ValueError(f"nonfinite={nonfinite!r} is not one of {', '.join(POLICIES)}")

    def fn(params, opt_state, step, guard, batch):
        new_p, new_o, new_step, m = step_fn(params, opt_state, step, batch)
        if nonfinite == "off" and not spike_factor:
            m = dict(m, skipped=guard["skipped"], first_bad=guard["first_bad"])
            return new_p, new_o, new_step, guard, m
        loss = m["loss"]
        finite = jnp.isfinite(loss) & jnp.isfinite(m["grad_norm"])
        good = finite if nonfinite != "off" else jnp.bool_(True)
        first_bad = guard["first_bad"]
        if nonfinite == "stop":
            halted = first_bad >= 0
            first_bad = jnp.where(~halted & ~finite, step + 1, first_bad)
            good = good & ~halted
        recent, n_recent = guard["recent"], guard["n_recent"]
        if spike_factor:
            W = recent.shape[0]
            spike = (n_recent >= W) & finite & (loss > spike_factor * jnp.median(recent))
            good = good & ~spike
            recent = jnp.where(good, recent.at[n_recent % W].set(loss), recent)
            n_recent = n_recent + good.astype(jnp.int32)

        def pick(new, old):
            return jax.tree.map(lambda a, b: jnp.where(good, a, b), new, old)

        guard = {"skipped": guard["skipped"] + (~good).astype(jnp.int32), "first_bad": first_bad,
                 "recent": recent, "n_recent": n_recent}
        m = dict(m, skipped=guard["skipped"], first_bad=first_bad)
        return pick(new_p, params), pick(new_o, opt_state), new_step, guard, m

    return fn
