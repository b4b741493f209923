"""The fast paths on a real CUDA GPU, against the fp32 eager reference loop on the same GPU.

    python -m pytest -m gpu tests/test_gpu.py       # where pytest is installed
    PYTHONPATH=. python -m lldist.bench gpu          # runs these too, with or without pytest

Every test here skips without CUDA. Tolerances (relative, on the loss; accuracy within the
same bound in points): fp32 paths 1e-5 (eager, channels-last, vmapped cells, automatic batch),
compiled fp32 1e-4 (inductor fuses and reorders reductions), tf32 1e-2, bf16 2e-2. The file
is self-contained (no conftest helpers, pytest optional): the device image that runs it has
no pytest, and `lldist.bench gpu` then calls the test functions itself.
"""

import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch

try:
    import pytest
    gpu = pytest.mark.gpu
    needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
except ImportError:  # the device image: lldist.bench gpu runs the functions below itself
    pytest = None

    def gpu(f):
        return f
    needs_cuda = gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COORDS = [(0.0, 0.0), (0.2, -0.1), (-0.4, 0.3), (0.05, 0.6), (-0.3, -0.3)]
TOL = {"fp32": 1e-5, "compiled": 1e-4, "tf32": 1e-2, "bf16": 2e-2}


def _case(name, n):
    from lldist.bench.common import make_case
    return make_case(name, n)


def reference(name, n):
    """The plain loop (load_state_dict per cell, fp32, no TF32) on the GPU: (cells, 2)."""
    from lldist.evaluation.evaluator import evaluate_plain
    model, theta, dirs, data = _case(name, n)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        out = []
        for a, b in COORDS:
            state = {k: theta[k] + a * dirs.x[k] + b * dirs.y[k] for k in theta}
            out.append(evaluate_plain(model, state, data, batch_size=64, device="cuda"))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    return np.array(out)


def fast(name, n, **cfg):
    from lldist.config import EvalConfig
    from lldist.evaluation.evaluator import Evaluator
    model, theta, dirs, data = _case(name, n)
    ev = Evaluator(model, theta, dirs, {"test": data}, EvalConfig(**cfg), device="cuda")
    return ev.evaluate_cells(COORDS)[:, 0, :], ev


def check(got, ref, rtol):
    np.testing.assert_allclose(got[:, 0], ref[:, 0], rtol=rtol)
    assert np.abs(got[:, 1] - ref[:, 1]).max() <= max(rtol, 1e-12) + 1e-12


PATHS = {  # name: (model, evaluator options, tolerance)
    "fp32-eager": ("cnn_skip", {"batch_size": 100}, "fp32"),
    "channels-last": ("mobilenet_v2_32", {"batch_size": 128, "channels_last": True}, "fp32"),
    "batch-auto": ("cnn_skip", {"batch_size": "auto"}, "fp32"),
    "vmap-cells": ("mlp", {"batch_size": 256, "cells_per_pass": 5}, "fp32"),
    "tf32": ("cnn_skip", {"batch_size": 100, "precision": "tf32"}, "tf32"),
    "bf16": ("cnn_skip", {"batch_size": 100, "precision": "bf16"}, "bf16"),
    "bf16-channels-last": ("mobilenet_v2_32", {"batch_size": 128, "precision": "bf16", "channels_last": True}, "bf16"),
}


def _path(key):
    name, cfg, tol = PATHS[key]
    ref = reference(name, 512)
    got, ev = fast(name, 512, **cfg)
    check(got, ref, TOL[tol])
    return ev


@gpu
@needs_cuda
def test_fp32_eager():
    _path("fp32-eager")


@gpu
@needs_cuda
def test_channels_last():
    _path("channels-last")


@gpu
@needs_cuda
def test_batch_auto():
    ev = _path("batch-auto")
    # the choice is the fastest batch the calibration measured, among several it tried
    assert len(ev.batch_rates) >= 3 and ev.batch_size == max(ev.batch_rates, key=ev.batch_rates.get)


@gpu
@needs_cuda
def test_vmapped_cells():
    ev = _path("vmap-cells")
    assert ev.cells_per_pass == 5


@gpu
@needs_cuda
def test_tf32():
    _path("tf32")
    # TF32 is switched on for the evaluation only, not left on for the process
    assert not torch.backends.cuda.matmul.allow_tf32


@gpu
@needs_cuda
def test_bf16():
    _path("bf16")


@gpu
@needs_cuda
def test_bf16_channels_last():
    _path("bf16-channels-last")


def _compiled(mode):
    import torch._dynamo
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ref = reference("mlp", 512)
    got, ev = fast("mlp", 512, batch_size=128, compile=mode)
    check(got, ref, TOL["compiled"])
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    ev.evaluate_cells(COORDS * 4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no recompilation per cell


@gpu
@needs_cuda
def test_compile_default_no_recompilation():
    _compiled(True)


@gpu
@needs_cuda
def test_compile_reduce_overhead_no_recompilation():
    _compiled("reduce-overhead")


def _mpiexec():
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.path.exists(here) else shutil.which("mpirun") or shutil.which("mpiexec")


@gpu
@needs_cuda
def test_two_ranks_on_one_gpu_equal_one_process():
    import h5py
    import yaml
    launcher = _mpiexec()
    if launcher is None:
        if pytest:
            pytest.skip("no mpirun")
        return
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        job = {"name": "gpu2", "output": "one.h5", "model": {"name": "cnn_skip", "args": {"width": 8, "stages": 2}},
               "data": {"name": "digits", "subset": 300}, "grid": {"x": [-1, 1, 6], "y": [-1, 1, 5]},
               "eval": {"device": "cuda", "batch_size": 100, "chunk_size": 2}}
        with open(os.path.join(tmp, "job.yaml"), "w") as f:
            yaml.safe_dump(job, f)
        for cmd in ([sys.executable, "-m", "lldist.surface", "job.yaml"],
                    [launcher, "-n", "2", sys.executable, "-m", "lldist.surface", "job.yaml", "--out", "two.h5"]):
            p = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
            assert p.returncode == 0, p.stdout + p.stderr
        with h5py.File(os.path.join(tmp, "one.h5")) as a, h5py.File(os.path.join(tmp, "two.h5")) as b:
            np.testing.assert_allclose(a["test/loss"][()], b["test/loss"][()], rtol=1e-6)
            np.testing.assert_array_equal(a["test/acc"][()], b["test/acc"][()])
            assert set(b["chunks"][: b["nchunks"][()]]["rank"].tolist()) == {0, 1}
            assert all(d.startswith(b"cuda") for d in b["chunks"][: b["nchunks"][()]]["device"])
