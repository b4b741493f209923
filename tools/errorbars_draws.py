"""Seeds against direction draws in the digits error-bar study (docs/ERRORBARS.md): for each
model, batch size and grid metric, the spread over the 5 training seeds of the 3-plane means,
the spread over the 3 planes within a variant, and the batch comparison with every (seed,
plane) value as a sample (Welch's t test over 15 values a side), which counts the draws too.
Run after tools/errorbars_docs.sh, from the repository root:
    python tools/errorbars_draws.py
"""

import numpy as np
from scipy.stats import ttest_ind

from lldist.analysis import metrics
from lldist.store import SurfaceReader
from lldist.inputs.study_file import load_study

KEYS = ("mean_rise_r0.5", "basin_eps0.1", "convex_fraction", "roughness")


def per_plane(path: str) -> dict:
    """Each grid metric on each plane of a directions.repeats file (train split)."""
    with SurfaceReader(path) as sf:
        a = sf.read_all()
    loss, acc = a.values[("train", "loss")], a.values[("train", "acc")]
    return {k: [metrics.compute(loss[p], acc[p], a.x, a.y)[0][k] for p in range(a.planes)] for k in KEYS}


def main() -> None:
    variants = load_study("jobs/study_digits_seeds.yaml").variants
    vals = {v.name: per_plane(v.job.output) for v in variants}
    print("| model | metric | seed std (b64, b512) | draw std (b64, b512) | Δ b512 − b64 | p, seeds × planes |")
    print("|---|---|---|---|---|---|")
    for lab in dict.fromkeys(v.label for v in variants):
        for k in KEYS:
            cells, every = [], {}
            for b in (64, 512):
                grid = np.array([vals[f"{lab}_b{b}_s{s}"][k] for s in range(5)])  # (seeds, planes)
                every[b] = grid.ravel()
                cells.append((grid.mean(1).std(ddof=1), grid.std(1, ddof=1).mean()))
            d = every[512].mean() - every[64].mean()
            p = ttest_ind(every[512], every[64], equal_var=False).pvalue if every[64].std() + every[512].std() else 1.0
            print(f"| {lab} | {k} | {cells[0][0]:.3g}, {cells[1][0]:.3g} | {cells[0][1]:.3g}, {cells[1][1]:.3g} | "
                  f"{d:+.3g} | {p:.2g} |")


if __name__ == "__main__":
    main()
