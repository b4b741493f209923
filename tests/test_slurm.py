"""slurm/ scripts against a real Slurm: a one-node cluster on localhost (tests/slurm/cluster.sh:
munge, slurmctld, slurmd from Debian's packages, no cgroups), CPU-only ranks.

The jobs launch their ranks with LLDIST_LAUNCH=mpirun (MPICH's hydra inside the allocation).
The script's default, `srun --mpi=pmi2`, works with PyPI's MPICH but hung in MPI_Init in about
one job in four on this test cluster (inside `from mpi4py import MPI`, before any lldist code),
so it is not what the tests rely on (README, "Running on a cluster").

Skipped where Slurm is not installed or the tests do not run as root; .ci/run installs it."""

import os
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from conftest import ROOT, chunk_log, env, run, write_job

CLUSTER = os.path.join(ROOT, "tests", "slurm", "cluster.sh")
CPU = ["--gpus-per-task=0", "--ntasks-per-node=3", "--cpus-per-task=1"]  # the test node has no GPUs

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (shutil.which("slurmctld") and shutil.which("sbatch") and os.geteuid() == 0),
                                reason="needs root and Debian's slurmctld/slurmd/munge (see .ci/run)")]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("slurm"))
    p = subprocess.run([CLUSTER, "start", d], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"the test cluster did not start:\n{p.stdout}\n{p.stderr}"
    yield os.path.join(d, "slurm.conf")
    subprocess.run([CLUSTER, "stop", d], timeout=60)


def senv(conf, **extra):
    return env(SLURM_CONF=conf, LLDIST_ENV=os.path.dirname(os.path.dirname(sys.executable)), LLDIST_LAUNCH="mpirun",
               **extra)


def sbatch(conf, workdir, *args):
    p = subprocess.run(["sbatch", "--parsable", *args], cwd=workdir, env=senv(conf), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def arrays(path):
    with h5py.File(path, "r") as f:
        return f["test/loss"][()], f["test/acc"][()], f["done"][()]


def test_surface_sh_equals_single_process(slurm, workdir):
    job = write_job(workdir / "job.yaml", eval={"chunk_size": 2, "batch_size": 50},
                    model={"name": "python:userfactories:paced", "checkpoint": "model.pt",
                           "args": {"kind": "mlp", "hidden": [16], "seconds": 0.02}})
    run(["lldist.train", job], workdir)
    sbatch(slurm, workdir, "--wait", *CPU, "--time=10", "-o", "slurm.log", os.path.join(ROOT, "slurm", "surface.sh"),
           job, "--out", "slurm.h5")
    log = open(workdir / "slurm.log").read()
    assert "launcher mpirun" in log and "rank 2/3" in log, log
    run(["lldist.surface", job, "--out", "single.h5"], workdir)
    a, b = arrays("slurm.h5"), arrays("single.h5")
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    records, cells = chunk_log("slurm.h5")
    assert sorted(cells.tolist()) == list(range(35)) and set(records["rank"].tolist()) == {0, 1, 2}


def wait_gone(conf, jobid, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        q = subprocess.run(["squeue", "-h", "-j", jobid], env=senv(conf), capture_output=True, text=True)
        if jobid not in q.stdout:
            return
        time.sleep(0.5)
    raise AssertionError(f"job {jobid} still in the queue")


def test_signalled_job_resumes_without_recomputing(slurm, workdir):
    job = write_job(workdir / "job.yaml", train=None,
                    model={"name": "python:lldist.workloads.synthetic:fixed_cost", "checkpoint": None, "args": {"seconds": 0.1}},
                    grid={"x": [-1.0, 1.0, 60], "y": None}, eval={"chunk_size": 2, "batch_size": 1000})
    script = os.path.join(ROOT, "slurm", "surface.sh")
    jobid = sbatch(slurm, workdir, *CPU, "--time=10", "-o", "first.log", script, job, "--progress-every", "0.001")
    deadline = time.time() + 180
    while time.time() < deadline:
        text = open(workdir / "first.log").read() if os.path.exists(workdir / "first.log") else ""
        done = [int(ln.split()[1].split("/")[0]) for ln in text.splitlines() if ln.startswith("cells ")]
        if done and max(done) >= 12:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("no progress in the first job:\n" + text)
    # what --signal=B:TERM@... does before the time limit: SIGTERM to the batch shell (srun)
    subprocess.run(["scancel", "--batch", "--signal=TERM", jobid], env=senv(slurm), check=True)
    wait_gone(slurm, jobid)
    with h5py.File("out.h5", "r") as f:
        first = int(f["done"][()].sum())
    assert 12 <= first < 60, open(workdir / "first.log").read()
    sbatch(slurm, workdir, "--wait", *CPU, "--time=10", "-o", "second.log", script, job)
    assert f"{60 - first} to compute" in open(workdir / "second.log").read()
    records, cells = chunk_log("out.h5")
    assert sorted(cells.tolist()) == list(range(60))  # no cell computed twice
    assert int(records["ncells"][records["run"] == 2].sum()) == 60 - first
    run(["lldist.surface", job, "--out", "single.h5"], workdir)
    np.testing.assert_array_equal(arrays("out.h5")[0], arrays("single.h5")[0])


def test_mobilenet_script_is_accepted(slurm, workdir):
    script = os.path.join(ROOT, "slurm", "mobilenet.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    for s in ("surface.sh", "train.sh", "mobilenet.sh"):
        p = subprocess.run(["sbatch", "--test-only", *CPU, os.path.join(ROOT, "slurm", s), "jobs/quickstart.yaml"],
                           cwd=ROOT, env=senv(slurm), capture_output=True, text=True)
        assert p.returncode == 0 and "to start at" in p.stderr, (s, p.stderr)


def test_srun_without_pmi_is_refused(slurm, workdir):
    """srun --mpi=none: every task comes up as rank 0 of 1. lldist must refuse, not compute 3 grids."""
    job = write_job(workdir / "job.yaml")
    p = subprocess.run(["srun", "--mpi=none", "-n", "3", sys.executable, "-m", "lldist.surface", job],
                       cwd=workdir, env=senv(slurm), capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "MPI sees a world of 1" in p.stderr
    assert not os.path.exists(workdir / "out.h5")
