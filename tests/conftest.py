"""Shared helpers: tiny jobs on the bundled digits data, and running the real CLIs."""

import os
import subprocess
import sys

import pytest
import yaml

from lldist.bench.procs import process_tree  # noqa: F401 - the tests' name for it

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
BIN = os.path.dirname(sys.executable)


def env(**extra):
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([ROOT, TESTS, e.get("PYTHONPATH", "")])
    e["PYTHONUNBUFFERED"] = "1"
    e["OMP_NUM_THREADS"] = "1"
    e.pop("LLDIST_MPI", None)
    e.update({k: str(v) for k, v in extra.items()})
    return e


def run(args, cwd, timeout=300, check=True, **extra):
    """Run `python -m ...args` (or a full command if args[0] is a path) and return the result."""
    cmd = list(args) if os.path.isabs(args[0]) else [sys.executable, "-m", *args]
    p = subprocess.run(cmd, cwd=cwd, env=env(**extra), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def mpiexec():
    path = os.path.join(BIN, "mpiexec")
    if not os.path.exists(path):
        pytest.skip("no mpiexec next to the interpreter (pip install mpich)")
    return path


def write_job(path, **sections):
    """A tiny job: small MLP on a subset of digits; `sections` override top-level keys."""
    job = {
        "name": "tiny",
        "output": "out.h5",
        "model": {"name": "mlp", "checkpoint": "model.pt", "args": {"hidden": [16]}},
        "data": {"name": "digits", "subset": 120},
        "train": {"epochs": 2, "lr": 0.01, "batch_size": 64, "seed": 0},
        "directions": {"seed": 3, "norm": "filter", "ignore": "biasbn"},
        "grid": {"x": [-1.0, 1.0, 7], "y": [-0.5, 0.5, 5]},
        "eval": {"split": "test", "batch_size": 50, "threads": 1},
    }
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(job.get(k), dict):
            job[k] = {**job[k], **v}
        else:
            job[k] = v
    with open(path, "w") as f:
        yaml.safe_dump(job, f, sort_keys=False)
    return str(path)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def kill_tree(pid, sig):
    import signal as _s
    import time
    pids = process_tree(pid)
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
    if sig == _s.SIGKILL:  # wait until every process is gone (and its file lock with it)
        deadline = time.time() + 30
        while time.time() < deadline and any(os.path.exists(f"/proc/{p}") and
                                             open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
                                             for p in pids if os.path.exists(f"/proc/{p}")):
            time.sleep(0.05)


def chunk_log(path):
    """(records, cells) of the file's per-chunk work log."""
    from lldist.store import SurfaceReader
    with SurfaceReader(path) as sf:
        return sf.chunk_log()


def model_and_data(job, checkpoint):
    """The job's model with `checkpoint` loaded, and its test split, built the plain way."""
    from lldist.config import load_job
    from lldist.workloads.data import load_split
    from lldist.workloads.models import build_model, load_checkpoint
    cfg = load_job(job)
    data = load_split(cfg.data, "test")
    model = build_model(cfg.model, data.in_shape, data.num_classes)
    load_checkpoint(model, checkpoint)
    return model, data


def cells_at_least(n):
    """A progress line saying that n cells or more are done ("cells 8/60 ...")."""
    return lambda line: line.startswith("cells ") and int(line.split()[1].split("/")[0]) >= n


def surface_until(ranks, job, out, cwd, ready):
    """`mpiexec -n ranks python -m lldist.surface job --out out` with a progress line per step,
    returned still running once a line of its output (stdout and stderr together) passes
    `ready`: the moment a test kills it."""
    p = subprocess.Popen([mpiexec(), "-n", str(ranks), sys.executable, "-m", "lldist.surface", job, "--out", out,
                          "--progress-every", "0.001"], cwd=cwd, env=env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        if ready(line):
            break
    return p


def done_after_kill(path, timeout=10.0):
    """Cells done in a file whose writer was just SIGKILLed. HDF5 locks the file with flock;
    the kernel releases it once the last descriptor of the dead process is closed, which can
    trail the process's disappearance from /proc by a moment, so a refused open is retried."""
    import time

    import h5py
    deadline = time.time() + timeout
    while True:
        try:
            with h5py.File(path, "r") as f:
                return int(f["done"][()].sum())
        except BlockingIOError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


class Flat:
    """A job's model in float64 as a function of one flat parameter vector: the exact references
    (whole Hessians, Jacobians) the curvature tests check against. `checkpoint`: another file of
    the model than the job's."""

    def __init__(self, job, checkpoint=None):
        import dataclasses

        import torch

        from lldist.inputs.loading import Source
        src = Source()
        if checkpoint is not None:
            job = dataclasses.replace(job, model=dataclasses.replace(job.model, checkpoint=checkpoint))
        self.loaded = src.load(job)
        self.task = src.make_task(job)
        self.model = self.loaded.model.double().eval()
        self.names = [n for n, _ in self.model.named_parameters()]
        self.shapes = [p.shape for p in self.model.parameters()]
        self.sizes = [p.numel() for p in self.model.parameters()]
        self.theta = torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])

    def outputs(self, flat, x):
        import torch
        ps = {n: c.view(s) for n, c, s in zip(self.names, torch.split(flat, self.sizes), self.shapes)}
        return torch.func.functional_call(self.model, ps, (x,))

    def loss(self, flat, batches):
        """The mean loss over the batches (Σ summed losses / Σ weights), the evaluation's own."""
        tot = w = 0
        for b in batches:
            s, n = self.task.loss_terms(self.outputs(flat, b[0]), b)
            tot, w = tot + s, w + n
        return tot / w
