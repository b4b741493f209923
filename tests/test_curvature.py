"""Curvature and the other direction kinds, against independent computations: the full
Hessian of a small model (torch.autograd.functional.hessian + numpy.linalg.eigh), PCA against
numpy.linalg.svd of the stacked differences, projections against direct dot products."""

import dataclasses
import sys

import h5py
import numpy as np
import pytest
import torch
from conftest import mpiexec, run, write_job
from torch import nn

from lldist.directions.pca import pca_directions
from lldist.evaluation.curvature import Curvature
from lldist.evaluation.tasks import Task


def full_hessian(model, batches, params=None):
    """The Hessian of the mean cross-entropy over `batches`, built entry by entry by autograd."""
    names = [n for n, _ in model.named_parameters()]
    base = params or dict(model.named_parameters())
    shapes = [base[n].shape for n in names]
    sizes = [base[n].numel() for n in names]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])

    def f(flat):
        parts = dict(zip(names, (p.view(s) for p, s in zip(torch.split(flat, sizes), shapes))))
        out = torch.func.functional_call(model, parts, (x,))
        return nn.functional.cross_entropy(out, y)
    flat = torch.cat([base[n].detach().reshape(-1) for n in names])
    return torch.autograd.functional.hessian(f, flat).double().numpy()


def small_model_and_batches(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(50, 6), torch.randint(0, 3, (50,))
    return m, [(x[:32], y[:32]), (x[32:], y[32:])]  # unequal batches: the mean is over examples


def test_extreme_eigenvalues_and_trace_match_the_full_hessian():
    m, batches = small_model_and_batches()
    H = full_hessian(m, batches)
    ev = np.linalg.eigvalsh(H)
    c = Curvature(m, batches, Task())
    hi, lo = c.extremes(tol=1e-10)
    assert hi == pytest.approx(ev[-1], rel=1e-5) and lo == pytest.approx(ev[0], rel=1e-4, abs=1e-6)
    vals, vecs = c.eigs(k=3, which="LA", tol=1e-10)
    np.testing.assert_allclose(vals, ev[::-1][:3], rtol=1e-5)
    np.testing.assert_allclose(H @ vecs[:, 0], vals[0] * vecs[:, 0], atol=1e-5)  # an eigenvector indeed
    tr, err = c.trace(samples=400, seed=1)
    assert abs(tr - np.trace(H)) < 4 * err  # Hutchinson: unbiased, with its own stated error
    # H v itself, against the matrix
    v = np.random.default_rng(0).standard_normal(c.n)
    np.testing.assert_allclose(c.matvec(v), H @ v, rtol=1e-4, atol=1e-6)


def test_curvature_at_other_weights():
    m, batches = small_model_and_batches(1)
    moved = {n: p.detach() + 0.3 * torch.randn_like(p) for n, p in m.named_parameters()}
    H = full_hessian(m, batches, moved)
    ev = np.linalg.eigvalsh(H)
    hi, lo = Curvature(m, batches, Task()).at(moved).extremes(tol=1e-10)
    assert hi == pytest.approx(ev[-1], rel=1e-5) and lo == pytest.approx(ev[0], rel=1e-4, abs=1e-6)


def test_pca_matches_numpy_svd_and_the_projections_are_dot_products():
    g = torch.Generator().manual_seed(0)
    theta = {"a.weight": torch.randn(4, 3, generator=g), "a.bias": torch.randn(4, generator=g),
             "b.weight": torch.randn(2, 4, generator=g), "bn.running_mean": torch.zeros(4)}
    kinds = {"a.weight": "weight", "a.bias": "vector", "b.weight": "weight", "bn.running_mean": "buffer"}
    traj = [{n: w + torch.randn(w.shape, generator=g) * (5 - i) for n, w in theta.items()} for i in range(5)]
    dirs, info, coords = pca_directions(theta, kinds, traj, ignore="biasbn")
    moving = ["a.weight", "b.weight"]  # biases ignored, buffers never move
    D = np.stack([np.concatenate([(t[n] - theta[n]).double().reshape(-1).numpy() for n in moving]) for t in traj])
    U, S, Vt = np.linalg.svd(D, full_matrices=False)
    for k, axis in enumerate(("x", "y")):
        got = np.concatenate([dirs[axis][n].double().reshape(-1).numpy() for n in moving])
        assert abs(abs(got @ Vt[k]) - 1) < 1e-6  # the same direction, up to its sign
        assert np.linalg.norm(got) == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_allclose(coords[:, k].numpy(), D @ got, atol=1e-6)  # the stored direction is float32
    var = S ** 2 / (S ** 2).sum()
    np.testing.assert_allclose(info["explained_variance_ratio"], var[:2], rtol=1e-6)
    assert not dirs["x"]["a.bias"].any() and not dirs["x"]["bn.running_mean"].any()


def test_centred_pca_is_scikit_learns_as_in_li_et_al():
    """directions.center: mean is scikit-learn's PCA of the differences theta_i - theta (what
    Li et al.'s setup_PCA_directions fits): the same components up to sign, the same explained
    variance ratios; the coordinates stay the projections of the differences themselves."""
    from sklearn.decomposition import PCA
    g = torch.Generator().manual_seed(1)
    theta = {"a.weight": torch.randn(5, 3, generator=g), "b.weight": torch.randn(2, 5, generator=g)}
    kinds = {"a.weight": "weight", "b.weight": "weight"}
    traj = [{n: w + torch.randn(w.shape, generator=g) * (6 - i) + 3.0 for n, w in theta.items()} for i in range(6)]
    dirs, info, coords = pca_directions(theta, kinds, traj, center="mean")
    D = np.stack([np.concatenate([(t[n] - theta[n]).double().reshape(-1).numpy() for n in theta]) for t in traj])
    pca = PCA(n_components=2).fit(D)
    for k, axis in enumerate(("x", "y")):
        got = np.concatenate([dirs[axis][n].double().reshape(-1).numpy() for n in theta])
        assert abs(abs(got @ pca.components_[k]) - 1) < 1e-6
        np.testing.assert_allclose(coords[:, k].numpy(), D @ got, atol=1e-5)
    np.testing.assert_allclose(info["explained_variance_ratio"], pca.explained_variance_ratio_, rtol=1e-6)
    assert info["pca_center"] == "mean"
    # the default, about theta*, is a different plane on this trajectory (it drifts by +3)
    plain = pca_directions(theta, kinds, traj)[0]["x"]
    x = np.concatenate([dirs["x"][n].double().reshape(-1).numpy() for n in theta])
    p0 = np.concatenate([plain[n].double().reshape(-1).numpy() for n in theta])
    assert abs(x @ p0) < 0.99


def tiny_job(workdir, **kw):
    return write_job(workdir / "job.yaml", train={"epochs": 4, "lr": 0.01, "batch_size": 64, "seed": 0},
                     eval={"split": "test", "batch_size": 12, "threads": 1}, **kw)


@pytest.mark.slow
def test_direction_kinds_in_files(workdir):
    job = tiny_job(workdir)
    run(["lldist.surface", job, "--set", "directions.kind=pca", "--out", "pca.h5"], workdir)
    run(["lldist.surface", job, "--set", "directions.kind=hessian", "--set", "directions.batches=2", "--out", "hes.h5"],
        workdir)
    run(["lldist.surface", job, "--set", "directions.kind=file", "--set", "directions.file=hes.h5", "--out", "file.h5"],
        workdir)
    from conftest import model_and_data
    model, data = model_and_data(job, "model.pt")
    theta = {n: p.detach().double() for n, p in model.state_dict().items() if p.is_floating_point()}
    with h5py.File("pca.h5", "r") as f:
        assert f["directions"].attrs["kind"] == "pca"
        t = f["trajectory"][()]
        names = [f"model_epoch{i}.pt" for i in (1, 2, 3, 4)]
        assert f["trajectory"].attrs["checkpoints"] == str(names).replace("'", '"')
        for i, name in enumerate(names):  # each checkpoint's coordinates: a direct dot product
            state = torch.load(name, weights_only=True)["state_dict"]
            for k, axis in enumerate(("x", "y")):
                dot = sum(float(((state[n].double() - theta[n]) * torch.from_numpy(f["directions"][axis][n][()]).double())
                                 .sum()) for n in theta if f["directions"][axis][n][()].any())
                assert t[i, k] == pytest.approx(dot, abs=1e-6)
    with h5py.File("hes.h5", "r") as f:
        lam = [float(v) for v in __import__("json").loads(f["directions"].attrs["hessian_eigenvalues"])]
        x = {n: torch.from_numpy(f["directions"]["x"][n][()]) for n in f["directions"]["x"]}
    assert lam[0] >= lam[1] > 0
    batches = [b for _, b in zip(range(2), data.batches(12))]
    c = Curvature(model, batches, Task())
    vec = torch.cat([x[n].reshape(-1) for n in c.names]).double()
    assert float(vec.norm()) == pytest.approx(1.0, abs=1e-5)
    hv = c.matvec(vec.numpy())
    np.testing.assert_allclose(hv, lam[0] * vec.numpy(), atol=2e-3 * lam[0])  # H x = lambda_max x
    with h5py.File("hes.h5", "r") as a, h5py.File("file.h5", "r") as b:
        assert b["directions"].attrs["kind"] == "file"
        for axis in ("x", "y"):
            for n in a["directions"][axis]:
                np.testing.assert_array_equal(a["directions"][axis][n][()], b["directions"][axis][n][()])
    out = run(["lldist.info", "pca.h5"], workdir).stdout
    assert "explained_variance_ratio" in out
    run(["lldist.plot", "pca.h5", "--dpi", "50"], workdir)
    assert (workdir / "pca_test_trajectory.png").exists()
    import lldist
    np.testing.assert_array_equal(lldist.open(str(workdir / "pca.h5")).trajectory, t)
    from lldist.analysis import figures
    fig = figures.figure_trajectory(figures.read_surface(str(workdir / "pca.h5")), "test", figures.PlotOptions())
    path_line = [ln for ln in fig.axes[0].lines if ln.get_label() == "training trajectory"][0]
    np.testing.assert_allclose(np.column_stack(path_line.get_data()), t)  # the stored coordinates, drawn
    assert fig.axes[0].get_xlabel().startswith("PC1 (")


@pytest.mark.slow
def test_per_cell_curvature_matches_the_full_hessian_at_each_cell(workdir):
    job = tiny_job(workdir, grid={"x": [-1.0, 1.0, 3], "y": [-1.0, 1.0, 2]})
    run(["lldist.surface", job, "--set", "eval.curvature=true", "--set", "eval.curvature_batches=2"], workdir)
    from conftest import model_and_data
    model, data = model_and_data(job, "model.pt")
    batches = [b for _, b in zip(range(2), data.batches(12))]
    with h5py.File("out.h5", "r") as f:
        lmax, lmin, ratio = f["test/lambda_max"][()], f["test/lambda_min"][()], f["test/eig_ratio"][()]
        x, y = f["x"][()], f["y"][()]
        dx = {n: torch.from_numpy(f["directions"]["x"][n][()]) for n in f["directions"]["x"]}
        dy = {n: torch.from_numpy(f["directions"]["y"][n][()]) for n in f["directions"]["y"]}
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    for iy in range(len(y)):
        for ix in range(len(x)):
            params = {n: base[n] + float(x[ix]) * dx[n] + float(y[iy]) * dy[n] for n in base}
            ev = np.linalg.eigvalsh(full_hessian(model, batches, params))
            assert lmax[iy, ix] == pytest.approx(ev[-1], rel=1e-3)
            assert lmin[iy, ix] == pytest.approx(ev[0], rel=1e-2, abs=1e-4)
            assert ratio[iy, ix] == pytest.approx(abs(ev[0] / ev[-1]), rel=1e-2, abs=1e-4)
    # the maps get their own figure, and --compare puts two files' maps on one scale per column
    import shutil

    from lldist.analysis import figures
    run(["lldist.plot", "out.h5", "--dpi", "50"], workdir)
    assert (workdir / "out_test_curvature.png").exists()
    shutil.copyfile(workdir / "out.h5", workdir / "twice.h5")
    with h5py.File(workdir / "twice.h5", "r+") as f:
        f["test/lambda_max"][()] = 2 * lmax
    figs = dict(figures.compare([str(workdir / "out.h5"), str(workdir / "twice.h5")], figures.PlotOptions(dpi=50),
                             str(workdir)))
    fig = figs[str(workdir / "compare_test_curvature.png")]
    meshes = [ax.collections[0] for ax in fig.axes[:6]]  # the panels (colour bars follow): file, then quantity
    assert len(meshes) == 6
    for col in range(3):
        top, bottom = meshes[col].norm, meshes[3 + col].norm
        assert (top.vmin, top.vmax) == (bottom.vmin, bottom.vmax)  # one scale per column
    # the column's scale: the round levels around both files' values (figures' rule), one for both
    lev = figures._levels(np.concatenate([lmax.ravel(), 2 * lmax.ravel()]), figures.PlotOptions(), "lambda_max")
    assert (meshes[0].norm.vmin, meshes[0].norm.vmax) == (lev[0], lev[-1])
    assert lev[0] <= lmax.min() and lev[-1] >= 2 * lmax.max()
    np.testing.assert_allclose(np.ma.getdata(meshes[3].get_array()).reshape(lmax.shape), 2 * lmax)


@pytest.mark.slow
def test_per_cell_curvature_under_mpi_equals_one_process_and_resumes(workdir):
    job = tiny_job(workdir, grid={"x": [-1.0, 1.0, 4], "y": [-1.0, 1.0, 3]})
    curv = ["--set", "eval.curvature=true", "--set", "eval.chunk_size=1"]
    run(["lldist.surface", job, *curv, "--out", "one.h5"], workdir)
    run([mpiexec(), "-n", "3", sys.executable, "-m", "lldist.surface", job, *curv, "--out", "three.h5"], workdir)
    with h5py.File("one.h5", "r") as a, h5py.File("three.h5", "r") as b:
        for q in ("loss", "lambda_max", "lambda_min", "eig_ratio"):
            np.testing.assert_array_equal(a["test"][q][()], b["test"][q][()])
        full = {q: a["test"][q][()] for q in ("lambda_max", "lambda_min")}
    with h5py.File("one.h5", "r+") as f:  # as if killed after five cells
        f["done"][()] = np.arange(12).reshape(3, 4) < 5
        f["nchunks"][()] = 5
    r = run(["lldist.surface", job, *curv, "--out", "one.h5"], workdir)
    assert "7 to compute" in r.stdout
    with h5py.File("one.h5", "r") as f:
        for q, v in full.items():
            np.testing.assert_array_equal(f["test"][q][()], v)


def test_agrees_with_pyhessian():
    """PyHessian (Yao et al.; installed with the tests only) on the same model and batch: its
    power iteration stops at a relative change of 1e-3, its Hutchinson trace at 1e-3 or 100
    samples, so agreement is to those errors."""
    pyhessian = pytest.importorskip("pyhessian")
    m, batches = small_model_and_batches(2)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    ph = pyhessian.hessian(m, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    top, _ = ph.eigenvalues(maxIter=1000, tol=1e-6, top_n=2)
    torch.manual_seed(0)
    their_trace = float(np.mean(ph.trace(maxIter=2000, tol=1e-6)))
    c = Curvature(m, [(x, y)], Task())
    vals, _ = c.eigs(k=2, which="LA", tol=1e-10)
    np.testing.assert_allclose(vals, top, rtol=1e-3)
    ours, err = c.trace(samples=2000, seed=3)
    exact = np.trace(full_hessian(m, [(x, y)]))
    assert abs(ours - exact) < 4 * err and abs(their_trace - exact) < 4 * err * 1.5


def test_spectral_density_is_the_gauss_quadrature_of_the_full_hessian():
    """Stochastic Lanczos quadrature, against the full Hessian: each run's nodes and weights
    integrate v'H^k v / v'v exactly for k < 2 steps (Gauss quadrature), with `steps` = n the
    nodes are the whole spectrum, and the density averaged over runs has the trace's mean."""
    from lldist.analysis.spectrum import smoothed_density
    from lldist.evaluation.curvature import lanczos_quadrature
    m, batches = small_model_and_batches(3)
    H = full_hessian(m, batches)
    ev = np.linalg.eigvalsh(H)
    c = Curvature(m, batches, Task())
    v0 = torch.from_numpy(np.random.default_rng(5).standard_normal(c.n)).float()
    v = v0.double().numpy() / np.linalg.norm(v0.double().numpy())
    steps = 6
    nodes, weights = lanczos_quadrature(c.hvp, v0, steps)
    assert len(nodes) == steps and weights.sum() == pytest.approx(1.0, abs=1e-9)
    Hk_v = v.copy()
    for k in range(2 * steps):
        exact = float(v @ Hk_v)  # v' H^k v
        scale = max(abs(ev).max() ** k, 1e-12)
        assert float((weights * nodes ** k).sum()) == pytest.approx(exact, abs=2e-4 * scale), k
        Hk_v = H @ Hk_v
    # every step: the Krylov space is the whole space, the nodes the eigenvalues (distinct ones;
    # a zero eigenvalue of multiplicity > 1, from the tanh layer's symmetries, appears once)
    nodes, weights = c.density(runs=2, steps=c.n, seed=1)
    for r in range(2):
        found = nodes[r][weights[r] > 1e-8]
        assert found.max() == pytest.approx(ev[-1], rel=1e-4) and found.min() == pytest.approx(ev[0], rel=1e-3, abs=1e-5)
        assert np.all(np.min(np.abs(found[:, None] - ev[None, :]), axis=1) < 1e-3 * abs(ev).max())
    # E[v'Hv/v'v] = tr(H)/n: the first moment, over 200 runs of 3 steps, within 4 standard errors
    nodes, weights = c.density(runs=200, steps=3, seed=2)
    per_run = (nodes * weights).sum(axis=1)
    assert abs(per_run.mean() - np.trace(H) / c.n) < 4 * per_run.std(ddof=1) / np.sqrt(200)
    grid, d = smoothed_density(nodes, weights)
    assert np.trapezoid(d, grid) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.slow
def test_hessian_command_stores_the_density_and_info_prints_it(workdir):
    job = tiny_job(workdir)
    run(["lldist.surface", job, "--set", "grid.x=[-1,1,3]", "--set", "grid.y=[-1,1,3]", "--out", "s.h5"], workdir)
    run(["lldist.hessian", job, "--top", "2", "--batches", "1", "--trace-samples", "8", "--density",
         "--density-runs", "2", "--density-steps", "12", "--out", "s.h5"], workdir)
    with h5py.File("s.h5", "r") as f:
        g = f["curvature"]["test"]
        assert g["density_nodes"].shape == (2, 12) and g["density_weights"][()].sum(axis=1) == pytest.approx([1, 1])
        # the quadrature's largest node is a Ritz value: at most lambda_max, and close to it
        assert g["density_nodes"][()].max() <= g.attrs["lambda_max"] * (1 + 1e-3)
        assert g["density_nodes"][()].max() >= 0.8 * g.attrs["lambda_max"]
    out = run(["lldist.info", "s.h5"], workdir).stdout
    assert "spectral density: 2 runs x 12 Lanczos steps" in out
    import lldist
    ls = lldist.open(str(workdir / "s.h5"))  # the notebook's view of the same numbers
    assert ls.curvature["test"]["density_nodes"].shape == (2, 12) and ls.trajectory is None
    assert ls.curvature["test"]["top_eigenvalues"][0] == pytest.approx(ls.curvature["test"]["lambda_max"])
    out = run(["lldist.plot", "s.h5"], workdir).stdout
    import os
    assert os.path.exists(workdir / "s_test_density.png")
    bad = run(["lldist.hessian", job, "--density-steps", "0", "--out", "s.h5"], workdir, check=False)
    assert bad.returncode == 2 and "--density-steps 0" in bad.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pca", "hessian"])
def test_direction_kinds_under_mpi_equal_one_process_and_resume(workdir, kind):
    """Directions made by rank 0 from checkpoints (pca) or the Hessian (hessian): three ranks
    give the same directions, trajectory and surface as one process, bit for bit, and a run
    cut short resumes to the same arrays."""
    job = tiny_job(workdir, grid={"x": [-1.0, 1.0, 5], "y": [-1.0, 1.0, 4]})
    sets = ["--set", f"directions.kind={kind}", "--set", "directions.batches=2", "--set", "eval.chunk_size=2"]
    run(["lldist.surface", job, *sets, "--out", "one.h5"], workdir)
    run([mpiexec(), "-n", "3", sys.executable, "-m", "lldist.surface", job, *sets, "--out", "three.h5"], workdir)
    with h5py.File("one.h5", "r") as a, h5py.File("three.h5", "r") as b:
        for axis in ("x", "y"):
            for n in a["directions"][axis]:
                np.testing.assert_array_equal(a["directions"][axis][n][()], b["directions"][axis][n][()])
        np.testing.assert_array_equal(a["test/loss"][()], b["test/loss"][()])
        assert ("trajectory" in a) == (kind == "pca")
        if kind == "pca":
            np.testing.assert_array_equal(a["trajectory"][()], b["trajectory"][()])
        full = a["test/loss"][()]
    with h5py.File("three.h5", "r+") as f:  # as if killed after seven cells
        f["done"][()] = np.arange(20).reshape(4, 5) < 7
    r = run([mpiexec(), "-n", "3", sys.executable, "-m", "lldist.surface", job, *sets, "--out", "three.h5"], workdir)
    assert "13 to compute" in r.stdout
    with h5py.File("three.h5", "r") as f:
        np.testing.assert_array_equal(f["test/loss"][()], full)


@pytest.mark.slow
def test_lambda_max_has_the_jackknifes_standard_error_over_batches(workdir):
    """lambda_max's error bar: the top eigenvalue without each batch, against the exact
    Hessian of those batches (numpy.linalg.eigvalsh), and the jackknife formula in numpy."""
    from lldist.config import load_job
    from lldist.evaluation.curvature import first_batches
    from lldist.inputs.loading import Source
    from lldist.runs.hessian import compute
    job = tiny_job(workdir)
    run(["lldist.surface", job, "--set", "grid.x=[-1,1,3]", "--set", "grid.y=null", "--out", "s.h5"], workdir)
    p = run(["lldist.hessian", job, "--top", "1", "--batches", "3", "--trace-samples", "4", "--no-smallest",
             "--tol", "1e-8", "--out", "s.h5"], workdir)
    assert "jackknife over 3 batches" in p.stdout
    with h5py.File("s.h5", "r") as f:
        import json
        g = f["curvature"]["test"].attrs
        each, se = json.loads(g["lambda_max_jackknife"]), float(g["lambda_max_se"])
    cfg = load_job(job)
    loaded = Source().load(cfg)
    chosen = first_batches(loaded.splits["test"], 12, 3)
    exact = [np.linalg.eigvalsh(full_hessian(loaded.model, chosen[:b] + chosen[b + 1:]))[-1] for b in range(3)]
    np.testing.assert_allclose(each, exact, rtol=1e-5)
    v = np.array(exact)
    assert se == pytest.approx(np.sqrt(2 / 3 * np.sum((v - v.mean()) ** 2)), rel=1e-4)
    one_batch = dataclasses.replace(cfg, curvature=dataclasses.replace(cfg.curvature, top=1, trace_samples=0, batches=1,
                                                                        smallest=False))
    assert compute(one_batch, log=lambda m: None).get("lambda_max_se") is None  # one batch
    from lldist.analysis import metrics
    assert metrics.from_file("s.h5")["hessian_lambda_max_se"] == pytest.approx(se)
