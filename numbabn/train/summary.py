"""Summaries of repeated measurements: medians with interquartile bands, and win
counts with binomial confidence intervals.

An experiment repeated over seeds (and probed many times per run) gives, per
network, a ``(seeds, probes)`` array of one measure. What the experiments report:

``spread(values)``
    ``{"median", "q25", "q75", "n"}`` over every finite value (NaN/inf dropped and
    counted in ``"dropped"``): the median with its interquartile band.
``censored_spread(values)``
    The same for times to an event (steps until a threshold is reached), where a
    run that never got there (NaN or inf) counts as later than every run that did
    instead of being dropped: a quantile that falls among those runs is +inf ("not
    reached"), and ``"not_reached"`` counts them. Dropping them would report only
    the runs that got there (survivorship).
``win_count(k, n)``
    "BN smaller on k of n" with the exact (Clopper–Pearson) two-sided 95 % interval
    for the underlying probability. The interval assumes n independent trials.
``format_summary(summary)``
    An experiment's nested summary as indented text, one line per measure, the
    ``spread`` and ``win_count`` entries in words (what ``numbabn experiment``
    prints without ``--json``).
``compare(bn, standard)``
    Both: the ratio bn/standard per (seed, probe) summarised by ``spread``; the
    win count over all probes (``probes``); and the win count over seeds
    (``seeds``: on how many seeds BN's median over probes is the smaller one).
    Probes of one run are strongly correlated (consecutive steps of one
    trajectory), so the probe-level interval is too narrow to be read as
    independent evidence; the seed-level count is the one whose interval is
    honest. Both are reported, the seed count first in the docs.
"""

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

CONFIDENCE = 0.95


def spread(values: ArrayLike) -> dict[str, Any]:
    """Median and interquartile band of the finite entries of ``values`` (any shape)."""
    arr = np.asarray(values, dtype=np.float64).ravel()
    finite = arr[np.isfinite(arr)]
    out = {"n": int(finite.size), "dropped": int(arr.size - finite.size)}
    if finite.size == 0:
        return {"median": float("nan"), "q25": float("nan"), "q75": float("nan"), **out}
    q25, med, q75 = np.percentile(finite, [25, 50, 75])
    return {"median": float(med), "q25": float(q25), "q75": float(q75), **out}


def censored_spread(values: ArrayLike) -> dict[str, Any]:
    """``{"median", "q25", "q75", "n", "not_reached"}`` of times to an event, >= 0,
    where NaN or inf means the run ended before the event (right-censored).

    The censored runs sort after every observed time. Each quantile is NumPy's
    linear one over all ``n`` runs (the same bits as :func:`spread` when no run is
    censored), and +inf when it needs a censored run.
    """
    arr = np.asarray(values, dtype=np.float64).ravel()
    if np.any(arr < 0):
        raise ValueError(
            f"censored_spread: values must not be negative (times to an event), got {float(arr[arr < 0].min())!r}"
        )
    arr = np.sort(np.where(np.isnan(arr), np.inf, arr))
    n, censored = arr.size, int(np.sum(np.isinf(arr)))
    out = {"n": int(n), "not_reached": censored}
    if n == 0:
        return {"median": float("nan"), "q25": float("nan"), "q75": float("nan"), **out}
    # A quantile depends only on the two order statistics around its position, so the
    # censored runs (sorted last) may stand in as any value >= the observed ones for
    # NumPy's interpolation; the quantiles that reach one of them are +inf.
    observed = arr[: n - censored]
    filled = np.where(np.isinf(arr), observed[-1] if observed.size else 0.0, arr)
    names, qs = ("median", "q25", "q75"), (0.5, 0.25, 0.75)
    values = np.percentile(filled, [100 * q for q in qs])
    quantiles = {
        name: math.inf if math.isinf(arr[math.ceil((n - 1) * q)]) else float(v)
        for name, q, v in zip(names, qs, values, strict=True)
    }
    return {**quantiles, **out}


def binomial_interval(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Exact (Clopper–Pearson) two-sided interval for p given k successes in n trials.

    Formulas::

        lower = Beta⁻¹(α/2; k, n − k + 1)        (0 when k = 0)
        upper = Beta⁻¹(1 − α/2; k + 1, n − k)    (1 when k = n),   α = 1 − confidence
    """
    from scipy.stats import beta

    for name, value in (("k", k), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"binomial_interval: {name} must be an int >= 0, got {value!r}")
    if k > n:
        raise ValueError(f"binomial_interval: k must be <= n, got k={k}, n={n}")
    if not 0 < confidence < 1:
        raise ValueError(f"binomial_interval: confidence must be in (0, 1), got {confidence!r}")
    if n == 0:
        return 0.0, 1.0
    alpha = 1.0 - confidence
    lower = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    upper = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lower, upper


def win_count(k: int, n: int, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """``{"k", "n", "fraction", "ci"}``: k wins of n with the Clopper–Pearson interval."""
    lower, upper = binomial_interval(int(k), int(n), confidence)
    return {"k": int(k), "n": int(n), "fraction": float(k / n) if n else float("nan"), "ci": [lower, upper]}


def compare(bn: ArrayLike, standard: ArrayLike, label: str = "bn") -> dict[str, Any]:
    """BN against the standard network on one measure (module docstring).

    ``bn``, ``standard``: arrays of shape (seeds, probes), the same probe steps in
    both. Pairs where either value is not finite (a diverged run) are left out of
    the ratio and of the counts. ``label``: the key of the first network's values
    (another normalisation than BN, e.g. "l1", compares under its own name).
    """
    bn, standard = np.atleast_2d(np.asarray(bn, dtype=np.float64)), np.atleast_2d(np.asarray(standard, np.float64))
    if bn.shape != standard.shape:
        raise ValueError(
            f"compare: bn and standard must have the same (seeds, probes) shape, got {bn.shape} and {standard.shape}"
        )
    ok = np.isfinite(bn) & np.isfinite(standard)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(ok, bn / standard, np.nan)
    seed_wins = [np.median(b[m]) < np.median(s[m]) for b, s, m in zip(bn, standard, ok, strict=True) if m.any()]
    return {
        "ratio": spread(ratio),
        "probes": win_count(int(np.sum((bn < standard) & ok)), int(ok.sum())),
        "seeds": win_count(int(np.sum(seed_wins)), len(seed_wins)),
        label: spread(np.where(ok, bn, np.nan)),
        "standard": spread(np.where(ok, standard, np.nan)),
    }


_SPREAD_KEYS = frozenset({"median", "q25", "q75", "n", "dropped"})
_CENSORED_KEYS = frozenset({"median", "q25", "q75", "n", "not_reached"})
_WIN_KEYS = frozenset({"k", "n", "fraction", "ci"})


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _leaf(value: Any) -> str | None:
    """One line for a value that is not a nested section, else None."""
    if isinstance(value, Mapping):
        if set(value) == _SPREAD_KEYS:
            dropped = f", {value['dropped']} dropped" if value["dropped"] else ""
            if not value["n"]:
                return f"no finite value{dropped}"
            return (
                f"median {_number(value['median'])}, IQR {_number(value['q25'])} to {_number(value['q75'])}, "
                f"n={value['n']}{dropped}"
            )
        if set(value) == _CENSORED_KEYS:
            late = f", {value['not_reached']} not reached" if value["not_reached"] else ""
            if not value["n"]:
                return "no runs"
            if value["q25"] == math.inf:  # then every quantile is
                return f"not reached, n={value['n']}{late}"
            q75 = "not reached" if value["q75"] == math.inf else _number(value["q75"])
            median = "not reached" if value["median"] == math.inf else _number(value["median"])
            return f"median {median}, IQR {_number(value['q25'])} to {q75}, n={value['n']}{late}"
        if set(value) == _WIN_KEYS:
            if not value["n"]:
                return "0 of 0"
            lower, upper = value["ci"]
            return f"{value['k']} of {value['n']} ({value['fraction']:.0%}; 95% CI {lower:.0%} to {upper:.0%})"
        return None
    if isinstance(value, (list, tuple)):
        return ", ".join(_number(v) for v in value) if value else "(none)"
    return _number(value)


def format_summary(summary: Mapping[str, Any], indent: int = 0) -> str:
    """``summary`` (nested dicts of :func:`spread`, :func:`win_count`, numbers,
    strings and lists) as lines of text: a section's name on its own line with its
    entries indented below it; ``name: value`` for the rest, names aligned within
    a section. A spread reads ``median M, IQR Q25 to Q75, n=N`` (``, D dropped``
    when values were not finite; a censored spread ``, K not reached``, and
    "not reached" for a quantile among those runs), a win count ``K of N (fraction; 95% CI lower to
    upper)``."""
    pad = " " * indent
    leaves = {key: _leaf(value) for key, value in summary.items()}
    width = max((len(str(k)) for k, line in leaves.items() if line is not None), default=0)
    lines = []
    for key, value in summary.items():
        line = leaves[key]
        if line is None:
            lines.append(f"{pad}{key}" + ("" if value else ": (empty)"))
            if value:
                lines.append(format_summary(value, indent + 2))
        else:
            lines.append(f"{pad}{str(key) + ':':<{width + 1}} {line}")
    return "\n".join(lines)
