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


def replay(full_loss):
    sys.path.insert(0, str(Path(__file__).parent.parent / "tools"))
    from adaptive_study import replay as rp
    return rp(full_loss, ADAPTIVE["coarse"], ADAPTIVE["tolerance"], ADAPTIVE["levels"])


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
    assert f"{100 * done.mean():.1f}% of the cells computed" in info and "complete=True" in info
    run(["lldist.plot", "ad.h5"], workdir)
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
def test_adaptive_run_killed_then_resumed_gives_the_same_cells_and_values(workdir):
    """A slow model (fixed cost per cell) so the kill lands mid-refinement."""
    job = write_job(workdir / "job.yaml", train=None,
                    model={"name": "python:lldist.workloads.synthetic:fixed_cost", "checkpoint": None, "args": {"seconds": 0.01}},
                    grid={"x": [-2.0, 2.0, 41], "y": [-2.0, 2.0, 41], "adaptive": ADAPTIVE},
                    directions={"norm": "none"}, eval={"chunk_size": 8, "batch_size": 120})
    run(["lldist.surface", job, "--out", "whole.h5"], workdir)
    whole = read("whole.h5")
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
