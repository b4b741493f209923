"""Is the difference real? The study's error bars, tests and rank correlations, from the
numbers it computed. numpy and scipy only; no torch, MPI or HDF5.

    g = pool([row_seed0, row_seed1, ...], "hessian_trace")  # mean ± se over seeds (or its own se)
    d = difference(g64, g512)                                # delta, se, p, real
    c = rank_correlation(sharpness, gap, boot=2000)          # Kendall's tau, p, bootstrap interval

Rows are metric dicts (lldist.analysis.metrics.from_file): a value `k` may carry its own standard error
as `k_se`, `k_stderr` (Hutchinson's trace) or `k_planes_se` (over direction planes). Over
replicates (variants that differ only in a seed) the spread of the values is the error bar: it
holds the measurement's own noise too. With one replicate the value's own error is used, and
without one the difference cannot be judged.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

ERRORS = ("_se", "_stderr", "_planes_se")  # the suffixes a row's own standard errors carry
LEVEL = 0.95  # differences are "real" when p < 1 - LEVEL; intervals are LEVEL intervals


def own_error(row: dict, key: str) -> float:
    for suffix in ERRORS:
        v = row.get(key + suffix)
        if v is not None and np.isfinite(v):
            return float(v)
    return math.nan


def pool(rows: list, key: str) -> dict:
    """The replicates' values of `key`: {mean, se, n, values, source}; source "seeds" (the
    standard error of the mean over them, n >= 2), "own" (one value and its own error) or
    "none"."""
    vals = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float)) and np.isfinite(r[key])]
    n = len(vals)
    if n >= 2:
        return {"mean": float(np.mean(vals)), "se": float(np.std(vals, ddof=1) / math.sqrt(n)), "n": n,
                "values": vals, "source": "seeds"}
    if n == 1:
        row = next(r for r in rows if isinstance(r.get(key), (int, float)) and np.isfinite(r[key]))
        return {"mean": vals[0], "se": own_error(row, key), "n": 1, "values": vals, "source": "own"}
    return {"mean": math.nan, "se": math.nan, "n": 0, "values": [], "source": "none"}


def difference(a: dict, b: dict, level: float = LEVEL) -> dict:
    """b − a for two pools: {delta, se, p, real}. Welch's t test when both come from two or
    more replicates; else the normal test of delta / sqrt(se_a² + se_b²); p NaN (not real)
    when an error is unknown."""
    delta = b["mean"] - a["mean"]
    se = math.hypot(a["se"], b["se"])
    if a["source"] == "seeds" and b["source"] == "seeds":
        from scipy.stats import ttest_ind
        if np.std(a["values"]) == 0 and np.std(b["values"]) == 0:
            p = 1.0 if delta == 0 else 0.0  # no spread at all: the t statistic is undefined
        else:
            import warnings
            with warnings.catch_warnings():  # nearly equal replicates: scipy warns, the p-value stands
                warnings.simplefilter("ignore", RuntimeWarning)
                p = float(ttest_ind(b["values"], a["values"], equal_var=False).pvalue)
    elif np.isfinite(se) and se > 0:
        p = 2 * (1 - NormalDist().cdf(abs(delta) / se))
    elif se == 0:
        p = 1.0 if delta == 0 else 0.0
    else:
        p = math.nan
    return {"delta": delta, "se": se, "p": p, "real": bool(np.isfinite(p) and p < 1 - level)}


def rank_correlation(x, y, boot: int = 2000, seed: int = 0, level: float = LEVEL) -> dict:
    """Kendall's tau of x with y over the finite pairs, its p-value (no correlation), and a
    bootstrap interval over the pairs (resampled with replacement; `boot` draws, seeded)."""
    from scipy.stats import kendalltau
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = len(x)
    if n < 3:
        return {"tau": math.nan, "p": math.nan, "low": math.nan, "high": math.nan, "n": n}
    res = kendalltau(x, y)
    rng = np.random.default_rng(seed)
    taus = []
    for _ in range(boot):
        i = rng.integers(0, n, n)
        if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0:
            taus.append(kendalltau(x[i], y[i]).statistic)
    taus = np.array([t for t in taus if np.isfinite(t)])
    lo, hi = (np.quantile(taus, [(1 - level) / 2, (1 + level) / 2]) if len(taus) else (math.nan, math.nan))
    return {"tau": float(res.statistic), "p": float(res.pvalue), "low": float(lo), "high": float(hi), "n": n}


def verdict(c: dict, sign: int = 1) -> str:
    """What a rank correlation's interval says, in words; `sign` +1 for a measure that grows
    with sharpness, −1 for one that grows with flatness (a basin's size), 0 for neither."""
    if not np.isfinite(c["low"]):
        return "too few points"
    if c["low"] > 0 or c["high"] < 0:
        up = c["low"] > 0
        if sign == 0:
            return "larger with the gap" if up else "smaller with the gap"
        return "as sharpness predicts: sharper, larger gap" if up == (sign > 0) else \
            "against it: sharper, smaller gap"
    return "cannot tell (the interval holds 0)"
