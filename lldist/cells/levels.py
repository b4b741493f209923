"""The contour levels a surface is drawn at: one rule for the figures and for the adaptive grid,
which measures its error in these levels' spacings (cells/interpolation.py). Numpy only.

    geometric_span(0.01, 3.2)              # True: spanning more than GEOMETRIC_SPAN: geometric levels by default
    round_levels(0.07, 5.8, 30, True)      # about 30 levels at round values: 0.07, 0.08, 0.09, 0.1, 0.125, ...
    labelled(levels, geometric)            # those worth a label or a tick: 0.1, 0.2, 0.5, 1, 2, 5
"""

from __future__ import annotations

import math

import numpy as np

# Losses around a minimum span decades: geometric levels resolve the basin, linear ones would
# put every level on the walls. Above this ratio of the largest to the smallest value, levels
# are geometric (lldist.plot --linear / --log override it).
GEOMETRIC_SPAN = 50.0


def geometric_span(lo: float, hi: float) -> bool:
    """Whether values from lo to hi are drawn on geometric levels by default."""
    return lo > 0 and hi / lo > GEOMETRIC_SPAN


# ----------------------------------------------------------------------------- round levels

LINEAR_STEPS = (1.0, 2.0, 2.5, 5.0)  # x 10^k: the steps a reader can add up
# multipliers within a decade for geometric levels, from sparse to dense (the denser ones are
# the preferred-number series R5, R10 and R20 rounded as engineers print them)
DECADE_SERIES = ((1.0,), (1.0, 3.0), (1.0, 2.0, 5.0), (1.0, 1.5, 2.0, 3.0, 5.0, 7.0),
                 (1.0, 1.25, 1.6, 2.0, 2.5, 3.2, 4.0, 5.0, 6.3, 8.0),
                 (1.0, 1.12, 1.25, 1.4, 1.6, 1.8, 2.0, 2.24, 2.5, 2.8, 3.15, 3.55, 4.0, 4.5, 5.0, 5.6, 6.3, 7.1, 8.0,
                  9.0))
LABELLED = (1.0, 2.0, 5.0)  # the multipliers that get a label on a geometric scale


def nice_step(raw: float) -> float:
    """The 1, 2, 2.5 or 5 x 10^k nearest to `raw` on a log scale: within a factor 1.42 of it."""
    k = math.floor(math.log10(raw))
    candidates = [s * 10.0 ** e for e in (k, k + 1) for s in LINEAR_STEPS]
    return min(candidates, key=lambda c: abs(math.log(c / raw)))


def round_levels(lo: float, hi: float, n: int, geometric: bool) -> np.ndarray:
    """About n contour levels at round values covering [lo, hi]: multiples of a 1-2-2.5-5 step
    on a linear scale; on a geometric one a series of multipliers per decade dense enough for n
    levels (1-2-5, then R10-like). The first is at or below lo, the last at or above hi."""
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
        return np.array([lo, lo + 1e-12 if not hi > lo else hi])
    if not geometric:
        step = nice_step((hi - lo) / max(1, n - 1))
        a, b = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
        return np.round(np.arange(a, b + 1) * step, 12)
    decades = math.log10(hi / lo)
    series = next((s for s in DECADE_SERIES if len(s) * decades >= n - 1), DECADE_SERIES[-1])
    k0, k1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    vals = sorted({round(m * 10.0 ** k, 12 - k) for k in range(k0, k1 + 1) for m in series})
    below = [v for v in vals if v <= lo * (1 + 1e-12)]
    above = [v for v in vals if v >= hi * (1 - 1e-12)]
    first, last = (below[-1] if below else vals[0]), (above[0] if above else vals[-1])
    return np.array([v for v in vals if first <= v <= last])


def labelled(levels: np.ndarray, geometric: bool, most: int = 8) -> np.ndarray:
    """The levels worth a label or a colour-bar tick: on a geometric scale those at 1, 2 or 5 x
    10^k (or 1 x 10^k when even those are too many); on a linear one every k-th level with k
    such that the labels are multiples of a round step, at most `most` of them."""
    if geometric:
        for keep in (LABELLED, (1.0,)):
            picked = [v for v in levels if any(math.isclose(v / 10.0 ** math.floor(math.log10(v) + 1e-12), m,
                                                            rel_tol=1e-9) for m in keep)]
            if len(picked) <= most and picked:
                return np.array(picked)
        return np.array(picked[::max(1, math.ceil(len(picked) / most))])
    if len(levels) < 2:
        return levels
    step = levels[1] - levels[0]
    k = math.floor(math.log10(step))
    majors = sorted(m * 10.0 ** e for e in range(k, k + 4) for m in (1.0, 2.0, 5.0) if m * 10.0 ** e >= step * (1 - 1e-9))
    for major in majors:  # the finest round step, a multiple of the levels' own, with few enough labels
        if abs(major / step - round(major / step)) > 1e-6:
            continue
        picked = [v for v in levels if abs(v / major - round(v / major)) < 1e-6]
        if 2 <= len(picked) <= most:
            return np.array(picked)
    return levels[:: math.ceil(len(levels) / most)]
