"""numbabn.train.summary (medians/IQR, Clopper–Pearson win counts) and
numbabn.train.lr_search (the edge between training and diverging)."""

import math

import numpy as np
import pytest
from scipy.stats import binom

from numbabn.train.lr_search import largest_stable_lr, trains
from numbabn.train.summary import binomial_interval, compare, format_summary, spread, win_count


def test_spread_median_and_iqr_drop_non_finite():
    values = np.array([[4.0, 1.0, np.nan], [3.0, np.inf, 2.0]])
    out = spread(values)
    assert out == {"median": 2.5, "q25": 1.75, "q75": 3.25, "n": 4, "dropped": 2}
    empty = spread([np.nan])
    assert math.isnan(empty["median"]) and empty["n"] == 0 and empty["dropped"] == 1


def test_clopper_pearson_closed_forms():
    # k = 0: upper = 1 − (α/2)^(1/n); k = n: lower = (α/2)^(1/n)
    n = 10
    assert binomial_interval(0, n) == (0.0, pytest.approx(1 - 0.025 ** (1 / n), rel=1e-12))
    assert binomial_interval(n, n) == (pytest.approx(0.025 ** (1 / n), rel=1e-12), 1.0)
    assert binomial_interval(0, 0) == (0.0, 1.0)
    lo, hi = binomial_interval(3, 3)  # "BN wins on 3 of 3 seeds" is weak evidence
    assert hi == 1.0 and lo == pytest.approx(0.2924, abs=1e-4)


@pytest.mark.parametrize("n", [5, 20, 40])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.83])
def test_clopper_pearson_coverage_is_at_least_95_percent(n, p):
    """Exact coverage: the probability, over k ~ Binomial(n, p), that the interval of k
    contains p. Clopper–Pearson is conservative: never below the nominal level."""
    covered = sum(
        binom.pmf(k, n, p) for k in range(n + 1) if binomial_interval(k, n)[0] <= p <= binomial_interval(k, n)[1]
    )
    assert covered >= 0.95 - 1e-12


def test_win_count_and_errors():
    assert win_count(7, 10) == {"k": 7, "n": 10, "fraction": 0.7, "ci": list(binomial_interval(7, 10))}
    for k, n in ((3, 2), (-1, 4), (1.5, 4), (True, 3)):
        with pytest.raises(ValueError, match="binomial_interval"):
            binomial_interval(k, n)
    with pytest.raises(ValueError, match="confidence"):
        binomial_interval(1, 2, confidence=1.0)


def test_compare_counts_probes_and_seeds():
    std = np.array([[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    bn = np.array(
        [
            [0.5, 0.5, 2.0, 0.5],  # median 0.5 < 1: seed win
            [4.0, 4.0, 1.0, np.nan],  # one pair dropped; median 4 > 2: seed loss
            [0.1, 0.2, 0.3, 0.4],
        ]
    )  # seed win
    out = compare(bn, std)
    assert out["probes"]["k"] == 3 + 1 + 4 and out["probes"]["n"] == 11
    assert out["seeds"]["k"] == 2 and out["seeds"]["n"] == 3
    ratios = np.array([0.5, 0.5, 2, 0.5, 2, 2, 0.5, 0.1, 0.2, 0.3, 0.4])
    assert out["ratio"]["median"] == pytest.approx(np.median(ratios))
    assert out["bn"]["n"] == out["standard"]["n"] == 11
    with pytest.raises(ValueError, match="same"):
        compare(bn[:, :2], std)


# ------------------------------------------------------------------ learning-rate edge
def test_format_summary_reads_as_text():
    """What ``numbabn experiment`` prints without --json: sections indented, names
    aligned within a section, spreads and win counts in words (it used to print
    each top-level entry as one Python dict repr)."""
    bn = np.array([[1.0, 2.0, 3.0, np.nan], [2.0, 2.0, 2.0, 2.0]])
    standard = np.array([[2.0, 4.0, 1.0, 1.0], [4.0, 4.0, 4.0, 4.0]])
    summary = {
        "data": "digits 8×8",
        "lr=0.1": {"l2": compare(bn, standard), "steps": spread([np.nan, np.inf]), "first": win_count(0, 0)},
        "figures": ["a.png", "b.png"],
        "skipped": {},
        "seconds": 3.14159,
    }
    assert format_summary(summary).splitlines() == [
        "data:    digits 8×8",
        "lr=0.1",
        "  l2",
        "    ratio:    median 0.5, IQR 0.5 to 0.5, n=7, 1 dropped",  # the NaN pair
        "    probes:   6 of 7 (86%; 95% CI 42% to 100%)",
        "    seeds:    1 of 2 (50%; 95% CI 1% to 99%)",  # seed 0: median 2 against 2, not smaller
        "    bn:       median 2, IQR 2 to 2, n=7, 1 dropped",
        "    standard: median 4, IQR 3 to 4, n=7, 1 dropped",
        "  steps: no finite value, 2 dropped",
        "  first: 0 of 0",
        "figures: a.png, b.png",
        "skipped: (empty)",
        "seconds: 3.142",
    ]
    assert format_summary({}) == ""


def test_trains_rule():
    assert trains([2.0, 1.5, 1.0]) and not trains([2.0, 1.5, 1.0], fraction=0.5)
    assert trains([2.0, 1.5, 0.9], fraction=0.5)
    assert not trains([1.0, 1.5, 2.0]) and not trains([1.0, np.nan, 0.5]) and not trains([1.0, 0.5, np.inf])
    assert not trains([])


def _gd_on_quadratic(curvature, steps=100):
    """Gradient descent on L = ½·a·θ²: diverges exactly when lr > 2/a (in float64, an
    overflow is inf, as in a network's run, not Python's OverflowError)."""

    def run(lr):
        theta, losses = np.float64(1.0), []
        with np.errstate(over="ignore", invalid="ignore"):
            for _ in range(steps):
                losses.append(0.5 * curvature * theta**2)
                theta -= lr * curvature * theta
        return losses

    return run


@pytest.mark.parametrize("curvature, lr0", [(7.0, 0.01), (7.0, 5.0), (0.3, 1.0)])
def test_largest_stable_lr_brackets_two_over_curvature(curvature, lr0):
    edge = 2 / curvature
    res = largest_stable_lr(_gd_on_quadratic(curvature), lr0)
    assert res["stable_lr"] < edge <= res["diverged_lr"]
    assert res["diverged_lr"] / res["stable_lr"] <= 2 ** (1 / 8) * (1 + 1e-12)  # 3 bisections of a doubling
    assert all(t["trained"] == (t["lr"] < edge) for t in res["trials"])


def _window(low, high, chance=2.3):
    """A classifier's short runs on shared batches: below ``low`` the loss falls by
    lr·(1 − noise) but not by half (too small a rate, the tail even above the first
    loss at the smallest rates), [low, high) trains, up to 4·high collapses to
    chance (a stall), above overflows."""

    def run(lr):
        if lr >= 4 * high:
            return [chance, np.inf]
        if lr >= high:
            return [chance - 0.01, chance - 0.02]
        if lr >= low:
            return [chance, 0.2]
        return [chance, chance + 0.01 - lr / low]

    return run


@pytest.mark.parametrize("lr0", [0.4, 0.05, 1e-4])
def test_largest_stable_lr_climbs_from_a_stall(lr0):
    # a start that stalls is too small a rate: the bracket doubles up to the window
    # (before: it halved 24 times and reported the start as the divergence)
    res = largest_stable_lr(_window(0.1, 1.0), lr0, fraction=0.5)
    assert res["stable_lr"] < 1.0 <= res["diverged_lr"] <= 2 ** (1 / 8) * res["stable_lr"] * (1 + 1e-12)
    assert len(res["trials"]) <= 3 + math.ceil(math.log2(1.0 / lr0)) + 3
    assert [t["outcome"] for t in res["trials"]].count("diverged") <= 1


def test_largest_stable_lr_stall_above_the_window_and_none():
    # a start that collapses to chance stalls too: the climb gains nothing, so the
    # search halves from below the start and finds the window
    res = largest_stable_lr(_window(0.1, 1.0), 2.5, fraction=0.5)
    assert res["stable_lr"] < 1.0 <= res["diverged_lr"] <= 2 ** (1 / 8) * res["stable_lr"] * (1 + 1e-12)
    # no rate trains: only a rate that overflowed is reported as the divergence
    res = largest_stable_lr(lambda lr: [2.3, np.inf] if lr >= 4 else [2.3, 2.3 - lr / 10], 0.01, fraction=0.5)
    assert res["stable_lr"] is None and res["diverged_lr"] == 0.01 * 2**9
    res = largest_stable_lr(lambda lr: [1.0, 0.9], 0.01, fraction=0.5, lr_max=1.0, max_trials=10)
    assert res == {**res, "stable_lr": None, "diverged_lr": None}
    assert {t["outcome"] for t in res["trials"]} == {"stalled"} and len(res["trials"]) == 10


def test_largest_stable_lr_no_divergence_and_errors():
    res = largest_stable_lr(lambda lr: [1.0, 0.5], 1.0, lr_max=10.0)
    assert res["diverged_lr"] is None and res["stable_lr"] == 8.0
    res = largest_stable_lr(lambda lr: [1.0, 2.0], 1.0, max_trials=5)
    assert res["stable_lr"] is None and len(res["trials"]) == 5
    for kwargs in (
        {"lr0": 0.0},
        {"lr0": 1.0, "factor": 1.0},
        {"lr0": np.nan},
        {"lr0": 1.0, "fraction": 0},
        {"lr0": 20.0, "lr_max": 10.0},
    ):
        with pytest.raises(ValueError, match="largest_stable_lr"):
            largest_stable_lr(lambda lr: [1.0], **kwargs)
    # run() returning a scalar or a 2-D array: an error naming what run must return,
    # not an IndexError from inside the search
    for bad in (0.5, [[1.0, 0.5]]):
        with pytest.raises(ValueError, match=r"largest_stable_lr: run\(lr\) must return the step losses as a 1-D"):
            largest_stable_lr(lambda lr, bad=bad: bad, 1.0)
