"""A study: several variants of one job (model x batch size, or any keys), trained, surfaced,
measured and compared in one command.

    python -m lldist.study jobs/study_digits.yaml            # everything; resumes what exists
    mpirun -n 8 python -m lldist.study jobs/study_cifar10.yaml
    python -m lldist.study jobs/study_digits.yaml --report-only

A study file holds `name`, `out` (a folder), `base` (a job, as in a job file), `variants` (a
list of {label, key.sub: value, ...} overrides), `cross` (key: [values]: every variant is
run at every combination; `train.seed: [0, 1, 2]` makes the seed-to-seed variation one of
the report's error bars), `curvature` (the Hessian at each variant's theta*: {split,
batches, top, trace_samples}, defaults below; `false` for none) and `sharpness` (`true`, or a
mapping of the job's `sharpness:` keys: the sharpness measures at each variant's theta*,
lldist/flatness.py; default none). Each variant lives in
`<out>/<label>_<cross values>/` (model.pt, per-epoch checkpoints, surface.h5, plots). The
report: `<out>/report.html` (self-contained, figures embedded), `<out>/report.md` (the metrics
table and, with curvature, the sharpness comparison), `<out>/figures/`.
"""

from __future__ import annotations

import base64
import copy
import itertools
import json
import math
import os
import re
import sys
from dataclasses import dataclass

import numpy as np
import yaml

from .config import apply_override, job_from_dict, load_yaml, read_text
from .errors import ArgumentParser, Stopped, UserError, finish, run_cli
from .store import all_closed

SHORT = {"batch_size": "b", "lr": "lr", "epochs": "e", "seed": "s", "weight_decay": "wd", "optimizer": ""}
# The Hessian at theta*, by default on the training loss (sharpness is a property of the minimum
# training found: Keskar et al. 2017), on a fixed sample of batches of eval.batch_size.
CURVATURE = {"split": "train", "batches": 2, "top": 2, "trace_samples": 32}


@dataclass
class Variant:
    name: str
    job: object  # config.Job
    label: str = ""
    cross: tuple = ()  # ((key, value), ...): where this variant sits in the study's cross


def load_study(path: str) -> tuple:
    raw = load_yaml(read_text(path, "study file"), path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a study file must be a mapping")
    unknown = set(raw) - {"name", "out", "base", "variants", "cross", "curvature", "sharpness"}
    if unknown:
        raise UserError(f"{path}: unknown key '{sorted(unknown)[0]}' (known: name, out, base, variants, cross, "
                        "curvature, sharpness)")
    sharp = raw.get("sharpness", False)
    if sharp not in (True, False, None) and not isinstance(sharp, dict):
        raise UserError(f"{path}: 'sharpness' must be true, false or a mapping of sharpness keys, got {sharp!r}")
    if isinstance(sharp, dict):  # the job's own sharpness: section in every variant, checked as a job's
        base = {**(raw.get("base") or {}), "sharpness": {**((raw.get("base") or {}).get("sharpness") or {}), **sharp}}
        raw = {**raw, "base": base}
    for key in ("name", "out"):
        if key in raw and not (isinstance(raw[key], str) and raw[key].strip()):
            raise UserError(f"{path}: '{key}' must be a non-empty string, got {raw[key]!r}")
    out = raw.get("out") or os.path.join("runs", raw.get("name", "study"))
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise UserError(f"{path}: 'base' must be a mapping of job keys, got {type(base).__name__}")
    variants = raw.get("variants") or [{"label": "base"}]
    cross = raw.get("cross") or {}
    if not isinstance(variants, list) or not all(isinstance(v, dict) and "label" in v for v in variants):
        raise UserError(f"{path}: 'variants' must be a list of mappings, each with a 'label'")
    if not isinstance(cross, dict) or not all(isinstance(v, list) and v for v in cross.values()):
        raise UserError(f"{path}: 'cross' must map keys to non-empty lists of values")
    labels = [str(v["label"]) for v in variants]
    for lab in labels:  # each variant gets a folder named after its label, inside `out`
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", lab):
            raise UserError(f"{path}: variant label {lab!r} is not a plain name (letters, digits, _ . + -, not "
                            "starting with a dot): it names the variant's folder")
    twice = sorted({lab for lab in labels if labels.count(lab) > 1})
    if twice:
        raise UserError(f"{path}: variant label {twice[0]!r} is used more than once (each variant gets a "
                        "folder named after its label)")
    result = []
    for v in variants:
        for combo in itertools.product(*cross.values()) if cross else [()]:
            sets = {k: val for k, val in v.items() if k != "label"}
            sets.update(dict(zip(cross.keys(), combo)))
            suffix = "_".join(f"{SHORT.get(k.split('.')[-1], k.split('.')[-1])}{val}"
                              for k, val in zip(cross.keys(), combo))
            name = f"{v['label']}_{suffix}" if suffix else str(v["label"])
            job_raw = copy.deepcopy(base)
            for k, val in sets.items():
                apply_override(job_raw, f"{k}={yaml.safe_dump(val, default_flow_style=True).strip()}", path)
            folder = os.path.join(out, name)
            job_raw["name"] = name
            job_raw["output"] = os.path.join(folder, "surface.h5")
            job_raw.setdefault("model", {})
            if job_raw.get("train") is not None:
                job_raw["model"]["checkpoint"] = os.path.join(folder, "model.pt")
            text = yaml.safe_dump(job_raw, sort_keys=False)
            result.append(Variant(name, job_from_dict(job_raw, f"{path}#{name}", text), str(v["label"]),
                                  tuple(zip(cross.keys(), combo))))
    return (raw.get("name", "study"), out, result, _curvature_settings(raw.get("curvature", True), path),
            sharp not in (False, None))


def _curvature_settings(value, path: str):
    """The study's `curvature` key: None (false), or the settings with defaults filled in."""
    if value is False or value is None:
        return None
    if value is True:
        return dict(CURVATURE)
    if not isinstance(value, dict) or set(value) - set(CURVATURE):
        raise UserError(f"{path}: 'curvature' must be false or a mapping of {', '.join(CURVATURE)}")
    out = {**CURVATURE, **value}
    if out["split"] not in ("train", "test"):
        raise UserError(f"{path}: curvature.split must be train or test, got {out['split']!r}")
    for k in ("batches", "top", "trace_samples"):
        if not isinstance(out[k], int) or isinstance(out[k], bool) or out[k] < 1:
            raise UserError(f"{path}: curvature.{k} must be a whole number >= 1, got {out[k]!r}")
    return out


def curvature_at_optimum(v: Variant, settings: dict, log=print, should_stop=lambda: None, spread=None) -> None:
    """The Hessian at the variant's theta* (lldist.optimum.at_optimum), stored in its surface
    file; skipped when the file holds it with the same settings (a study resumes). Every rank
    calls it: with `spread` (transport.runner.Products) the products' batches are split over
    the ranks, and rank 0 decides, computes the eigenvalues and writes."""
    from .optimum import at_optimum
    from .store import SurfaceReader, write_curvature
    driver = spread is None or spread.rank == 0
    try:
        split = None
        if driver:
            with SurfaceReader(v.job.output) as sf:
                have = sf.curvature(operator=v.job.curvature.operator)
            splits = [sp for sp in ("train", "test") if sp in v.job.splits]
            split = settings["split"] if settings["split"] in splits else splits[0]
            old = have.get(split, {})
            # a small split may hold fewer batches than asked: compare what was asked
            if old.get("batches_requested") == settings["batches"] and \
                    old.get("trace_samples") == settings["trace_samples"] and \
                    len(old.get("top_eigenvalues", [])) >= settings["top"] and \
                    old.get("blocks_spec", None) == v.job.curvature.blocks:
                split = None
        if spread is not None:
            split = spread.gate(split)  # every rank: compute it (on this split), or not
        if split is None:
            return
        res = at_optimum(v.job, settings["top"], settings["trace_samples"], settings["batches"], log=log,
                         split=split, should_stop=should_stop, spread=spread)
        if driver:
            write_curvature(v.job.output, res)
    except BaseException as e:
        if spread is not None:
            spread.fail(e)  # rank 0 and the others wait on each other: end every rank
        raise


def sharpness_at_optimum(v: Variant, log=print, should_stop=lambda: None, spread=None) -> None:
    """The sharpness measures at the variant's theta* (lldist.flatness.measure, with its job's
    sharpness: settings), stored in its surface file; skipped when the file holds them with the
    same settings (a study resumes). Every rank calls it: with `spread` the restarts, draws and
    groups are dealt over the ranks; rank 0 writes."""
    from .flatness import json_settings, measure
    from .store import SurfaceReader, write_sharpness
    driver = spread is None or spread.rank == 0
    try:
        todo = True
        if driver:
            with SurfaceReader(v.job.output) as sf:
                old = sf.sharpness().get(v.job.sharpness.split, {})
            todo = old.get("settings") != json.loads(json_settings(v.job.sharpness))
        if spread is not None:
            todo = spread.gate(todo)
        if not todo:
            return
        res = measure(v.job, log=log, should_stop=should_stop, spread=spread)
        if driver:
            write_sharpness(v.job.output, res)
    except BaseException as e:
        if spread is not None:
            spread.fail(e)
        raise


def _img(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def report(title: str, out: str, variants: list, log=print, made_by: str = "") -> tuple:
    """Metrics, comparison figures, per-variant contours, HTML + Markdown. Rank 0 only.
    `made_by`: the command line, recorded at the top (docs/ quote it; tests rerun it)."""
    from . import figures, metrics
    figdir = os.path.join(out, "figures")
    os.makedirs(figdir, exist_ok=True)
    paths = [v.job.output for v in variants]
    names = [v.name for v in variants]
    splits = list(variants[0].job.splits)
    tables = {}
    for split in splits:
        rows = [metrics.from_file(p, split, store=True) for p in paths]
        tables[split] = metrics.tables(rows, names)
    figs = []
    for path, fig in figures.compare(paths, figures.PlotOptions(), figdir):
        figs.append(path)
        figures.plt.close(fig)
    md = [f"# {title}\n", f"Made by `{made_by}`.\n\n" if made_by else "",
          "Landscape metrics (definitions: docs/METRICS.md), one row per variant, in three tables a split.\n"]
    seeds = any(_replicate(k) for v in variants for k, _ in v.cross)  # then the tables below judge λmax too
    sharp = sharpness(variants, [metrics.from_file(p, splits[0]) for p in paths]) if not seeds else []
    if sharp:
        md.append("\n## Sharpness: the Hessian at theta*\n\n" + "\n".join(sharp) + "\n")
    judged = "train" if "train" in splits else splits[0]
    bars = errorbars(variants, [metrics.from_file(p, judged) for p in paths], judged)
    if bars:
        md.append("\n## Is the difference real?\n\n" + "\n".join(bars))
    for split, groups in tables.items():
        for group, t in groups.items():
            md.append(f"\n## {split} split: {group}\n\n{t}")
    md.append("\nFigures: " + ", ".join(os.path.relpath(f, out) for f in figs) + "\n")
    md_path = os.path.join(out, "report.md")
    with open(md_path, "w") as f:
        f.write("".join(md))
    html = [f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>",
            "<style>body{font-family:sans-serif;max-width:1400px;margin:auto}table{border-collapse:collapse;"
            "font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:100%}"
            "</style></head><body>", f"<h1>{title}</h1>"]
    if sharp:
        import re
        bold = lambda t: re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t.replace("`", ""))  # noqa: E731
        html.append(f"<h2>Sharpness: the Hessian at theta*</h2><p>{bold(sharp[0])}</p><ul>" +
                    "".join(f"<li>{bold(ln[2:])}</li>" for ln in sharp[1:]) + "</ul>")
    if bars:
        html.append("<h2>Is the difference real?</h2>")
        html.append(_md_to_html("\n".join(bars)))
    for split, groups in tables.items():
        for group, t in groups.items():
            html.append(f"<h2>Metrics, {split} split: {group}</h2>" + _md_table_to_html(t))
    html.append("<h2>Side by side (one colour scale) and overlaid curves</h2>")
    for f in figs:
        html.append(f"<h3>{os.path.basename(f)}</h3><img src='{_img(f)}'>")
    html.append("</body></html>")
    html_path = os.path.join(out, "report.html")
    with open(html_path, "w") as f:
        f.write("\n".join(html))
    log(f"report: {html_path}, {md_path}, {len(figs)} figures")
    return html_path, md_path, figs


def _where(v: Variant) -> str:
    """A variant's cross values in words: "batch_size 512"."""
    return ", ".join(f"{k.split('.')[-1]} {val}" for k, val in v.cross) or v.name


def sharpness(variants: list, rows: list) -> list:
    """Markdown lines that answer "is the minimum sharper at batch 512?" per label (variants
    that differ only in the cross values), with lambda_max and the trace, and whether
    sharpness goes with the generalization gap over all variants (Spearman's rank correlation;
    with a handful of variants a pointer, not a test)."""
    import numpy as np
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
        verdict = (f"sharper at {where} by both measures (λmax {ratio:.2g}x, trace beyond two standard errors)"
                   if t_hi - t_lo > err else
                   f"sharper at {where} by λmax ({ratio:.2g}x); the traces do not differ beyond two standard errors"
                   if t_hi >= t_lo else
                   f"λmax is larger at {where} ({ratio:.2g}x) but the trace is smaller: mixed")
        out.append(f"* **{label}**: " + "; ".join(parts) + f". **{verdict}.**")
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
    from .significance import LEVEL, difference, pool, rank_correlation, verdict
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


def _md_to_html(md: str) -> str:
    """The report's own Markdown (### headings, paragraphs, tables) as HTML."""
    out, table = [], []
    for ln in md.splitlines() + [""]:
        if ln.startswith("|"):
            table.append(ln)
            continue
        if table:
            out.append(_md_table_to_html("\n".join(table)))
            table = []
        if ln.startswith("###"):
            out.append(f"<h3>{ln.lstrip('# ').strip()}</h3>")
        elif ln.strip():
            out.append(f"<p>{ln}</p>")
    return "".join(out)


def _md_table_to_html(t: str) -> str:
    lines = [ln for ln in t.strip().splitlines() if ln.strip() and not set(ln) <= set("|-")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    head = "".join(f"<th>{c}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def main(argv=None) -> int:
    import matplotlib
    matplotlib.use("Agg")  # the report's figures are files
    from .run import RunOptions, log, run_surface
    from .transport import runner
    ap = ArgumentParser(prog="python -m lldist.study", doc=__doc__)
    ap.add_argument("study", help="study file (YAML)")
    ap.add_argument("--only", nargs="+", metavar="VARIANT", help="run only these variants (no report)")
    ap.add_argument("--report-only", action="store_true", help="redraw the report from finished surfaces")
    ap.add_argument("--progress-every", type=float, default=30.0, metavar="S",
                    help="seconds between progress lines when not on a terminal (0: none)")
    args = ap.parse_args(argv)
    ctx = runner.launch()
    title, out, variants, curvature, sharp = load_study(args.study)
    if args.only:
        unknown = set(args.only) - {v.name for v in variants}
        if unknown:
            raise UserError(f"--only: no variant {sorted(unknown)[0]!r} (variants: {', '.join(v.name for v in variants)})")
        variants = [v for v in variants if v.name in args.only]
    should_stop = lambda: None  # noqa: E731
    if ctx.rank == 0:
        should_stop = runner.install_sigterm()
        log(f"study {title}: {len(variants)} variants -> {out}: {', '.join(v.name for v in variants)}")
    omp = os.environ.get("OMP_NUM_THREADS")
    made_by = f"{'OMP_NUM_THREADS=' + omp + ' ' if omp else ''}python -m lldist.study {args.study}"
    try:
        if not args.report_only:
            for v in variants:
                if ctx.rank == 0:
                    log(f"--- variant {v.name}")
                code = run_surface(ctx, lambda v=v: v.job, RunOptions(progress_every=args.progress_every),
                                   should_stop=should_stop)
                if code:
                    return code
                if curvature:  # every rank computes its share of the products; rank 0 writes
                    curvature_at_optimum(v, curvature, log=log, should_stop=should_stop,
                                         spread=runner.Products(ctx) if ctx.size > 1 else None)
                if sharp:  # every rank its share of the restarts, draws and groups
                    sharpness_at_optimum(v, log=log, should_stop=should_stop,
                                         spread=runner.Products(ctx) if ctx.size > 1 else None)
        if ctx.rank == 0 and not args.only:
            if args.report_only:  # a study run before curvature or sharpness existed: fill them in
                for v in variants:
                    if curvature:
                        curvature_at_optimum(v, curvature, log=log, should_stop=should_stop)
                    if sharp:
                        sharpness_at_optimum(v, log=log, should_stop=should_stop)
            report(title, out, variants, log=log, made_by=made_by)
    except Stopped as e:
        if ctx.size > 1:  # the other ranks wait for rank 0's next run: end them too
            print(f"lldist: {e}", file=sys.stderr, flush=True)
            ctx.abort(e.exit_code)
        raise
    return 0


def cli() -> None:
    finish(run_cli(main), all_closed)


if __name__ == "__main__":
    cli()
