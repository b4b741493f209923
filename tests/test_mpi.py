"""The distributed surface under the real launcher (MPICH's mpiexec from PyPI, 3 ranks on 2
cores): bitwise equality with one process, SIGKILL and resume, an injected failure, small and
ragged grids."""

import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import chunk_log, done_after_kill, env, kill_tree, mpiexec, run, write_job

# the CNN, paced (10 ms more a batch when evaluating): every rank is up before the cells run out
CNN = {"name": "python:userfactories:paced", "checkpoint": "model.pt",
       "args": {"kind": "cnn", "width": 8, "stages": 2, "seconds": 0.01}}


def mpirun(n, job, workdir, *extra, check=True, **envs):
    return run([mpiexec(), "-n", str(n), sys.executable, "-m", "lldist.surface", job, *extra],
               workdir, check=check, **envs)


def arrays(path):
    with h5py.File(path, "r") as f:
        out = {k: f[k][()] for k in ("test/loss", "test/acc", "done")}
    records, out["chunk_cells"] = chunk_log(path)
    return out, records


def assert_same(a, b):
    for k in ("test/loss", "test/acc"):
        np.testing.assert_array_equal(a[k], b[k])


@pytest.fixture
def cnn_job(workdir):
    job = write_job(workdir / "job.yaml", model=CNN, data={"name": "digits", "subset": 200},
                    eval={"chunk_size": 3, "batch_size": 64})
    run(["lldist.train", job], workdir)
    run(["lldist.surface", job, "--out", "single.h5"], workdir)
    return job


@pytest.mark.slow
def test_ranks_bitwise_equal_to_one_process(cnn_job, workdir):
    for ranks, chunk in [(1, 2), (3, 1), (3, 4), (2, 3)]:  # one trained model for all four
        check_ranks_equal_one_process(cnn_job, workdir, ranks, chunk)


def check_ranks_equal_one_process(cnn_job, workdir, ranks, chunk):
    out = f"mpi_{ranks}_{chunk}.h5"
    p = mpirun(ranks, cnn_job, workdir, "--out", out, "--set", f"eval.chunk_size={chunk}")
    for r in range(ranks):
        assert f"rank {r}/{ranks} on" in p.stdout
    single, _ = arrays("single.h5")
    multi, chunks = arrays(out)
    assert_same(single, multi)
    assert multi["done"].all()
    assert sorted(multi["chunk_cells"].tolist()) == list(range(35))  # each cell exactly once
    assert set(chunks["rank"].tolist()) == set(range(ranks))  # every rank did work
    assert (chunks["ncells"] <= chunk).all() and (chunks["t_end"] >= chunks["t_start"]).all()
    # each rank's share, as `python -m lldist.info` reports it from the work log
    from lldist.info import rank_shares
    shares = rank_shares(chunks)
    assert sum(r["cells"] for r in shares) == 35 and {r["rank"] for r in shares} == set(range(ranks))
    assert all(0 < r["busy_fraction"] <= 1.0 + 1e-9 for r in shares)
    info = run(["lldist.info", out], workdir).stdout
    assert "35/35 cells done" in info and len([ln for ln in info.splitlines() if " cpu " in ln]) == ranks


@pytest.mark.slow
def test_grid_smaller_than_ranks_and_ragged_chunks(workdir):
    job = write_job(workdir / "job.yaml", grid={"x": [-1, 1, 2], "y": None}, eval={"chunk_size": 5})
    run(["lldist.train", job], workdir)
    run(["lldist.surface", job, "--out", "single.h5"], workdir)
    mpirun(4, job, workdir, "--out", "mpi.h5")
    assert_same(arrays("single.h5")[0], arrays("mpi.h5")[0])
    mpirun(3, job, workdir, "--out", "mpi2.h5", "--set", "grid.x=[-1,1,11]", "--set", "eval.chunk_size=4")
    run(["lldist.surface", job, "--out", "single2.h5", "--set", "grid.x=[-1,1,11]"], workdir)
    a, ch = arrays("mpi2.h5")
    assert_same(arrays("single2.h5")[0], a)
    assert sorted(ch["ncells"].tolist()) == [3, 4, 4]


@pytest.mark.slow
def test_sigkill_whole_run_then_resume(workdir):
    # A model of fixed cost per cell (it sleeps 10 ms a batch, 4 batches a cell), so that the
    # run lasts about two seconds on any machine: the first commit (after a second) lands well
    # before the end, and the kill after it.
    job = write_job(workdir / "job.yaml", train=None,
                    model={"name": "python:lldist.workloads.synthetic:fixed_cost", "checkpoint": None, "args": {"seconds": 0.01}},
                    data={"name": "digits", "subset": 200}, grid={"x": [-1.0, 1.0, 15], "y": [-1.0, 1.0, 10]},
                    eval={"chunk_size": 1, "batch_size": 50})
    n = 150
    cmd = [mpiexec(), "-n", "3", sys.executable, "-m", "lldist.surface", job, "--progress-every", "0.001"]
    p = subprocess.Popen(cmd, cwd=workdir, env=env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         text=True)
    killed_at = None
    for line in p.stderr:
        if line.startswith("cells ") and int(line.split()[1].split("/")[0]) >= 12:
            killed_at = line
            kill_tree(p.pid, signal.SIGKILL)  # every rank and the launcher, at once
            break
    p.wait()
    assert killed_at, "the run finished before it could be killed"
    done = done_after_kill("out.h5")
    assert 12 <= done < n
    q = mpirun(3, job, workdir)
    assert f"{n - done} to compute" in q.stdout
    final, chunks = arrays("out.h5")
    run(["lldist.surface", job, "--out", "single.h5"], workdir)
    assert_same(arrays("single.h5")[0], final)
    assert sorted(final["chunk_cells"].tolist()) == list(range(n))
    assert set(chunks["run"].tolist()) == {1, 2}


@pytest.mark.slow
def test_failure_on_one_rank_aborts_cleanly_and_resumes(workdir):
    job = write_job(workdir / "job.yaml", train=None,
                    model={"name": "python:userfactories:faulty", "checkpoint": None,
                           "args": {"after": 4, "pause": 0.02}},  # rank 0 cannot do it all alone
                    eval={"chunk_size": 2, "batch_size": 1000})
    p = mpirun(3, job, workdir, check=False, LLDIST_TEST_FAIL_RANK=1)
    assert p.returncode != 0
    first = [ln for ln in p.stderr.splitlines() if ln.startswith("lldist: error:")]
    assert len(first) == 1, p.stderr
    assert "rank 1" in first[0] and "chunk" in first[0] and "injected failure" in first[0]
    assert "resume" in p.stderr
    with h5py.File("out.h5", "r") as f:
        done = int(f["done"][()].sum())
    # rank 1 finished 4 cells (2 chunks of 2) before its 5th forward pass failed
    assert chunk_log("out.h5")[0]["rank"].tolist().count(1) <= 2
    assert done < 35
    mpirun(3, job, workdir)  # same job, no failure this time: finishes
    with h5py.File("out.h5", "r") as f:
        assert f["done"][()].all()
    assert sorted(chunk_log("out.h5")[1].tolist()) == list(range(35))
    run(["lldist.surface", job, "--out", "single.h5"], workdir)
    assert_same(arrays("single.h5")[0], arrays("out.h5")[0])


def test_singleton_trap_is_refused(workdir):
    """A launcher that says 3 processes while MPI sees a world of 1 must not compute 3 grids."""
    job = write_job(workdir / "job.yaml")
    p = run(["lldist.surface", job], workdir, check=False, PMI_SIZE=3, PMI_RANK=0)
    assert p.returncode == 2 and "MPI sees a world of 1" in p.stderr and not os.path.exists("out.h5")
