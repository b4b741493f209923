"""The contour levels a surface is drawn at: one rule for the figures, the adaptive grid that
judges its error in level spacings, and the reconstruction of an adaptive grid. Numpy only.

    geometric_span(0.01, 3.2)        # True: a loss spanning more than GEOMETRIC_SPAN gets geometric levels
    contour_scale(lo, hi, levels=30) # (transform, spacing): the units errors are judged in
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


def contour_scale(lo: float, hi: float, levels: int) -> tuple:
    """(transform, spacing) of the default contour levels between lo and hi: the log when
    geometric_span, else the identity; spacing is one level's width in transformed units."""
    if geometric_span(lo, hi):
        return np.log, (math.log(hi) - math.log(lo)) / (levels - 1)
    return (lambda v: v), max(hi - lo, 1e-12) / (levels - 1)
