"""Landscape metrics on analytic surfaces, the shared colour scale of --compare, and a study
end to end (train, surface, metrics, report; a second run reuses the surfaces)."""

import os
import sys

import h5py
import matplotlib
import numpy as np
import pytest
import yaml
from conftest import chunk_log, mpiexec, run, write_job

from lldist.analysis import figures
from lldist.analysis import metrics


def grid(n=21):
    x = np.linspace(-1, 1, n)
    y = np.linspace(-0.5, 0.5, n - 4)  # non-square, finer in y
    X, Y = np.meshgrid(x, y)
    return x, y, X, Y


def test_paraboloid_curvature_convexity_roughness():
    x, y, X, Y = grid()
    p, q, c = 3.0, 0.5, 0.2
    z = p * X ** 2 + q * Y ** 2 + c
    m, conv = metrics.compute(z, np.ones_like(z), x, y)
    assert m["centre_loss"] == pytest.approx(c)
    assert m["curvature_x"] == pytest.approx(2 * p, rel=1e-9)
    assert m["curvature_y"] == pytest.approx(2 * q, rel=1e-9)
    assert m["convex_fraction"] == 1.0 and conv[1:-1, 1:-1].all() and not conv[0].any()
    assert m["local_minima"] == 1
    hx, hy = x[1] - x[0], y[1] - y[0]
    # second differences are 2p hx^2 along x and 2q hy^2 along y, everywhere
    nx_terms, ny_terms = (len(x) - 2) * len(y), len(x) * (len(y) - 2)
    expect = (2 * p * hx ** 2 * nx_terms + 2 * q * hy ** 2 * ny_terms) / (nx_terms + ny_terms)
    assert m["roughness"] == pytest.approx(expect, rel=1e-9)
    # basin: cells within eps of the centre loss, counted directly
    assert m["basin_eps0.1"] == pytest.approx(((z - c) <= 0.1 + 1e-12).mean())
    assert 0 < m["mean_rise_r0.25"] < m["mean_rise_r0.5"] < m["mean_rise_r1"]
    # within r = 0.1 only cells with |x| <= 0.1 and |y| <= 0.1: the rise is p x^2 + q y^2 there
    r = np.hypot(X, Y) <= 0.1 + 1e-12
    assert m["mean_rise_r0.1"] == pytest.approx((z - c)[r].mean())


def test_saddle_is_not_convex_and_double_well_has_two_minima():
    x, y, X, Y = grid()
    m, _ = metrics.compute(X ** 2 - Y ** 2, np.ones_like(X), x, y)
    assert m["convex_fraction"] == 0.0
    z = (X ** 2 - 0.25) ** 2 + Y ** 2  # minima at (+-0.5, 0), both on the grid
    m, _ = metrics.compute(z, np.ones_like(z), x, y)
    assert m["local_minima"] == 2
    wavy = X ** 2 + 0.05 * np.cos(12 * np.pi * X) * np.cos(12 * np.pi * Y)
    m2, _ = metrics.compute(wavy, np.ones_like(z), x, y)
    assert m2["local_minima"] > 2 and m2["roughness"] > m["roughness"]
    # 1D: a parabola
    m1, conv = metrics.compute(4 * x ** 2, np.ones_like(x), x)
    assert conv is None and m1["curvature_x"] == pytest.approx(8.0) and m1["convex_fraction"] == 1.0


def three_surfaces(workdir):
    paths = []
    for i, bs in enumerate([16, 64, 256]):
        job = write_job(workdir / f"j{i}.yaml", output=f"s{i}.h5", model={"name": "mlp", "checkpoint": f"m{i}.pt",
                                                                          "args": {"hidden": [16]}},
                        train={"epochs": 2, "batch_size": bs}, grid={"x": [-1, 1, 5], "y": [-1, 1, 4]})
        run(["lldist.surface", job], workdir)
        paths.append(f"s{i}.h5")
    return paths


@pytest.mark.slow
def test_compare_uses_one_colour_scale(workdir):
    paths = three_surfaces(workdir)
    args = figures.PlotOptions(levels=20, dpi=50)
    figs = dict(figures.compare(paths, args, str(workdir)))
    fig = figs[os.path.join(str(workdir), "compare_test_loss.png")]
    sets = [c for ax in fig.axes for c in ax.collections if isinstance(c, matplotlib.contour.ContourSet)]
    filled = [c for c in sets if c.filled]
    assert len(filled) == 3
    for c in filled[1:]:
        np.testing.assert_array_equal(c.levels, filled[0].levels)
        assert (c.norm.vmin, c.norm.vmax) == (filled[0].norm.vmin, filled[0].norm.vmax)
    # the scale spans all three surfaces, not just the first
    # (levels are round values: the first at or below the lowest loss of all three, the next above it)
    with h5py.File(paths[0]) as a, h5py.File(paths[1]) as m, h5py.File(paths[2]) as b:
        lo = min(f["test/loss"][()].min() for f in (a, m, b))
        hi = max(f["test/loss"][()].max() for f in (a, m, b))
    assert filled[0].levels[0] <= lo < filled[0].levels[1]
    assert filled[0].levels[-2] < hi <= filled[0].levels[-1]
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["batch 16", "batch 64", "batch 256"]
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert len({ax.get_xlim() for ax in axes}) == 1 and len({ax.get_ylim() for ax in axes}) == 1
    run(["lldist.plot", *paths, "--compare", "--out", "cmp"], workdir)
    assert os.path.exists("cmp/compare_test_acc.png")


def tiny_study():
    return {
        "name": "tiny_study", "out": "study",
        "base": {"data": {"name": "digits", "subset": 100}, "train": {"epochs": 2, "lr": 0.01},
                 "grid": {"x": [-1, 1, 5], "y": [-1, 1, 5]}, "eval": {"split": "both", "threads": 1}},
        "variants": [{"label": "mlp", "model.name": "mlp", "model.args": {"hidden": [16]}},
                     {"label": "cnn", "model.name": "cnn", "model.args": {"width": 4, "stages": 2}}],
        "cross": {"train.batch_size": [32, 256]},
    }


@pytest.mark.slow
def test_study_end_to_end_and_reuse(workdir):
    with open("study.yaml", "w") as f:
        yaml.safe_dump(tiny_study(), f)
    run(["lldist.study", "study.yaml"], workdir)
    names = ["mlp_b32", "mlp_b256", "cnn_b32", "cnn_b256"]
    for n in names:
        assert os.path.exists(f"study/{n}/surface.h5") and os.path.exists(f"study/{n}/model_epoch2.pt")
        with h5py.File(f"study/{n}/surface.h5") as f:
            assert "curvature_x" in f["metrics/test"].attrs and f["metrics/test/convex"].shape == (5, 5)
    md = open("study/report.md").read()
    for n in names:
        assert f"| {n} |" in md
    # the Hessian at each theta*, on the train split, in the files and in the report's table
    lam = {}
    for n in names:
        with h5py.File(f"study/{n}/surface.h5") as f:
            a = f["curvature/train"].attrs
            assert a["batches_requested"] == 2 and 1 <= a["batches"] <= 2 and a["trace_samples"] == 32
            assert a["lambda_max"] > 0
            lam[n] = float(a["lambda_max"])
    head = [ln for ln in md.splitlines() if ln.startswith("| surface |")][0].split("|")
    col = [c.strip() for c in head].index("hessian_lambda_max")
    for n in names:
        row = [ln for ln in md.splitlines() if ln.startswith(f"| {n} |")][0].split("|")
        assert float(row[col]) == pytest.approx(lam[n], rel=1e-3)
    assert "## Sharpness: the Hessian at theta*" in md
    for label in ("mlp", "cnn"):
        sharper = max((32, 256), key=lambda b: lam[f"{label}_b{b}"])
        verdict = md.split(f"**{label}**")[1].split("\n")[0]
        assert f"sharper at batch_size {sharper}" in verdict or f"λmax is larger at batch_size {sharper}" in verdict
    html = open("study/report.html").read()
    assert html.count("data:image/png;base64,") == 4 and "<table>" in html and "Sharpness" in html
    os.utime("study/report.html", (0, 0))  # so that a rewrite shows, however fast
    q = run(["lldist.study", "study.yaml"], workdir)
    assert q.stdout.count(" 0 to compute") == 4 and "training it first" not in q.stdout
    assert "curvature at theta*" not in q.stdout  # stored with the same settings: not recomputed
    assert os.path.getmtime("study/report.html") > 0  # the report was drawn again


@pytest.mark.slow
def test_study_under_mpi_uses_every_rank(workdir):
    study = tiny_study()
    study["variants"] = study["variants"][:1]
    # 600 cells of a tiny MLP: enough work that a rank slow to start still gets chunks
    study["base"]["grid"] = {"x": [-1, 1, 30], "y": [-1, 1, 20]}
    study["base"]["eval"]["chunk_size"] = 3
    with open("study.yaml", "w") as f:
        yaml.safe_dump(study, f)
    run([mpiexec(), "-n", "3", sys.executable, "-m", "lldist.study", "study.yaml"], workdir)
    for n in ("mlp_b32", "mlp_b256"):
        records, cells = chunk_log(f"study/{n}/surface.h5")
        assert sorted(cells.tolist()) == list(range(600)) and set(records["rank"].tolist()) == {0, 1, 2}
    assert "| mlp_b256 |" in open("study/report.md").read()
    # the Hessian at each θ* was spread over the three ranks (Lanczos on each rank's piece of
    # every vector), and is one process's (ARPACK) to 1e-5. λmin only to about 1e-3 × λmax at
    # the default tolerance 1e-4: the row Lanczos stops when a Ritz value's residual is below
    # tol × the spectrum's scale, ARPACK when it is below tol × that Ritz value (measured here:
    # 5.8e-4 × λmax; docs/CURVATURE.md)
    from lldist.runs.hessian import compute
    from lldist.runs.study import at_theta
    from lldist.store import SurfaceReader
    from lldist.inputs.study_file import load_study
    for v in load_study("study.yaml").variants:
        with SurfaceReader(v.job.output) as sf:
            got = sf.curvature()["train"]
        assert got["ranks"] == 3
        one = compute(at_theta(v.job, v.job.splits), log=lambda m: None)  # the study's settings: 2 batches, top 2
        assert (one["batches_requested"], len(one["top_eigenvalues"]), one["trace_samples"]) == (2, 2, 32)
        for k in ("lambda_max", "trace"):
            assert got[k] == pytest.approx(one[k], rel=1e-5, abs=1e-7)
        assert got["lambda_min"] == pytest.approx(one["lambda_min"], abs=10 * one["lanczos_tol"] * one["lambda_max"])


def test_sharpness_section_reads_the_numbers_right():
    """The report's answer to "is batch 512 sharper?", from rows of known numbers, and the
    rank correlation against scipy's."""
    from scipy.stats import spearmanr

    from lldist.analysis.verdicts import hessian_verdicts
    from lldist.inputs.study_file import Variant
    vs, rows = [], []
    numbers = {("a", 64): (10.0, 100.0, 1.0, 0.01), ("a", 512): (30.0, 200.0, 1.0, 0.05),   # sharper, both
               ("b", 64): (50.0, 300.0, 40.0, 0.02), ("b", 512): (60.0, 320.0, 40.0, 0.03),  # traces too close
               ("c", 64): (9.0, 90.0, 1.0, 0.04), ("c", 512): (8.0, 150.0, 1.0, 0.00)}     # mixed
    for (label, b), (lmax, tr, err, gap) in numbers.items():
        vs.append(Variant(f"{label}_b{b}", None, label, (("train.batch_size", b),)))
        rows.append({"hessian_lambda_max": lmax, "hessian_trace": tr, "hessian_trace_stderr": err,
                     "hessian_split": "train", "trained_gap": gap})
    text = hessian_verdicts(vs, rows)
    line = {ln.split("**")[1]: ln for ln in text[1:4]}
    assert "sharper at batch_size 512 by both measures (λmax 3x" in line["a"]
    assert "sharper at batch_size 512 by λmax (1.2x); the traces do not differ" in line["b"]
    assert "λmax is larger at batch_size 64 (1.1x) but the trace is smaller: mixed" in line["c"]
    lam, tr, gap = (np.array([v[i] for v in numbers.values()]) for i in (0, 1, 3))
    assert f"λmax {spearmanr(lam, gap)[0]:+.2f}, trace {spearmanr(tr, gap)[0]:+.2f}" in text[4]


@pytest.mark.slow
def test_a_study_over_seeds_with_planes_and_sharpness_answers_with_error_bars(workdir):
    """cross: {train.seed: [...]} pools seeds; directions.repeats gives every metric its planes'
    error; the sharpness measures are computed at every theta* (once: a second run reuses them)
    and the report's marks follow from its own table."""
    from lldist.analysis.significance import difference, pool
    from lldist.analysis.verdicts import errorbars
    from lldist.inputs.study_file import load_study
    study = tiny_study()
    study["variants"] = study["variants"][:1]
    study["cross"] = {"train.batch_size": [16, 100], "train.seed": [0, 1, 2]}
    study["base"]["directions"] = {"repeats": 2}
    study["sharpness"] = {"examples": 60, "steps": 2, "restarts": 2, "draws": 3, "m": 20, "pac_tol": 0.3}
    with open("study.yaml", "w") as f:
        yaml.safe_dump(study, f)
    run(["lldist.study", "study.yaml"], workdir)
    md = open("study/report.md").read()
    assert "## Is the difference real?" in md and "### mlp" in md and "Which measure ranks the generalization gap" in md
    study = load_study("study.yaml")
    variants = study.variants
    assert study.sharpness and len(variants) == 6
    rows = [metrics.from_file(v.job.output, "train") for v in variants]
    assert all(r["planes"] == 2 and "sharp_worst_l2" in r and "roughness_planes_se" in r for r in rows)
    block = md.split("### mlp\n\n")[1].split("\n\n")[0]
    line = [ln for ln in block.splitlines() if ln.startswith("| worst-case adaptive sharpness, ℓ2 |")][0]
    cells = [c.strip() for c in line.strip("|").split("|")]
    d = difference(pool(rows[:3], "sharp_worst_l2"), pool(rows[3:], "sharp_worst_l2"))
    assert cells[-1] == ("**yes**" if d["p"] < 0.05 else "no") and cells[1].endswith("(3)")
    assert errorbars(variants, rows, "train")[1].startswith("### mlp")
    q = run(["lldist.study", "study.yaml"], workdir)
    assert "sharpness at theta*" not in q.stdout  # stored with the same settings: not recomputed
