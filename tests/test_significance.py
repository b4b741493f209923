"""The study's error bars (issue 22): its marks follow from its own numbers. Variants built by
hand, two identical and two that clearly differ, over seeds and with one seed; the marks are
checked against scipy's tests computed here."""

import math

import numpy as np
from scipy.stats import kendalltau, ttest_ind

from lldist.analysis.significance import difference, pool, rank_correlation
from lldist.analysis.verdicts import errorbars
from lldist.inputs.study_file import Variant


def variants(values: dict) -> tuple:
    """{(label, batch): [row per seed]} -> (variants, rows) as a study would hold them."""
    vs, rows = [], []
    for (label, batch), per_seed in values.items():
        for seed, row in enumerate(per_seed):
            vs.append(Variant(f"{label}_b{batch}_s{seed}", None, label,
                              (("train.batch_size", batch), ("train.seed", seed))))
            rows.append(row)
    return vs, rows


def table_rows(md: str, label: str) -> dict:
    """{measure: cells} of the label's table in errorbars' Markdown."""
    block = md.split(f"### {label}\n\n", 1)[1].split("\n\n", 1)[0]
    lines = [ln for ln in block.splitlines() if ln.startswith("|") and not ln.startswith("|---")]
    return {c[0]: c[1:] for c in ([x.strip() for x in ln.strip("|").split("|")] for ln in lines[1:])}


def test_identical_variants_are_not_marked_and_different_ones_are():
    rng = np.random.default_rng(0)
    same = list(1.0 + 0.1 * rng.standard_normal(5))
    far = list(3.0 + 0.1 * rng.standard_normal(5))
    near = list(1.02 + 0.1 * rng.standard_normal(5))
    data = {("alike", 64): [{"hessian_trace": v} for v in same], ("alike", 512): [{"hessian_trace": v} for v in same],
            ("apart", 64): [{"hessian_trace": v} for v in same], ("apart", 512): [{"hessian_trace": v} for v in far],
            ("close", 64): [{"hessian_trace": v} for v in same], ("close", 512): [{"hessian_trace": v} for v in near]}
    vs, rows = variants(data)
    md = "\n".join(errorbars(vs, rows, "train"))
    for label, other in (("alike", same), ("apart", far), ("close", near)):
        cells = table_rows(md, label)["trace (Hessian)"]
        p = ttest_ind(other, same, equal_var=False).pvalue if other is not same else 1.0
        assert cells[-1] == ("**yes**" if p < 0.05 else "no"), (label, cells, p)
        assert cells[0].endswith("(5)")  # five seeds pooled
        mean, se = float(cells[0].split(" ± ")[0]), float(cells[0].split(" ± ")[1].split()[0])
        assert math.isclose(mean, np.mean(same), rel_tol=1e-3)
        assert se == float(f"{np.std(same, ddof=1) / math.sqrt(5):.2g}")  # two digits
    assert table_rows(md, "alike")["trace (Hessian)"][-1] == "no"
    assert table_rows(md, "apart")["trace (Hessian)"][-1] == "**yes**"


def test_with_one_seed_the_values_own_errors_decide():
    data = {("a", 64): [{"hessian_trace": 100.0, "hessian_trace_stderr": 5.0, "hessian_lambda_max": 10.0}],
            ("a", 512): [{"hessian_trace": 104.0, "hessian_trace_stderr": 5.0, "hessian_lambda_max": 50.0}],
            ("b", 64): [{"hessian_trace": 100.0, "hessian_trace_stderr": 1.0}],
            ("b", 512): [{"hessian_trace": 200.0, "hessian_trace_stderr": 1.0}]}
    vs, rows = variants(data)
    md = "\n".join(errorbars(vs, rows, "train"))
    a, b = table_rows(md, "a"), table_rows(md, "b")
    assert a["trace (Hessian)"][-1] == "no" and b["trace (Hessian)"][-1] == "**yes**"
    assert a["λmax (Hessian)"][-2:] == ["–", "no"]  # no error of its own: not judged
    d = difference(pool(rows[:1], "hessian_trace"), pool(rows[1:2], "hessian_trace"))
    assert math.isclose(d["se"], math.hypot(5, 5)) and math.isclose(d["delta"], 4.0)
    assert math.isclose(d["p"], 2 * (1 - 0.5 * (1 + math.erf(4 / math.hypot(5, 5) / math.sqrt(2)))), rel_tol=1e-9)


def test_rank_correlation_is_kendalls_with_an_interval_that_holds_it():
    rng = np.random.default_rng(1)
    gap = rng.uniform(0, 0.1, 30)
    tight = gap * 10 + 0.01 * rng.standard_normal(30)
    noise = rng.standard_normal(30)
    for x in (tight, noise):
        c = rank_correlation(x, gap, boot=500)
        ref = kendalltau(x, gap)
        assert math.isclose(c["tau"], ref.statistic) and math.isclose(c["p"], ref.pvalue) and c["n"] == 30
        assert c["low"] <= c["tau"] <= c["high"]
    assert rank_correlation(tight, gap, boot=500)["low"] > 0.5
    c = rank_correlation(noise, gap, boot=500)
    assert c["low"] < 0 < c["high"]
    assert math.isnan(rank_correlation([1, 2], [1, 2])["tau"])


def test_a_small_study_gets_its_tables_and_no_correlation():
    """Three variants: too few for a rank correlation; the tables still come (a study of two
    batch sizes and one seed once crashed here)."""
    data = {("a", 64): [{"hessian_trace": 100.0, "hessian_trace_stderr": 5.0, "trained_gap": 0.01}],
            ("a", 512): [{"hessian_trace": 140.0, "hessian_trace_stderr": 5.0, "trained_gap": 0.02}],
            ("b", 64): [{"hessian_trace": 90.0, "hessian_trace_stderr": 5.0, "trained_gap": 0.03}]}
    vs, rows = variants(data)
    md = "\n".join(errorbars(vs, rows, "train"))
    assert "### a" in md and "Which measure ranks" not in md
