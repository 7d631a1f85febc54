"""The largest learning rate at which a network still trains, by a short search.

Santurkar et al. 2018 pick the top step size of their landscape probes just below
the learning rate at which the standard (no-BN) network diverges, and their Fig. 1
rests on "BN allows a larger learning rate". Both need the same number: the edge
between training and diverging, found here by

1. **bracketing**: a short run at ``lr0``; while it trains, double the rate
   (halve it while it does not) until one side of the edge is found;
2. **bisection** in log space, ``refine`` times (factor 2 → 2^(1/2^refine)
   resolution: 9 % for the default 3).

A short run *trains* when every step loss is finite and the mean of its last tenth
is below ``fraction`` × the loss of its first step; otherwise it diverged or
stalled. ``fraction`` 1 (any decrease) suits regression, where a diverging run
overflows; classifiers use ½, because a too-large rate there often does not
overflow but collapses the network to chance (loss ≈ ln C, just below a slightly
worse initial loss). The edge need not be sharp (a rate can train in one window
and fail in a longer one), so the answer is specific to the run length, which is
recorded with it.
"""

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from .. import _checks as V


def trains(losses: ArrayLike, fraction: float = 1.0) -> bool:
    """True when every loss is finite and the mean of the last tenth is below
    ``fraction`` × the first loss."""
    losses = np.asarray(losses, dtype=np.float64)
    if losses.size == 0 or not np.all(np.isfinite(losses)):
        return False
    tail = losses[-max(1, losses.size // 10) :]
    return bool(tail.mean() < fraction * losses[0])


def largest_stable_lr(
    run: Callable[[float], ArrayLike],
    lr0: float,
    *,
    fraction: float = 1.0,
    factor: float = 2.0,
    refine: int = 3,
    max_trials: int = 24,
    lr_max: float = 1e4,
) -> dict[str, Any]:
    """Bracket and bisect the edge between training and diverging (module docstring).

    ``run(lr)`` trains a fresh network for a short, fixed number of steps and
    returns its step losses; ``fraction`` is the :func:`trains` criterion. Returns
    ``{"stable_lr", "diverged_lr", "trials": [{"lr", "trained", "final_loss"}]}``:
    ``stable_lr`` is the largest rate seen to train with no smaller rate failing above
    it (None if even the smallest tried failed) and ``diverged_lr`` the smallest that
    failed (None when nothing up to ``lr_max`` failed). At most ``max_trials`` (>= 1)
    runs in all, bracketing and ``refine`` (>= 0) bisection steps together;
    ``lr0 <= lr_max``. Every argument is checked before the first run; a ``run``
    that returns anything but a 1-D sequence raises ValueError.
    """
    fn = "largest_stable_lr"
    if not callable(run):
        raise TypeError(f"{fn}: run must be callable as run(lr) -> step losses, got {V.describe(run)}")
    for name, value in (("lr0", lr0), ("lr_max", lr_max), ("fraction", fraction)):
        V.check_number(fn, name, value, 0, low_open=True, expected="a finite number > 0")
    V.check_number(fn, "factor", factor, 1, low_open=True, expected="a finite number > 1")
    refine = V.check_int(fn, "refine", refine, minimum=0)
    max_trials = V.check_int(fn, "max_trials", max_trials)
    if lr0 > lr_max:
        raise ValueError(f"{fn}: lr0 must be <= lr_max (the search stays below lr_max), got {lr0!r} > {lr_max!r}")
    trials: list[dict[str, Any]] = []

    def trial(lr: float) -> bool:
        losses = np.asarray(run(lr), dtype=np.float64)
        if losses.ndim != 1:
            raise ValueError(
                f"{fn}: run(lr) must return the step losses as a 1-D sequence, got an array of shape "
                f"{losses.shape} for lr={lr!r}"
            )
        ok = trains(losses, fraction)
        trials.append({"lr": float(lr), "trained": ok, "final_loss": float(losses[-1]) if losses.size else None})
        return ok

    stable: float | None = None
    diverged: float | None = None
    lr = float(lr0)
    while len(trials) < max_trials:
        if trial(lr):
            stable = lr
            if diverged is not None or lr * factor > lr_max:
                break
            lr *= factor
        else:
            diverged = lr
            if stable is not None:
                break
            lr /= factor
    for _ in range(refine):
        if stable is None or diverged is None or len(trials) >= max_trials:
            break
        mid = math.sqrt(stable * diverged)
        if trial(mid):
            stable = mid
        else:
            diverged = mid
    return {"stable_lr": stable, "diverged_lr": diverged, "trials": trials}
