"""Curvature at scale: products spread over real MPI ranks against one rank and the exact
Hessian, the hessian command over ranks, per-block spectra in the file, and per-cell maps of
the GGN and the Fisher killed and resumed.

The stated tolerance (README, docs/CURVATURE.md): a product over N ranks equals one rank's to
1e-6 relative (each rank sums its batches in float64, the ranks' sums meet in rank order: only
the order of float64 additions differs, then one float32 rounding); eigenvalues and traces to
1e-5 relative, a semidefinite operator's λmin near 0 to Lanczos's tolerance × λmax."""

import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import ROOT, done_after_kill, env, mpiexec, run, write_job
from test_curvature import full_hessian
from test_operators import explicit_fisher, explicit_ggn

SCRIPT = os.path.join(ROOT, "tests", "spread_products.py")


def _spread(workdir, n, operator, *scatter):
    out = str(workdir / f"p{n}_{operator}.npz")
    run([mpiexec(), "-n", str(n), sys.executable, SCRIPT, out, operator, *scatter], workdir)
    return np.load(out)


@pytest.mark.parametrize("operator", ["hessian", "ggn", "fisher"])
@pytest.mark.slow
def test_products_over_1_2_3_ranks_agree_and_equal_the_exact_matrix(workdir, operator):
    from spread_products import model_and_batches
    m, batches = model_and_batches()
    M = {"hessian": full_hessian, "ggn": explicit_ggn, "fisher": explicit_fisher}[operator](m, batches)
    one = _spread(workdir, 1, operator)
    np.testing.assert_allclose(one["hv"], one["vs"] @ M.T, rtol=1e-4, atol=1e-6)
    for n in (2, 3):
        got = _spread(workdir, n, operator, *(["5"] if n == 3 else []))  # at 3: the sums scattered 5 entries at a time
        np.testing.assert_array_equal(got["vs"], one["vs"])
        scale = np.abs(one["hv"]).max()
        assert np.abs(got["hv"] - one["hv"]).max() <= 1e-6 * scale
        np.testing.assert_allclose(got["top"], one["top"], rtol=1e-5)
        np.testing.assert_allclose(got["trace"][0], one["trace"][0], rtol=1e-5)
    np.testing.assert_allclose(one["top"], np.linalg.eigvalsh(M)[::-1][:2], rtol=1e-5)


def tiny_job(workdir, **kw):
    return write_job(workdir / "job.yaml", train={"epochs": 4, "lr": 0.01, "batch_size": 64, "seed": 0},
                     eval={"split": "test", "batch_size": 12, "threads": 1}, **kw)


@pytest.mark.slow
def test_hessian_command_over_ranks_with_blocks_and_operators(workdir):
    job = tiny_job(workdir, curvature={"blocks": "layers"})
    run(["lldist.surface", job, "--set", "grid.x=[-1,1,3]", "--set", "grid.y=[-1,1,3]", "--out", "s.h5"], workdir)
    args = ["-m", "lldist.hessian", job, "--top", "2", "--batches", "3", "--trace-samples", "16"]
    got = {}
    for n in (1, 3):
        for op in ("hessian", "ggn"):
            f = f"s{n}.h5"
            if not os.path.exists(f):
                import shutil
                shutil.copyfile("s.h5", f)
            r = run([mpiexec(), "-n", str(n), sys.executable, *args, "--set", f"curvature.operator={op}", "--out", f],
                    workdir)
            key = "test" if op == "hessian" else "test_ggn"
            assert f"under /curvature/{key}" in r.stdout
            with h5py.File(f, "r") as h:
                g = h["curvature"][key]
                got[n, op] = {k: g.attrs[k] for k in ("lambda_max", "lambda_min", "trace", "blocks", "ranks",
                                                      "operator", "lambda_max_se")}
    import json
    for op in ("hessian", "ggn"):
        a, b = got[1, op], got[3, op]
        assert (a["ranks"], b["ranks"], a["operator"]) == (1, 3, op)
        # one process runs ARPACK on whole vectors, three ranks Lanczos on split ones: both to
        # the default tolerance 1e-4 relative to the spectrum's scale (a semidefinite λmin near
        # 0 is within that of it), and the trace from the same Rademacher vectors
        for k in ("lambda_max", "trace"):
            assert b[k] == pytest.approx(a[k], rel=1e-5)
        assert b["lambda_min"] == pytest.approx(a["lambda_min"], abs=1e-4 * a["lambda_max"])
        assert b["lambda_max_se"] == pytest.approx(a["lambda_max_se"], rel=1e-3)  # the jackknife's runs spread too
        ba, bb = json.loads(a["blocks"]), json.loads(b["blocks"])
        assert [r["block"] for r in ba] == ["net.1", "net.3"]
        for ra, rb in zip(ba, bb):
            assert rb["lambda_max"] == pytest.approx(ra["lambda_max"], rel=1e-5)
            assert rb["trace"] == pytest.approx(ra["trace"], rel=1e-5)
    assert got[1, "ggn"]["lambda_min"] > -1e-6 * got[1, "ggn"]["lambda_max"]  # the GGN is PSD here
    assert got[1, "hessian"]["lambda_min"] < 0
    out = run(["lldist.info", "s3.h5"], workdir).stdout
    assert "curvature at theta* (test, 3 batches of 12, 3 ranks)" in out
    assert "curvature at theta* (ggn, test," in out and "net.3" in out
    # the bar chart of the blocks
    run(["lldist.plot", "s3.h5", "--dpi", "50"], workdir)
    assert os.path.exists("s3_test_blocks.png") and os.path.exists("s3_test_ggn_blocks.png")


@pytest.mark.slow
def test_a_failing_worker_ends_every_rank(workdir):
    job = tiny_job(workdir)
    run(["lldist.surface", job, "--set", "grid.x=[-1,1,3]", "--out", "s.h5"], workdir)
    bad = run([mpiexec(), "-n", "2", sys.executable, "-m", "lldist.hessian", job, "--set", "curvature.blocks={x: '^nope'}",
               "--out", "s.h5"], workdir, check=False, timeout=120)
    assert bad.returncode == 2 and "curvature.blocks.x" in bad.stderr


@pytest.mark.slow
@pytest.mark.parametrize("operator", ["ggn", "fisher"])
def test_per_cell_maps_of_the_other_operators_killed_and_resumed_are_bitwise_the_same(workdir, operator):
    job = tiny_job(workdir, grid={"x": [-1.0, 1.0, 7], "y": [-1.0, 1.0, 6]},
                   curvature={"operator": operator})
    curv = ["--set", "eval.curvature=true", "--set", "eval.chunk_size=1"]
    run(["lldist.surface", job, *curv, "--out", "whole.h5"], workdir)
    cmd = [sys.executable, "-m", "lldist.surface", job, *curv, "--progress-every", "0.001"]
    p = subprocess.Popen(cmd, cwd=workdir, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        if line.startswith("cells ") and int(line.split()[1].split("/")[0]) >= 10:
            p.send_signal(signal.SIGKILL)
            break
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert 10 <= done_after_kill("out.h5") < 42
    run(["lldist.surface", job, *curv], workdir)
    with h5py.File("whole.h5", "r") as a, h5py.File("out.h5", "r") as b:
        assert b["done"][()].all()
        for q in ("loss", "lambda_max", "lambda_min", "eig_ratio"):
            np.testing.assert_array_equal(a["test"][q][()], b["test"][q][()])
        assert {"ggn": "Gauss-Newton", "fisher": "Fisher"}[operator] in a["test/lambda_max"].attrs["long_name"]
        assert (a["test/lambda_min"][()] > -1e-4 * a["test/lambda_max"][()]).all()  # PSD at every cell
    # another operator is another job: the file is not resumed with it
    other = "fisher" if operator == "ggn" else "ggn"
    r = run(["lldist.surface", job, *curv, "--set", f"curvature.operator={other}"], workdir, check=False)
    assert r.returncode == 2
