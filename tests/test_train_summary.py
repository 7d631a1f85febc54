"""numbabn.train.summary (medians/IQR, Clopper–Pearson win counts) and
numbabn.train.lr_search (the edge between training and diverging)."""

import math

import numpy as np
import pytest
from scipy.stats import binom

from numbabn.train.lr_search import largest_stable_lr, trains
from numbabn.train.summary import binomial_interval, censored_spread, compare, format_summary, spread, win_count


def test_spread_median_and_iqr_drop_non_finite():
    values = np.array([[4.0, 1.0, np.nan], [3.0, np.inf, 2.0]])
    out = spread(values)
    assert out == {"median": 2.5, "q25": 1.75, "q75": 3.25, "n": 4, "dropped": 2}
    empty = spread([np.nan])
    assert math.isnan(empty["median"]) and empty["n"] == 0 and empty["dropped"] == 1


def test_censored_spread_counts_runs_that_never_got_there_as_later_than_every_other():
    """Steps to a threshold: a run that never got there (NaN or inf) is later than
    every run that did. Left out (``spread``), the median of 100, 200 and a run that
    never got there read 150, the runs that got there alone: survivorship."""
    assert censored_spread([100.0, np.nan, 200.0]) == {
        "median": 200.0,
        "q25": 150.0,
        "q75": math.inf,
        "n": 3,
        "not_reached": 1,
    }
    # an order statistic right before the runs that never got there is still finite
    assert censored_spread([4, 2, 1, 3, np.inf]) == {"median": 3.0, "q25": 2.0, "q75": 4.0, "n": 5, "not_reached": 1}
    rng = np.random.default_rng(0)
    for n in range(1, 9):  # every run got there: spread's numbers, bit for bit
        values = rng.exponential(100.0, n)
        plain, censored = spread(values), censored_spread(values)
        assert [censored[k] for k in ("median", "q25", "q75", "n")] == [plain[k] for k in ("median", "q25", "q75", "n")]
        assert censored["not_reached"] == 0
    assert censored_spread([np.nan, np.inf]) == {
        "median": math.inf,
        "q25": math.inf,
        "q75": math.inf,
        "n": 2,
        "not_reached": 2,
    }
    assert math.isnan(censored_spread([])["median"]) and censored_spread([])["n"] == 0
    with pytest.raises(ValueError, match=r"censored_spread: values must not be negative .* got -1\.0"):
        censored_spread([np.nan, 3.0, -1.0])


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
    # another normalisation (the lp experiment's l1, linf) under its own name, not "bn"
    linf = compare(bn, std, label="linf")
    assert "bn" not in linf and linf["linf"] == out["bn"] and linf["ratio"] == out["ratio"]


# ------------------------------------------------------------------ learning-rate edge
def test_format_summary_reads_as_text():
    """What ``numbabn experiment`` prints without --json: sections indented, names
    aligned within a section, spreads and win counts in words (it used to print
    each top-level entry as one Python dict repr)."""
    bn = np.array([[1.0, 2.0, 3.0, np.nan], [2.0, 2.0, 2.0, 2.0]])
    standard = np.array([[2.0, 4.0, 1.0, 1.0], [4.0, 4.0, 4.0, 4.0]])
    summary = {
        "data": "digits 8×8",
        "lr=0.1": {
            "l2": compare(bn, standard),
            "steps": spread([np.nan, np.inf]),
            "to_95": censored_spread([100.0, np.nan, 200.0]),
            "to_99": censored_spread([np.nan, np.nan]),
            "first": win_count(0, 0),
        },
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
        "  to_95: median 200, IQR 150 to not reached, n=3, 1 not reached",
        "  to_99: not reached, n=2, 2 not reached",
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
    # (and the search stops once the rates below the climb only do worse, not 24 runs later)
    res = largest_stable_lr(lambda lr: [2.3, np.inf] if lr >= 4 else [2.3, 2.3 - lr / 10], 0.01, fraction=0.5)
    assert res["stable_lr"] is None and res["diverged_lr"] == 0.01 * 2**9
    assert res["stopped"] == "too_small_below" and len(res["trials"]) == 10
    # the same losses at every rate: the rate changes nothing, three runs say so (not all ten)
    res = largest_stable_lr(lambda lr: [1.0, 0.9], 0.01, fraction=0.5, lr_max=1.0, max_trials=10)
    assert res == {**res, "stable_lr": None, "diverged_lr": None, "stopped": "rate_has_no_effect"}
    assert {t["outcome"] for t in res["trials"]} == {"stalled"} and len(res["trials"]) == 3


def test_largest_stable_lr_no_divergence_and_errors():
    res = largest_stable_lr(lambda lr: [1.0, 0.5], 1.0, lr_max=10.0)
    assert res["diverged_lr"] is None and res["stable_lr"] == 8.0
    assert res["stopped"] == "lr_max" and "up to 8" in res["reason"]
    res = largest_stable_lr(lambda lr: [1.0, 2.0], 1.0, max_trials=5)
    assert res["stable_lr"] is None and len(res["trials"]) == 3 and res["stopped"] == "rate_has_no_effect"
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


def test_largest_stable_lr_searches_that_find_a_rate_are_unchanged():
    """The early stops change no search in which a rate trains: the same rates in the
    same order as before them (recorded from the search without early stops)."""
    doubling = [0.01 * 2**k for k in range(6)]
    cases = [
        (_gd_on_quadratic(7.0), 0.01, 1.0, doubling + [0.2262741699796952, 0.26908685288118867, 0.2934412938254948]),
        (
            _gd_on_quadratic(7.0),
            5.0,
            1.0,
            [5.0, 10.0, 2.5, 1.25, 0.625, 0.3125, 0.15625, 0.2209708691207961, 0.2627801297667858, 0.28656376350145973],
        ),
        (
            _gd_on_quadratic(0.3),
            1.0,
            1.0,
            [1.0, 2.0, 4.0, 8.0, 5.656854249492381, 6.727171322029717, 6.168843301631764],
        ),
        (
            _window(0.1, 1.0),
            0.05,
            0.5,
            [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 1.1313708498984762, 0.951365692002177, 1.037471643720808],
        ),
        (
            _window(0.1, 1.0),
            2.5,
            0.5,
            [2.5, 5.0, 1.25, 0.625, 0.8838834764831844, 1.051120519067143, 0.963881765879963],
        ),
        (
            _window(0.1, 1.0),
            1e-4,
            0.5,
            [1e-4 * 2**k for k in range(15)] + [1.1585237502960395, 0.9741984686102292, 1.0623709631701073],
        ),
    ]
    for run, lr0, fraction, rates in cases:
        res = largest_stable_lr(run, lr0, fraction=fraction)
        assert [t["lr"] for t in res["trials"]] == pytest.approx(rates, rel=1e-12)
        assert res.get("stopped", "bracketed") == "bracketed"
    # an overflow one update in, at every rate down to 1e-3, is no reason to stop: smaller rates may train
    res = largest_stable_lr(lambda lr: [2.3, np.inf] if lr > 1e-3 else [2.3, 0.1], 1.0, fraction=0.5)
    assert 5e-4 < res["stable_lr"] <= 1e-3 < res["diverged_lr"] and len(res["trials"]) == 14


def test_largest_stable_lr_reports_why_it_stopped():
    res = largest_stable_lr(_gd_on_quadratic(7.0), 0.01)
    assert res["stopped"] == "bracketed" and res["reason"] == "0.269 trains and 0.293 fails, after 3 of 3 bisections"
    res = largest_stable_lr(_gd_on_quadratic(7.0), 0.01, max_trials=4)
    assert res["stopped"] == "max_trials" and "max_trials=4" in res["reason"]
    # stalls whose tails neither repeat nor fall steadily with the rate: the search spends its runs
    res = largest_stable_lr(lambda lr: [1.0, 1.5 + 0.1 * (-1) ** round(math.log2(lr)) + lr / 1000], 1.0, max_trials=6)
    assert res["stable_lr"] is None and len(res["trials"]) == 6 and res["stopped"] == "max_trials"
    assert res["reason"].startswith(
        "no rate trained within max_trials=6 runs. Tried 6 rates: 0.125 stalled (first loss 1, tail 1.4); 0.25 stalled"
    )


def _noise_labels(lr, steps=30, n=400, d=4, classes=10):
    """Full-batch gradient descent on softmax regression whose labels are noise to
    its inputs: the loss cannot halve from ln 10 at any rate."""
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((n, d)), rng.integers(0, classes, n)
    W, b, losses = np.zeros((d, classes)), np.zeros(classes), []
    for _ in range(steps):
        z = X @ W + b
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        losses.append(-np.log(p[np.arange(n), y]).mean())
        p[np.arange(n), y] -= 1
        W, b = W - lr * X.T @ p / n, b - lr * p.mean(axis=0)
    return losses


def test_largest_stable_lr_stops_early_when_labels_are_noise():
    # before: 24 runs, halving to 1.5e-6 after the climb had shown every smaller rate does worse
    res = largest_stable_lr(_noise_labels, 0.4, fraction=0.5)
    rates = [t["lr"] for t in res["trials"]]
    assert rates == [0.4, 0.8, 1.6, 3.2, 6.4, 12.8]
    assert res["stable_lr"] is None and res["diverged_lr"] is None and res["stopped"] == "too_small_below"
    assert res["reason"].startswith(
        "no rate trains in runs this short: at 0.4, 0.8, 1.6 each larger rate made more progress without training"
    )
    assert all(f"{lr:.3g} stalled (first loss 2.303, tail " in res["reason"] for lr in rates)


def test_largest_stable_lr_stops_when_no_rate_lies_between_too_small_and_diverging():
    # progress grows with the rate, but the run overflows before it can halve its loss
    def run(lr):
        return [2.3, np.inf] if lr >= 1 else [2.3, 2.3 - lr]

    res = largest_stable_lr(run, 0.1, fraction=0.5)  # climbs 0.1 .. 0.8, overflows at 1.6
    assert [t["outcome"] for t in res["trials"]] == ["stalled"] * 4 + ["diverged"]
    assert res["stopped"] == "too_small_below" and res["stable_lr"] is None and res["diverged_lr"] == 1.6
    assert "1.6 diverged (loss 2 of 2 not finite)" in res["reason"]
    res = largest_stable_lr(run, 0.9, fraction=0.5)  # 0.9, overflow at 1.8, then down: 0.45, 0.225
    assert [t["lr"] for t in res["trials"]] == [0.9, 1.8, 0.45, 0.225] and res["stopped"] == "too_small_below"


def test_largest_stable_lr_stops_when_the_rate_changes_nothing():
    # a loss that cannot decrease: the same run at every rate, three runs instead of 24
    res = largest_stable_lr(lambda lr: [2.3] * 20, 0.4, fraction=0.5)
    assert [t["lr"] for t in res["trials"]] == [0.4, 0.8, 0.2]
    assert res == {**res, "stable_lr": None, "diverged_lr": None, "stopped": "rate_has_no_effect"}
    assert res["reason"].startswith("the runs at 0.2, 0.4, 0.8 returned the same losses")
    # a first loss that is not finite (or none) is the fresh network's: every rate fails alike, one run
    for losses in ([np.nan] * 5, [np.inf, np.nan], []):
        res = largest_stable_lr(lambda lr, losses=losses: losses, 0.4)
        assert len(res["trials"]) == 1 and res["stopped"] == "non_finite_start", losses
        assert res["stable_lr"] is None and res["diverged_lr"] == 0.4
    assert res["reason"] == (
        "the run at 0.4 returned no losses, before any update at that rate: every rate fails alike. "
        "Tried 1 rates: 0.4 diverged (no losses)"
    )
