"""The study's report: its metrics tables, its verdicts (analysis/verdicts.py) and its
comparison figures, as Markdown and as one self-contained HTML page. Rank 0, from the finished
variants' files; no torch.

    html, md, figures = report(title, out, variants, made_by="python -m lldist.study s.yaml")

Writes `<out>/report.html` (figures embedded), `<out>/report.md` and `<out>/figures/`, and
stores each variant's metrics in its file (/metrics/<split>).
"""

from __future__ import annotations

import base64
import os
import re

from . import figures, metrics
from .verdicts import _replicate, errorbars, hessian_verdicts

def _img(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def report(title: str, out: str, variants: list, log=print, made_by: str = "", made_on: str = "") -> tuple:
    """Metrics, comparison figures, per-variant contours, HTML + Markdown. Rank 0 only.
    `made_by`: the command line, recorded at the top (docs/ quote it; tests rerun it); `made_on`:
    the machine (a CNN's float32 training follows its CPU's kernels: docs/ say where they were made)."""
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
    md = [f"# {title}\n", (f"Made by `{made_by}`" + (f" on {made_on}" if made_on else "") + ".\n\n") if made_by else "",
          "Landscape metrics (definitions: docs/METRICS.md), one row per variant, in three tables a split.\n"]
    seeds = any(_replicate(k) for v in variants for k, _ in v.cross)  # then the tables below judge λmax too
    sharp = hessian_verdicts(variants, [metrics.from_file(p, splits[0]) for p in paths]) if not seeds else []
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
