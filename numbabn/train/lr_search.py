"""The largest learning rate at which a network still trains, by a short search.

Santurkar et al. 2018 pick the top step size of their landscape probes just below
the learning rate at which the standard (no-BN) network diverges, and their Fig. 1
rests on "BN allows a larger learning rate". Both need the same number: the edge
between training and diverging, found here by

1. **bracketing**: a short run at ``lr0``, then doubling the rate while runs train
   (or, before any has trained, while a stalled run makes more progress than the
   one below it) and halving it otherwise, until a rate that trains has a failing
   rate above it;
2. **bisection** in log space, ``refine`` times (factor 2 → 2^(1/2^refine)
   resolution: 9 % for the default 3).

A short run (:func:`outcome`) *trains* when every step loss is finite and the mean
of its last tenth (its *tail*) is below ``fraction`` × the loss of its first step;
it *diverges* when a loss is not finite (it overflowed); otherwise it *stalls*.
``fraction`` 1 (any decrease) suits regression, where a diverging run overflows;
classifiers use ½, because a too-large rate there often does not overflow but
collapses the network to chance (loss ≈ ln C, just below a slightly worse initial
loss).

A stall alone does not say on which side of the training rates it lies: too small
a rate (little progress in a short run, its tail even above the first loss by the
batches' noise) or too large (a collapse, or growth short of an overflow). So only
a divergence sends the search down at once. Above a rate that trains, a stall is a
failure like a divergence: the edge is below it. Before any rate has trained, a
stall is taken as too small a rate and the bracket doubles up from it, as long as
each stalled run ends with a lower tail than the one below it: ``run`` trains on
the same batches at every rate (the experiments seed it), so a lower tail at the
larger rate is more progress, not noise. A climb that diverges or stops gaining without a rate that
trains means the start was on the large side (or no rate trains in a run this
short): the search then halves from below the start, as after a diverging start.
``diverged_lr`` is a rate that failed (diverged or stalled) above one that trained
or, when none trained, one that diverged, never a mere stall. The edge need not be sharp (a rate
can train in one window and fail in a longer one), so the answer is specific to
the run length, which is recorded with it.

**Early stops.** Before any rate has trained, the search ends as soon as its runs
show that no rate can (the result's ``stopped`` says which, and ``reason`` lists
every rate tried and how its run went), instead of halving through the rest of
``max_trials``:

* ``"non_finite_start"``: a run's first loss is not finite (or it has none). That
  loss is the fresh network's, before any update, so every rate fails alike
  (non-finite data, a broken initialisation).
* ``"rate_has_no_effect"``: three rates (a factor ``factor**2`` apart at least) gave
  the very same finite losses: the rate does not change the run (zero gradients,
  a loss that cannot decrease), so no rate trains. Not two: runs that collapse to
  chance can end alike at two rates above a window that trains. Identical
  *divergences* do not count: an overflow after an update depends on the rate,
  and a smaller one may not overflow.
* ``"too_small_below"``: about to halve below every rate tried, the three smallest
  all stalled, each ending lower than the one below it: the climb's evidence that a
  larger rate makes more progress, twice over. Those rates are too small, a rate
  below them makes less progress still, and every rate above them already failed
  (the climb ended at a divergence, a stall that gained nothing, or ``lr_max``), so
  no rate within the search's lattice is left (a training window, if any, would be
  narrower than ``factor``; labels that are noise to the inputs end here). A
  collapse to chance above the window does not stop the search: its tails do not
  fall steadily with the rate.
"""

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .. import _checks as V

TRAINED, STALLED, DIVERGED = "trained", "stalled", "diverged"

# why a search ended, its result's "stopped": a rate trained below one that failed; rates
# trained up to lr_max; the runs ran out; or, no rate having trained, an early stop
BRACKETED, LR_MAX, MAX_TRIALS = "bracketed", "lr_max", "max_trials"
NON_FINITE_START, RATE_HAS_NO_EFFECT, TOO_SMALL_BELOW = "non_finite_start", "rate_has_no_effect", "too_small_below"
STOPS = (BRACKETED, LR_MAX, MAX_TRIALS, NON_FINITE_START, RATE_HAS_NO_EFFECT, TOO_SMALL_BELOW)


def _tail(losses: NDArray[np.float64]) -> float:
    """The mean of the last tenth of a run's losses (at least the last one)."""
    return float(losses[-max(1, losses.size // 10) :].mean())


def outcome(losses: ArrayLike, fraction: float = 1.0) -> str:
    """How a short run went (module docstring): ``"diverged"`` when a loss is not
    finite (or there is none), ``"trained"`` when the mean of the last tenth is below
    ``fraction`` × the first loss, ``"stalled"`` otherwise."""
    losses = np.asarray(losses, dtype=np.float64)
    if losses.size == 0 or not np.all(np.isfinite(losses)):
        return DIVERGED
    return TRAINED if _tail(losses) < fraction * losses[0] else STALLED


def trains(losses: ArrayLike, fraction: float = 1.0) -> bool:
    """True when every loss is finite and the mean of the last tenth is below
    ``fraction`` × the first loss (:func:`outcome` is ``"trained"``)."""
    return outcome(losses, fraction) == TRAINED


def _run_text(lr: float, result: str, losses: NDArray[np.float64]) -> str:
    """One tried rate and what its run did, for a search's ``reason``."""
    if losses.size == 0:
        return f"{lr:.3g} {result} (no losses)"
    if result == DIVERGED:
        bad = int(np.argmin(np.isfinite(losses)))
        return f"{lr:.3g} diverged (loss {bad + 1} of {losses.size} not finite)"
    return f"{lr:.3g} {result} (first loss {losses[0]:.4g}, tail {_tail(losses):.4g})"


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
    returns its step losses, the first of them the fresh network's (before any
    update, as :class:`~numbabn.train.trainer.Trainer` records it); ``fraction`` is
    the :func:`outcome` criterion. Returns ``{"stable_lr", "diverged_lr", "trials":
    [{"lr", "trained", "outcome", "final_loss"}], "stopped", "reason"}``:
    ``stable_lr`` is the largest rate seen to train with no smaller rate failing
    above it (None if no rate tried trained) and ``diverged_lr`` the smallest rate
    above it that failed (diverged or stalled); with no ``stable_lr``, the smallest
    rate that diverged (a rate that only stalled is no divergence). ``diverged_lr``
    is None when no such rate was found (nothing up to ``lr_max`` failed).
    ``stopped`` says why the search ended (``STOPS``) and ``reason`` says it in
    a line, naming, when no rate trained, every rate tried and how its run went.

    At most ``max_trials`` (>= 1) runs in all, bracketing and ``refine`` (>= 0)
    bisection steps together; fewer when the runs show that no rate can train (the
    module docstring's early stops: a non-finite first loss, the same losses at three
    rates, or, at the three smallest rates tried, less progress at each smaller
    one), which then ends the search at once. ``lr0 <= lr_max``. Every argument is checked before the
    first run; a ``run`` that returns anything but a 1-D sequence raises ValueError.
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
    runs: list[NDArray[np.float64]] = []  # each trial's losses, for the early stops
    tails: list[float] = []  # each trial's tail (nan for a run with no losses)

    def trial(lr: float) -> tuple[str, float]:
        losses = np.asarray(run(lr), dtype=np.float64)
        if losses.ndim != 1:
            raise ValueError(
                f"{fn}: run(lr) must return the step losses as a 1-D sequence, got an array of shape "
                f"{losses.shape} for lr={lr!r}"
            )
        result = outcome(losses, fraction)
        trials.append(
            {
                "lr": float(lr),
                "trained": result == TRAINED,
                "outcome": result,
                "final_loss": float(losses[-1]) if losses.size else None,
            }
        )
        runs.append(losses)
        tails.append(_tail(losses) if losses.size else math.nan)
        return result, tails[-1] if result == STALLED else math.nan

    def failed_above(lr: float) -> float | None:
        """The smallest rate above ``lr`` that failed, None if none did."""
        return min((t["lr"] for t in trials if t["lr"] > lr and not t["trained"]), default=None)

    def rate_cannot_matter() -> tuple[str, str] | None:
        """Before any rate has trained, the last run's evidence that no rate can:
        a run that failed before its rate acted, or one the rate did not change."""
        losses, lr = runs[-1], trials[-1]["lr"]
        if losses.size == 0 or not np.isfinite(losses[0]):
            what = "returned no losses" if losses.size == 0 else "began with a non-finite loss"
            return NON_FINITE_START, (
                f"the run at {lr:.3g} {what}, before any update at that rate: every rate fails alike"
            )
        if not np.all(np.isfinite(losses)):
            return None  # an overflow after an update depends on the rate: a smaller one may not
        same = [t["lr"] for t, other in zip(trials, runs, strict=True) if np.array_equal(other, losses)]
        if len(same) >= 3:
            rates = ", ".join(f"{r:.3g}" for r in sorted(same))
            return RATE_HAS_NO_EFFECT, (
                f"the runs at {rates} returned the same losses, so the rate does not change the run (zero "
                "gradients, or a loss that cannot decrease): no rate trains"
            )
        return None

    def exhausted_below() -> tuple[str, str] | None:
        """Before halving below every rate tried: stop if the three smallest rates
        all stalled, each ending lower than the one below it (more progress with
        the rate, the climb's evidence, twice): smaller rates only do worse."""
        low = sorted(range(len(trials)), key=lambda i: trials[i]["lr"])[:3]
        if len(low) < 3 or any(trials[i]["outcome"] != STALLED for i in low):
            return None
        if not tails[low[0]] > tails[low[1]] > tails[low[2]]:
            return None
        rates = ", ".join(f"{trials[i]['lr']:.3g}" for i in low)
        return TOO_SMALL_BELOW, (
            f"no rate trains in runs this short: at {rates} each larger rate made more progress without "
            f"training, so a rate below {trials[low[0]]['lr']:.3g} makes less, and every rate above failed"
        )

    stable: float | None = None
    stop: tuple[str, str] | None = None  # an early stop: no rate can train
    lr, climbing, below = float(lr0), True, math.inf  # below: the tail of the stalled run below lr
    while len(trials) < max_trials:
        result, tail = trial(lr)
        if result == TRAINED:
            stable = lr
            if failed_above(lr) is not None or lr * factor > lr_max:
                break
            lr *= factor
        elif stable is not None:
            break  # a failure above a rate that trains: bracketed
        elif (stop := rate_cannot_matter()) is not None:
            break
        elif climbing and result == STALLED and tail < below and lr * factor <= lr_max:
            lr, below = lr * factor, tail  # nothing has trained yet and progress grows with the rate: too small
        else:
            # a divergence, or a climb that stopped gaining: the edge is below every rate tried
            climbing = False
            if (stop := exhausted_below()) is not None:
                break
            lr = min(t["lr"] for t in trials) / factor
    diverged = None if stable is None else failed_above(stable)
    bisections = 0
    for _ in range(refine):
        if stable is None or diverged is None or len(trials) >= max_trials:
            break
        mid = math.sqrt(stable * diverged)
        bisections += 1
        if trial(mid)[0] == TRAINED:
            stable = mid
        else:
            diverged = mid
    if stable is None:
        diverged = min((t["lr"] for t in trials if t["outcome"] == DIVERGED), default=None)
    if stop is not None:
        stopped, why = stop
    elif stable is not None and diverged is not None:
        stopped = BRACKETED
        why = f"{stable:.3g} trains and {diverged:.3g} fails, after {bisections} of {refine} bisections"
    elif stable is not None and stable * factor > lr_max:
        stopped, why = (
            LR_MAX,
            f"rates trained up to {stable:.3g}, none failing above it: the next would pass lr_max={lr_max:g}",
        )
    elif stable is not None:
        stopped = MAX_TRIALS
        why = f"rates trained up to {stable:.3g} and no rate failed above it within max_trials={max_trials} runs"
    else:
        stopped, why = MAX_TRIALS, f"no rate trained within max_trials={max_trials} runs"
    if stable is None:
        order = sorted(range(len(trials)), key=lambda i: trials[i]["lr"])
        tried = "; ".join(_run_text(trials[i]["lr"], trials[i]["outcome"], runs[i]) for i in order)
        why += f". Tried {len(trials)} rates: {tried}"
    return {"stable_lr": stable, "diverged_lr": diverged, "trials": trials, "stopped": stopped, "reason": why}
