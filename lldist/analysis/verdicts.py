"""The study's verdicts, from the metrics of its variants' files: is the minimum sharper at
batch 512, and beyond its error bars? Which measure ranks the generalization gap? Markdown
lines for the report (analysis/report.py). numpy and scipy; no torch.

    lines = hessian_verdicts(variants, rows)      # λmax and the trace per label, and a Spearman pointer
    lines = errorbars(variants, rows, "train")    # each measure per setting ± its error, p, Kendall's τ

`variants`: the study's (inputs/study_file.py: name, label, cross); `rows`: their metrics
(analysis/metrics.py), in the same order.
"""

from __future__ import annotations

import math

import numpy as np

from .significance import LEVEL, difference, pool, rank_correlation, verdict


def _where(v) -> str:
    """A variant's cross values in words: "batch_size 512"."""
    return ", ".join(f"{k.split('.')[-1]} {val}" for k, val in v.cross) or v.name


def hessian_verdicts(variants: list, rows: list) -> list:
    """Markdown lines that answer "is the minimum sharper at batch 512?" per label (variants
    that differ only in the cross values), with lambda_max and the trace, and whether
    sharpness goes with the generalization gap over all variants (Spearman's rank correlation;
    with a handful of variants a pointer, not a test)."""
    have = [(v, r) for v, r in zip(variants, rows) if "hessian_lambda_max" in r]
    if not have:
        return []
    split = have[0][1]["hessian_split"]
    out = [f"λmax and the trace (Hutchinson, ± one standard error) of the {split} loss's Hessian at each "
           "variant's final weights (`python -m lldist.hessian`; docs/CURVATURE.md). Higher is sharper."]
    by_label = {}
    for v, r in have:
        by_label.setdefault(v.label, []).append((v, r))
    for label, group in by_label.items():
        if len(group) < 2:
            continue
        parts = [f"{_where(v)}: λmax {r['hessian_lambda_max']:.4g}, "
                 f"trace {r['hessian_trace']:.4g} ± {r['hessian_trace_stderr']:.2g}" for v, r in group]
        lo = min(group, key=lambda g: g[1]["hessian_lambda_max"])
        hi = max(group, key=lambda g: g[1]["hessian_lambda_max"])
        t_hi, t_lo = hi[1]["hessian_trace"], lo[1]["hessian_trace"]
        err = 2 * np.hypot(hi[1]["hessian_trace_stderr"], lo[1]["hessian_trace_stderr"])
        where = _where(hi[0])
        ratio = hi[1]["hessian_lambda_max"] / lo[1]["hessian_lambda_max"] if lo[1]["hessian_lambda_max"] > 0 else \
            float("nan")
        said = (f"sharper at {where} by both measures (λmax {ratio:.2g}x, trace beyond two standard errors)"
                   if t_hi - t_lo > err else
                   f"sharper at {where} by λmax ({ratio:.2g}x); the traces do not differ beyond two standard errors"
                   if t_hi >= t_lo else
                   f"λmax is larger at {where} ({ratio:.2g}x) but the trace is smaller: mixed")
        out.append(f"* **{label}**: " + "; ".join(parts) + f". **{said}.**")
    gaps = [(r["hessian_lambda_max"], r["hessian_trace"], r["trained_gap"]) for _, r in have if "trained_gap" in r]
    if len(gaps) >= 4:
        from scipy.stats import spearmanr  # scipy comes with scikit-learn
        a = np.array(gaps, dtype=float)
        rho = [float(spearmanr(a[:, i], a[:, 2])[0]) for i in (0, 1)]
        out.append(f"* Over all {len(a)} variants, Spearman's rank correlation with the generalization gap "
                   f"(train − test accuracy at training time): λmax {rho[0]:+.2f}, trace {rho[1]:+.2f} "
                   f"(+1: the sharper, the larger the gap; with {len(a)} points, only |ρ| near 1 means much).")
    return out


# what the report judges, in this order: the gap itself, then each sharpness or basin measure
JUDGED = {"trained_gap": "generalization gap (train − test accuracy)", "centre_loss": "loss at θ*",
          "hessian_lambda_max": "λmax (Hessian)", "hessian_trace": "trace (Hessian)",
          "sharp_worst_l2": "worst-case adaptive sharpness, ℓ2", "sharp_worst_linf": "worst-case adaptive sharpness, ℓ∞",
          "sharp_average_l2": "average-case adaptive sharpness", "sharp_sam": "SAM's m-sharpness",
          "pac_bayes_flatness": "PAC-Bayes flatness 1/σ'²", "mean_rise_r0.5": "mean rise within r = 0.5",
          "basin_eps0.1": "basin, ε = 0.1", "convex_fraction": "convex fraction", "roughness": "roughness"}


# +1: grows with sharpness; -1: grows with flatness; 0: neither (the verdicts' reading)
SIGN = {"centre_loss": 0, "basin_eps0.1": -1, "convex_fraction": -1}


def _replicate(key: str) -> bool:
    """A cross key whose values are replicates (train.seed, model.seed): pooled, not compared."""
    return key.split(".")[-1] == "seed"


def _fmt(v: float, digits: int = 4) -> str:
    return f"{v:.{digits}g}" if np.isfinite(v) else "–"


def errorbars(variants: list, rows: list, split: str) -> list:
    """Markdown: per label, each judged measure at each setting of the cross (seeds pooled:
    mean ± standard error over them, or the measure's own error with one seed), the difference
    from the first setting with its p-value and whether it exceeds its uncertainty (p < 0.05);
    then each measure's Kendall rank correlation with the generalization gap over every
    variant, with a bootstrap interval. [] when nothing can be compared."""
    groups = {}
    for v, r in zip(variants, rows):
        setting = ", ".join(f"{k.split('.')[-1]} {val}" for k, val in v.cross if not _replicate(k)) or "all"
        groups.setdefault(v.label, {}).setdefault(setting, []).append(r)
    seeds = max(len(g) for by in groups.values() for g in by.values())
    out = []
    for label, by in groups.items():
        settings = list(by)
        keys = [k for k in JUDGED if any(k in r for g in by.values() for r in g)]
        if len(settings) < 2 or not keys:
            continue
        base = settings[0]
        head = ["measure"] + [f"{st} (n)" for st in settings] + \
            [x for st in settings[1:] for x in (f"Δ {st} − {base}", "p", "beyond the error?")]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for k in keys:
            pools = {st: pool(by[st], k) for st in settings}
            cells = [JUDGED[k]] + [f"{_fmt(q['mean'])} ± {_fmt(q['se'], 2)} ({q['n']})" for q in pools.values()]
            for st in settings[1:]:
                d = difference(pools[base], pools[st])
                cells += [f"{_fmt(d['delta'])} ± {_fmt(d['se'], 2)}", f"{d['p']:.2g}" if np.isfinite(d["p"]) else "–",
                          "**yes**" if d["real"] else "no"]
            lines.append("| " + " | ".join(cells) + " |")
        out.append(f"### {label}\n\n" + "\n".join(lines) + "\n")
    if out:
        how = (f"mean ± standard error over {seeds} seeds" if seeds > 1 else
               "each value ± its own standard error (one seed: the seed-to-seed variation is not measured)")
        out.insert(0, f"Per model, each measure at each setting ({how}; n: the seeds with a value), on the "
                      f"{split} split's landscape where it is one; the difference from the first setting, its p-value "
                      "(Welch's t test over seeds; with one seed the normal test on the values' own errors) and "
                      f"whether it exceeds its uncertainty (p < {1 - LEVEL:.2g}). Measures without an error of their "
                      "own (the worst cases; λmax from one batch) cannot be judged from one seed.\n")
    labels = [v.label for v in variants]
    families = [("all", list(range(len(rows))))] + \
        [(lab, [i for i, x in enumerate(labels) if x == lab]) for lab in dict.fromkeys(labels)]
    families = [(f, idx) for f, idx in families if len(idx) >= 4 and (f == "all" or len(families) > 2)]
    corr = []
    for k in [k for k in JUDGED if k != "trained_gap" and any(k in r for r in rows)] if families else []:
        cells, first = [], None
        for f, idx in families:
            c = rank_correlation([rows[i].get(k, math.nan) for i in idx], [rows[i].get("trained_gap", math.nan)
                                                                             for i in idx])
            mark = "**" if np.isfinite(c["low"]) and (c["low"] > 0 or c["high"] < 0) else ""
            cells.append(f"{mark}{_fmt(c['tau'], 2)}{mark} [{_fmt(c['low'], 2)}, {_fmt(c['high'], 2)}]" if c["n"] >= 3
                         else "–")
            if f == "all":
                first = c
        corr.append(f"| {JUDGED[k]} | " + " | ".join(cells) + f" | {verdict(first, SIGN.get(k, 1))} |")
    if corr and families:
        head = " | ".join(f"{f} ({len(idx)})" for f, idx in families)
        out.append("### Which measure ranks the generalization gap?\n\nKendall's τ of each measure with the gap "
                   "(train − test accuracy at training time), over every variant and within each model (settings and "
                   f"seeds), with a {100 * LEVEL:.0f}% bootstrap interval over the variants (2,000 resamples); bold: "
                   "the interval excludes 0. Pooled over models, a correlation may only say which architecture is "
                   "both sharper and worse at generalizing; within a model it compares like with like. The verdict "
                   "reads the pooled interval.\n\n"
                   f"| measure | {head} | verdict (all) |\n|---|" + "---|" * (len(families) + 1) + "\n"
                   + "\n".join(corr) + "\n")
    return out
