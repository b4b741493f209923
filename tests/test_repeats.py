"""directions.repeats (issue 22): n independent planes in one file. Each plane is bit for bit
the single run with seed + k, over one process and three MPI ranks; a killed run resumes to
the same numbers; the metrics are each plane's, then their mean and standard error."""

import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import done_after_kill, env, kill_tree, mpiexec, run, write_job

from lldist.analysis import metrics
from lldist.store import SurfaceReader

QUANTITIES = ("loss", "acc", "loss_se")


def arrays(path):
    with h5py.File(path, "r") as f:
        return {q: f["test"][q][()] for q in QUANTITIES}, f["done"][()]


@pytest.mark.slow
def test_each_plane_is_the_single_run_with_its_seed(workdir):
    job = write_job(workdir / "job.yaml", grid={"x": [-1.0, 1.0, 5], "y": [-0.5, 0.5, 3]})
    run(["lldist.surface", job, "--set", "directions.seed=4", "--set", "directions.repeats=3", "--out", "rep.h5"],
        workdir)
    run([mpiexec(), "-n", "3", sys.executable, "-m", "lldist.surface", job, "--set", "directions.seed=4",
         "--set", "directions.repeats=3", "--out", "rep3.h5"], workdir)
    rep, done = arrays("rep.h5")
    rep3, _ = arrays("rep3.h5")
    assert done.shape == (3, 3, 5) and done.all()
    with SurfaceReader("rep.h5") as sf:
        d = sf.read_directions()
        planes = [d] + d.planes
        assert sf.planes == 3
    for k in range(3):
        run(["lldist.surface", job, "--set", f"directions.seed={4 + k}", "--out", f"s{k}.h5"], workdir)
        one, _ = arrays(f"s{k}.h5")
        for q in QUANTITIES:
            np.testing.assert_array_equal(rep[q][k], one[q])  # bit for bit
            np.testing.assert_array_equal(rep3[q][k], one[q])
        with SurfaceReader(f"s{k}.h5") as sf:
            single = sf.read_directions()
        for axis in ("x", "y"):
            for name, t in getattr(single, axis).items():
                np.testing.assert_array_equal(getattr(planes[k], axis)[name], t)
    assert not np.array_equal(rep["loss"][0], rep["loss"][1])  # the planes differ
    with h5py.File("rep.h5", "r") as f:
        assert f["test/loss"].dims[0].label == "plane" and f["test/loss"].dims[1].label == "y"
        assert list(f["plane"][()]) == [0, 1, 2] and f["planes/2/x"] is not None
    import lldist
    ls = lldist.open("rep.h5")
    assert ls.planes == 3 and ls.plane_seeds == [4, 5, 6] and ls.loss.shape == (3, 3, 5)


def test_metrics_over_planes_are_each_planes_then_their_mean_and_standard_error(workdir):
    job = write_job(workdir / "job.yaml", grid={"x": [-1.0, 1.0, 7], "y": [-1.0, 1.0, 5]},
                    directions={"seed": 1, "repeats": 3})
    run(["lldist.surface", job], workdir)
    with h5py.File("out.h5", "r") as f:
        loss, acc, x, y = f["test/loss"][()], f["test/acc"][()], f["x"][()], f["y"][()]
    each = [metrics.compute(loss[k], acc[k], x, y)[0] for k in range(3)]
    m = metrics.from_file("out.h5")
    assert m["planes"] == 3
    for key in ("mean_rise_r0.5", "roughness", "curvature_x", "basin_eps0.5"):
        v = np.array([e[key] for e in each])
        assert np.isclose(m[key], v.mean()) and np.isclose(m[f"{key}_planes_se"], v.std(ddof=1) / np.sqrt(3))
    text = metrics.table([m], ["out.h5"])
    assert f"{m['roughness']:.4g} ± {m['roughness_planes_se']:.2g}" in text
    p = run(["lldist.plot", "out.h5"], workdir)
    assert "out_test_loss_planes.png" in " ".join(p.stdout.split()) or (workdir / "out_test_loss_planes.png").exists()


def test_a_1d_file_of_planes_draws_each_plane_and_their_range(workdir):
    job = write_job(workdir / "job.yaml", grid={"x": [-1.0, 1.0, 5], "y": None}, directions={"repeats": 4})
    run(["lldist.surface", job], workdir)
    from lldist.analysis import figures
    s = figures.read_surface("out.h5")
    fig = figures.figure_1d(s, figures.PlotOptions())
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 1 + 4 + 1  # the mean, each plane, theta*'s line
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    each = s.plane_values[("test", "loss")]
    assert np.isclose(band.max(), each.max()) and np.isclose(band.min(), each.min())


def test_repeats_that_cannot_be_are_refused_in_one_line(workdir):
    job = write_job(workdir / "job.yaml", grid={"x": [-1.0, 1.0, 3], "y": None})
    for bad, says in ((["--set", "directions.repeats=0"], "at least 1"),
                      (["--set", "directions.repeats=2", "--set", "directions.kind=pca"], "directions.kind: random")):
        p = run(["lldist.surface", job, *bad], workdir, check=False)
        assert p.returncode == 2 and says in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.slow
def test_repeats_killed_and_resumed_are_bitwise_the_uninterrupted_run(workdir):
    # a model of fixed cost per cell (10 ms a batch, 4 batches a cell): the kill lands mid-run
    job = write_job(workdir / "job.yaml", train=None,
                    model={"name": "python:lldist.workloads.synthetic:fixed_cost", "checkpoint": None,
                           "args": {"seconds": 0.01}},
                    data={"name": "digits", "subset": 200}, grid={"x": [-1.0, 1.0, 8], "y": [-1.0, 1.0, 5]},
                    directions={"repeats": 3}, eval={"chunk_size": 1, "batch_size": 50})
    n = 120
    cmd = [mpiexec(), "-n", "3", sys.executable, "-m", "lldist.surface", job, "--progress-every", "0.001"]
    p = subprocess.Popen(cmd, cwd=workdir, env=env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    killed = False
    for line in p.stderr:
        if line.startswith("cells ") and int(line.split()[1].split("/")[0]) >= 50:  # into the second plane
            kill_tree(p.pid, signal.SIGKILL)
            killed = True
            break
    p.wait()
    assert killed, "the run finished before it could be killed"
    done = done_after_kill("out.h5")
    assert 50 <= done < n
    q = run(cmd[:-2], workdir)
    assert f"{n - done} to compute" in q.stdout
    run(["lldist.surface", job, "--out", "whole.h5"], workdir)
    resumed, d1 = arrays("out.h5")
    whole, d2 = arrays("whole.h5")
    assert d1.all() and d2.all()
    for q in QUANTITIES:
        np.testing.assert_array_equal(resumed[q], whole[q])
