"""SIGTERM (a Slurm time limit, a preemption) stops a run cleanly; the same command resumes."""

import glob
import os
import signal
import subprocess
import sys

import h5py
import pytest
from conftest import ROOT, chunk_log, env, mpiexec, run, write_job

from lldist.config import load_job


def slow_job(workdir, cells=80, seconds=0.03):
    """A run of a few seconds: finished chunks are committed (and counted in the progress
    lines) once a second, so a signal must be able to land after the first commit."""
    return write_job(workdir / "job.yaml", train=None,
                     model={"name": "python:lldist.workloads.synthetic:fixed_cost", "checkpoint": None, "args": {"seconds": seconds}},
                     grid={"x": [-1.0, 1.0, cells], "y": None}, eval={"chunk_size": 2, "batch_size": 1000})


def start_and_signal(cmd, workdir, after_cells, sig=signal.SIGTERM):
    p = subprocess.Popen(cmd, cwd=workdir, env=env(), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    seen = []
    for line in p.stderr:
        seen.append(line)
        if line.startswith("cells ") and int(line.split()[1].split("/")[0]) >= after_cells:
            p.send_signal(sig)
            break
    rest = p.stderr.read()
    p.wait(timeout=60)
    return p.returncode, "".join(seen) + rest


@pytest.mark.slow
def test_sigterm_single_process_flushes_and_resumes(workdir):
    job = slow_job(workdir)
    code, err = start_and_signal([sys.executable, "-m", "lldist.surface", job, "--progress-every", "0.001"], workdir, 6)
    assert code == 143, err
    assert "stopped by signal 15" in err and "run the same command to resume" in err
    with h5py.File("out.h5", "r") as f:
        done = int(f["done"][()].sum())
        assert not f.attrs["complete"]
    assert 6 <= done < 80
    p = run(["lldist.surface", job], workdir)
    assert f"{80 - done} to compute" in p.stdout
    records, cells = chunk_log("out.h5")
    assert sorted(cells.tolist()) == list(range(80))


@pytest.mark.slow
def test_sigterm_to_the_launcher_then_resume(workdir):
    job = slow_job(workdir, cells=150, seconds=0.05)  # about 2.5 s over three ranks
    cmd = [mpiexec(), "-n", "3", sys.executable, "-m", "lldist.surface", job, "--progress-every", "0.001"]
    code, err = start_and_signal(cmd, workdir, 8)
    assert code != 0
    with h5py.File("out.h5", "r") as f:
        done = int(f["done"][()].sum())
    assert 8 <= done < 150
    run([mpiexec(), "-n", "3", sys.executable, "-m", "lldist.surface", job], workdir)
    records, cells = chunk_log("out.h5")
    assert sorted(cells.tolist()) == list(range(150))  # nothing computed twice


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "jobs", "*.yaml"))))
def test_shipped_jobs_are_valid(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    if os.path.basename(path).startswith("study_"):
        from lldist.inputs.study_file import load_study
        study = load_study(path)
        variants = study.variants
        assert len(variants) in (6, 30) and len({v.job.output for v in variants}) == len(variants)
        return
    job = load_job(path)
    assert job.name and job.output.endswith(".h5")
