"""Adaptive grids end to end: real runs, real ranks, real kills."""

import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import done_after_kill, env, mpiexec, run, write_job

# loose, so that the small grids of a test compute only part of their cells (the shipped
# defaults are for 101 x 101 and up: docs/ADAPTIVE.md)
ADAPTIVE = {"coarse": 4, "tolerance": 0.2, "levels": 10}


def read(path):
    with h5py.File(path, "r") as f:
        return f["done"][()], f["test/loss"][()], f["test/acc"][()], bool(f.attrs["complete"])


def replay(full_loss, budget=None):
    sys.path.insert(0, str(Path(__file__).parent.parent / "tools"))
    from adaptive_study import replay as rp
    return rp(full_loss, ADAPTIVE["tolerance"], ADAPTIVE["levels"], ADAPTIVE["coarse"], budget)


@pytest.mark.slow
def test_adaptive_run_computes_what_the_schedule_asks_and_equals_the_full_grid_there(workdir):
    job = write_job(workdir / "job.yaml", grid={"x": [-1.0, 1.0, 33], "y": [-1.0, 1.0, 29]},
                    eval={"chunk_size": 16})
    run(["lldist.surface", job, "--out", "full.h5"], workdir)
    p = run(["lldist.surface", job, "--out", "ad.h5", "--set", f"grid.adaptive={ADAPTIVE}"], workdir)
    assert "adaptive:" in p.stdout
    done, loss, acc, complete = read("ad.h5")
    fdone, floss, facc, _ = read("full.h5")
    assert complete and fdone.all() and 0.05 < done.mean() < 1.0
    # exactly the cells the schedule picks from the full surface, with the full run's values
    np.testing.assert_array_equal(done, replay(floss))
    np.testing.assert_array_equal(loss[done], floss[done])
    np.testing.assert_array_equal(acc[done], facc[done])
    # read back: every cell has a value, computed ones as they are, the rest marked interpolated
    import lldist
    ls = lldist.open("ad.h5")
    z = ls["test/loss"]
    assert np.isfinite(z).all() and np.array_equal(z[done], floss[done])
    assert np.array_equal(ls.interpolated, ~done) and ls.fraction_done == done.mean()
    assert np.max(np.abs(z - floss) / floss) < 0.1  # interpolation is close, not exact
    assert lldist.open("full.h5").interpolated is None
    from lldist.store import SurfaceReader
    with SurfaceReader("ad.h5") as sf:
        assert np.isnan(sf.read_all(reconstruct=False).values[("test", "loss")][~done]).all()
    info = run(["lldist.info", "ad.h5"], workdir).stdout
    assert f"{done.sum()} cells computed ({100 * done.mean():.1f}%)" in info and "complete=True" in info
    assert "estimated error" in info
    p = run(["lldist.plot", "ad.h5"], workdir)
    assert f"{done.sum()} of {done.size} cells computed; estimated interpolation error" in p.stdout
    # a second run has nothing to do
    q = run(["lldist.surface", job, "--out", "ad.h5", "--set", f"grid.adaptive={ADAPTIVE}"], workdir)
    assert "0 cells in" in q.stdout
    assert np.array_equal(read("ad.h5")[0], done)


@pytest.mark.slow
def test_adaptive_under_mpi_equals_one_process(workdir):
    job = write_job(workdir / "job.yaml", grid={"x": [-1.0, 1.0, 25], "y": [-1.0, 1.0, 25], "adaptive": ADAPTIVE},
                    eval={"chunk_size": 4}, model={"name": "python:userfactories:paced", "checkpoint": "model.pt",
                                                   "args": {"kind": "mlp", "hidden": [16], "seconds": 0.01}})
    run(["lldist.surface", job, "--out", "one.h5"], workdir)
    run([mpiexec(), "-n", "3", sys.executable, "-m", "lldist.surface", job, "--out", "three.h5"], workdir)
    a, b = read("one.h5"), read("three.h5")
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1][a[0]], b[1][b[0]])
    np.testing.assert_array_equal(a[2][a[0]], b[2][b[0]])
    with h5py.File("three.h5", "r") as f:
        ranks = set(f["chunks"][: f["nchunks"][()]]["rank"].tolist())
    assert ranks == {0, 1, 2}


@pytest.mark.slow
@pytest.mark.parametrize("budget", [None, 300])
def test_adaptive_run_killed_then_resumed_gives_the_same_cells_and_values(workdir, budget):
    """A slow model (fixed cost per cell) so the kill lands mid-refinement; with a budget, the
    resumed file is the uninterrupted run's, and the budget's cells are a replay's."""
    ad = {**ADAPTIVE, "tolerance": 0.0 if budget else 0.001, "budget": budget}  # this smooth surface needs little
    job = write_job(workdir / "job.yaml", train=None,
                    model={"name": "python:lldist.workloads.synthetic:fixed_cost", "checkpoint": None, "args": {"seconds": 0.01}},
                    grid={"x": [-2.0, 2.0, 41], "y": [-2.0, 2.0, 41], "adaptive": ad},
                    directions={"norm": "none"}, eval={"chunk_size": 8, "batch_size": 120})
    run(["lldist.surface", job, "--out", "whole.h5"], workdir)
    whole = read("whole.h5")
    if budget:
        assert whole[0].sum() == budget
    cmd = [sys.executable, "-m", "lldist.surface", job, "--progress-every", "0.001"]
    p = subprocess.Popen(cmd, cwd=workdir, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lattice = 11 * 11
    for line in p.stdout:
        if line.startswith("cells ") and int(line.split()[1].split("/")[0]) > lattice:
            p.send_signal(signal.SIGKILL)
            break
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    n = done_after_kill("out.h5")
    assert lattice < n < whole[0].sum()
    run(["lldist.surface", job], workdir)
    done, loss, acc, complete = read("out.h5")
    assert complete
    np.testing.assert_array_equal(done, whole[0])
    np.testing.assert_array_equal(loss[done], whole[1][done])
    np.testing.assert_array_equal(acc[done], whole[2][done])


@pytest.mark.slow
def test_adaptive_planes_are_each_the_single_run_with_its_seed(workdir):
    """directions.repeats with an adaptive grid: each plane refined on its own cells, from its own
    loss, exactly as the single run of its seed; on three ranks too."""
    job = write_job(workdir / "job.yaml", grid={"x": [-1.0, 1.0, 25], "y": [-1.0, 1.0, 21], "adaptive": ADAPTIVE},
                    eval={"chunk_size": 8})
    run(["lldist.surface", job, "--set", "directions.seed=4", "--set", "directions.repeats=2", "--out", "rep.h5"],
        workdir)
    run([mpiexec(), "-n", "3", sys.executable, "-m", "lldist.surface", job, "--set", "directions.seed=4",
         "--set", "directions.repeats=2", "--out", "rep3.h5"], workdir)
    rep, rep3 = read("rep.h5"), read("rep3.h5")
    for a, b in zip(rep, rep3):
        np.testing.assert_array_equal(np.where(rep[0], a, 0), np.where(rep3[0], b, 0))
    for k in range(2):
        run(["lldist.surface", job, "--set", f"directions.seed={4 + k}", "--out", f"s{k}.h5"], workdir)
        done, loss, acc, complete = read(f"s{k}.h5")
        assert complete and 0 < done.mean() < 1
        np.testing.assert_array_equal(rep[0][k], done)
        np.testing.assert_array_equal(rep[1][k][done], loss[done])
        np.testing.assert_array_equal(rep[2][k][done], acc[done])
    import lldist
    ls = lldist.open("rep.h5")
    assert np.isfinite(ls["test/loss"]).all() and ls["test/loss"].shape == (2, 21, 25)


@pytest.mark.slow
def test_adaptive_curvature_maps_are_taken_on_the_cells_the_loss_refines(workdir):
    """eval.curvature with an adaptive grid: the loss decides, and lambda_max/lambda_min at the
    computed cells equal the full grid's there."""
    job = write_job(workdir / "job.yaml", grid={"x": [-1.0, 1.0, 17], "y": [-1.0, 1.0, 17]},
                    model={"name": "mlp", "checkpoint": "model.pt", "args": {"hidden": [8]}},
                    eval={"chunk_size": 8, "curvature": True, "batch_size": 256})
    run(["lldist.surface", job, "--out", "full.h5"], workdir)
    run(["lldist.surface", job, "--out", "ad.h5", "--set", f"grid.adaptive={ADAPTIVE}"], workdir)
    with h5py.File("full.h5", "r") as f, h5py.File("ad.h5", "r") as a:
        done = a["done"][()]
        assert 0 < done.mean() < 1
        np.testing.assert_array_equal(done, replay(f["test/loss"][()]))
        names = [q for q in a["test"] if q.startswith("lambda")]
        assert names
        for q in names + ["loss"]:
            np.testing.assert_array_equal(a["test"][q][()][done], f["test"][q][()][done])


@pytest.mark.parametrize("bad,says", [
    ({"budget": 0}, "between 1 and the grid's 1,089 cells"),
    ({"budget": 5000}, "between 1 and the grid's 1,089 cells"),
    ({"budget": 1.5}, "strictly between 0 and 1"),
    ({"budget": 20}, "do not cover the coarse lattice's 81"),
    ({"tolerance": 0}, "0 only with a budget"),
    ({"coarse": 1}, "at least 2 or 'auto'"),
])
def test_bad_adaptive_settings_are_refused_in_one_line(workdir, capsys, bad, says):
    from lldist import surface
    from lldist.errors import run_cli
    job = write_job(workdir / "job.yaml", grid={"x": [-1.0, 1.0, 33], "y": [-1.0, 1.0, 33]})
    code = run_cli(surface.main, [job, "--set", f"grid.adaptive={ {**ADAPTIVE, **bad} }"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and says in err[0], err
    assert not list(Path(workdir).glob("*.h5")) and not Path(workdir / "model.pt").exists()


def test_a_one_dimensional_adaptive_grid_with_a_budget(workdir):
    """1D grids refine intervals as 2D grids refine boxes; a budget caps them the same way."""
    job = write_job(workdir / "job.yaml", grid={"x": [-1.0, 1.0, 129], "y": None,
                                                "adaptive": {"tolerance": 0.0, "budget": 50}})
    run(["lldist.surface", job, "--out", "line.h5"], workdir)
    with h5py.File("line.h5", "r") as f:
        assert f["done"][()].sum() == 50 and bool(f.attrs["complete"])
