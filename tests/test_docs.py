"""The numbers in docs/ are what the code computes: the committed digits study report is rerun
with the command it names and compared table by table (it was stale for a whole round once)."""

import os
import re

import numpy as np
import pytest
from conftest import ROOT, run

RTOL, ATOL = 0.02, 0.002  # one thread, the same CPU family: in practice the digits repeat


def tables(text: str) -> dict:
    """{(section, row label, column): cell text} of every Markdown table, the section being the
    heading above it (## ...)."""
    out, section, head = {}, "", None
    for ln in text.splitlines():
        if ln.startswith("#"):
            section, head = ln.lstrip("# ").strip(), None
        elif ln.startswith("|"):
            cells = [c.strip() for c in ln.strip().strip("|").split("|")]
            if set(ln) <= set("|-: "):
                continue
            if head is None:
                head = cells
            else:
                for col, value in zip(head[1:], cells[1:]):
                    out[(section, cells[0], col)] = value
        else:
            head = None
    return out


def number(text: str):
    m = re.fullmatch(r"[-+]?\d[\d,]*(\.\d+)?(e[-+]?\d+)?", text.replace(" ", ""))
    return float(text.replace(",", "")) if m else None


def compare_reports(committed: str, rerun: str) -> list:
    """Cells that differ beyond the tolerance (numbers) or at all (words); [] when they agree."""
    a, b = tables(committed), tables(rerun)
    assert a, "the committed report has no tables"
    bad = [f"{k}: missing in the rerun" for k in a if k not in b]
    for k, va in a.items():
        if k not in b:
            continue
        na, nb = number(va), number(b[k])
        if na is None or nb is None:
            if va != b[k]:
                bad.append(f"{k}: {va!r} != {b[k]!r}")
        elif not np.isclose(na, nb, rtol=RTOL, atol=ATOL):
            bad.append(f"{k}: {va} != {b[k]}")
    return bad


def test_the_comparison_catches_a_stale_number():
    text = "## test split\n\n| surface | roughness | best |\n|---|---|---|\n| a | 9.0 | b64 |\n"
    assert compare_reports(text, text) == []
    assert compare_reports(text, text.replace("9.0", "7.3")) == ["('test split', 'a', 'roughness'): 9.0 != 7.3"]
    assert compare_reports(text, text.replace("b64", "b512")) != []
    assert compare_reports(text, text.replace("9.0", "9.01")) == []  # within the tolerance


@pytest.mark.slow
def test_the_digits_study_report_is_what_the_code_computes(workdir):
    """The command docs/study_digits/report.md names (one thread: conftest's environment),
    rerun from scratch, gives the committed tables (about 6 minutes on 2 cores)."""
    committed = open(os.path.join(ROOT, "docs", "study_digits", "report.md")).read()
    assert "OMP_NUM_THREADS=1 python -m lldist.study jobs/study_digits.yaml" in committed
    run(["lldist.study", os.path.join(ROOT, "jobs", "study_digits.yaml")], workdir, timeout=1800)
    rerun = open(workdir / "runs" / "study_digits" / "report.md").read()
    bad = compare_reports(committed, rerun)
    if made_on(rerun) != made_on(committed):
        # another CPU family: the CNNs' float32 training sums in its kernels' order (their rows
        # differ by up to a third here); the MLPs' rows must still agree
        bad = [b for b in bad if "'mlp_" in b]
    assert not bad, "docs/study_digits/report.md is stale:\n" + "\n".join(bad[:20])


def made_on(report: str) -> str:
    """The machine a report names ("Made by `...` on <CPU>, torch <version>.")."""
    found = re.search(r"^Made by `[^`]*` on (.+)\.$", report, re.M)
    return found.group(1) if found else ""


def linked_figures(path: str) -> list:
    """Every figure a Markdown file links: ![..](x.png), [..](x.svg), and a report's "Figures: a,
    b" line, as paths relative to the file's folder."""
    text = open(path).read()
    found = re.findall(r"\]\(([^)\s]+\.(?:png|svg|pdf|jpg))\)", text)
    for line in re.findall(r"^Figures: (.+)$", text, re.M):
        found += [f.strip() for f in line.split(",") if re.search(r"\.(png|svg|pdf|jpg)$", f.strip())]
    return found


def test_every_figure_a_committed_document_links_is_committed():
    """docs/study_digits_seeds/report.md linked figures/compare_*.png, which were not committed."""
    docs = [os.path.join(ROOT, "README.md")] + [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(ROOT, "docs"))
                                                for f in fs if f.endswith(".md")]
    missing = [f"{os.path.relpath(md, ROOT)}: {fig}" for md in docs for fig in linked_figures(md)
               if not fig.startswith("http") and not os.path.exists(os.path.join(os.path.dirname(md), fig))]
    assert len(docs) > 5 and any(linked_figures(md) for md in docs)
    assert not missing, missing

