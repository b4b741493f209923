"""The figures of a series file (python -m lldist.series), as the edge-of-stability papers draw
them. No torch.

    written = write_all(read_series("s.h5"), "figs", "s", fmt="png")

  <stem>_sharpness   λmax against step with its jackknife error, the stability threshold
                     (2/η, or the optimizer's: a step line under a schedule) dashed, and the
                     loss below on a shared step axis (Cohen et al. 2021, Fig. 1)
  <stem>_<column>    every other measure against step, with its standard error where the file
                     holds one (<column>_se, or the trace's trace_se)
"""

from __future__ import annotations

import os

import numpy as np

from ..store.series import Series


def _errors(s: Series, name: str):
    """The column's standard errors (<name>_se: lambda_max_se, trace_se, train/loss_se), or None."""
    se = s.values.get(f"{name}_se")
    return se if se is not None and np.isfinite(se).any() else None


def sharpness_figure(s: Series):
    import matplotlib.pyplot as plt
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(6.4, 5.6), height_ratios=(3, 2))
    lam, err = s.column("lambda_max"), _errors(s, "lambda_max")
    top.errorbar(s.steps, lam, yerr=err, marker="o", ms=3, lw=1.2, capsize=2, label=r"$\lambda_{max}$")
    pre = s.values.get("preconditioned_lambda_max")
    if pre is not None and np.isfinite(pre).any():  # Adam: the threshold bounds this one
        top.plot(s.steps, pre, marker="s", ms=3, lw=1.2, label=r"$\lambda_{max}(P^{-1}H)$")
    if np.isfinite(s.thresholds).any():
        label = "2/η" if s.threshold_kind == "lambda_max" else f"threshold ({s.threshold_kind})"
        top.step(s.steps, s.thresholds, where="post", ls="--", color="k", lw=1, label=label)
    top.set_ylabel(s.descriptions.get("lambda_max", "lambda_max").split(" (")[0])
    top.set_title(f"sharpness along training ({s.subset.get('split', '?')}: first {s.subset.get('batches', '?')} "
                  f"batches of {s.subset.get('batch_size', '?')})", fontsize=10)
    top.legend(fontsize=8)
    drew = False
    for name in s.values:
        if name.endswith("/loss"):
            bottom.plot(s.steps, s.values[name], marker=".", lw=1, label=name)
            drew = True
    if not drew and "grad_loss" in s.values:
        bottom.plot(s.steps, s.values["grad_loss"], marker=".", lw=1, label="loss (curvature's batches)")
        drew = True
    bottom.set_ylabel("loss")
    bottom.set_xlabel("step")
    if drew:
        bottom.legend(fontsize=8)
    fig.tight_layout()
    return fig


def measure_figure(s: Series, name: str):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.errorbar(s.steps, s.values[name], yerr=_errors(s, name), marker="o", ms=3, lw=1.2, capsize=2)
    ax.set_xlabel("step")
    ax.set_ylabel(name)
    ax.set_title(s.descriptions.get(name, name), fontsize=9)
    fig.tight_layout()
    return fig


def write_all(s: Series, outdir: str, stem: str, fmt: str = "png", dpi: int = 150) -> list:
    """Every figure of the series (the module's list), as files; returns their paths."""
    import matplotlib.pyplot as plt
    written = []

    def save(fig, name):
        path = os.path.join(outdir, f"{stem}_{name.replace('/', '_')}.{fmt}")
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        written.append(path)
    if "lambda_max" in s.values and np.isfinite(s.values["lambda_max"]).any():
        save(sharpness_figure(s), "sharpness")
    for name, v in s.values.items():
        if name.endswith("_se") or name in ("lambda_max", "preconditioned_lambda_max") or not np.isfinite(v).any():
            continue
        save(measure_figure(s, name), name)
    return written
