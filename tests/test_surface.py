"""The single-process pipeline end to end: numbers against a plain reference loop, the axis
convention on a non-square grid, interpolation, resume after SIGKILL, refusal of other jobs."""

import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from conftest import chunk_log, env, model_and_data, run, write_job
from conftest import done_after_kill as done_killed

from lldist.config import load_job
from lldist.evaluation.evaluator import evaluate_plain
from lldist.workloads.data import load_split
from lldist.workloads.models import build_model, load_checkpoint


def reference(job_path, h5path):
    """Plain reference: theta = theta* + a*dx + b*dy with the stored directions, load_state_dict, loop."""
    job = load_job(job_path)
    data = load_split(job.data, "test")
    model = build_model(job.model, data.in_shape, data.num_classes)
    load_checkpoint(model, job.model.checkpoint)
    theta = {k: v.clone() for k, v in model.state_dict().items()}
    with h5py.File(h5path, "r") as f:
        x, y = f["x"][()], f["y"][()]
        dx = {k: torch.from_numpy(v[()]) for k, v in f["directions/x"].items()}
        dy = {k: torch.from_numpy(v[()]) for k, v in f["directions/y"].items()}
    loss = np.zeros((len(y), len(x)))
    acc = np.zeros((len(y), len(x)))
    for iy, b in enumerate(y):
        for ix, a in enumerate(x):
            state = {k: (theta[k] + a * dx[k] + b * dy[k]) if k in dx else theta[k] for k in theta}
            loss[iy, ix], acc[iy, ix] = evaluate_plain(model, state, data, batch_size=64)
    return x, y, loss, acc


def test_2d_matches_reference_on_non_square_grid(workdir):
    job = write_job(workdir / "job.yaml")
    p = run(["lldist.surface", job], workdir)
    assert "training it first" in p.stdout
    assert os.path.exists("model_epoch1.pt") and os.path.exists("model_epoch2.pt")
    x, y, loss, acc = reference(job, "out.h5")
    with h5py.File("out.h5", "r") as f:
        assert f["test/loss"].shape == (5, 7)  # (len(y), len(x))
        assert f["done"][()].all()
        np.testing.assert_array_equal(f["x"][()], np.linspace(-1, 1, 7))
        np.testing.assert_array_equal(f["y"][()], np.linspace(-0.5, 0.5, 5))
        # x and y are attached as dimension scales, y on axis 0
        assert f["test/loss"].dims[0][0].name == "/y" and f["test/loss"].dims[1][0].name == "/x"
        np.testing.assert_allclose(f["test/loss"][()], loss, rtol=1e-6)
        np.testing.assert_allclose(f["test/acc"][()], acc, rtol=1e-6)
        # provenance
        a = f.attrs
        assert "name: tiny" in a["job_yaml"] and len(a["job_hash"]) == 64
        assert a["torch_version"] == torch.__version__ and a["complete"]
        assert -1 <= f["directions"].attrs["cosine_xy"] <= 1
        assert "last_finished" in a and "created" in a
    # the minimum of the loss sits near theta* (cell (2, 3) is alpha=0, beta=0)
    assert loss[2, 3] == loss.min()


@pytest.mark.slow
def test_axis_convention_is_row_y_column_x(workdir):
    """With a zero y direction (a 1-cell y axis is not allowed, so use identical rows), every row
    must equal the 1D curve along x: checks that x varies along axis 1."""
    job = write_job(workdir / "job.yaml", grid={"x": [-1.0, 1.0, 6], "y": [0.0, 1.0, 3]})
    run(["lldist.surface", job], workdir)
    job1 = write_job(workdir / "job1.yaml", output="one.h5", grid={"x": [-1.0, 1.0, 6], "y": None})
    run(["lldist.surface", job1], workdir)
    with h5py.File("out.h5", "r") as f, h5py.File("one.h5", "r") as g:
        two, one = f["test/loss"][()], g["test/loss"][()]
        assert g["test/loss"].shape == (6,)
        # the seed draws x first, then y: x directions are the same in both files
        for k in g["directions/x"]:
            np.testing.assert_array_equal(f["directions/x"][k][()], g["directions/x"][k][()])
    np.testing.assert_allclose(two[0], one, rtol=1e-6)  # beta = 0 row is the 1D curve


def test_both_splits_and_1d(workdir):
    job = write_job(workdir / "job.yaml", grid={"x": [-0.5, 1.5, 5], "y": None}, eval={"split": "both", "batch_size": 1000})
    run(["lldist.surface", job], workdir)
    with h5py.File("out.h5", "r") as f:
        assert set(f.keys()) >= {"train", "test", "x", "done", "directions"}
        assert "y" not in f and "y" not in f["directions"]
        assert f["train/loss"].shape == (5,)
        assert (f["train/acc"][()] >= 0).all() and (f["train/acc"][()] <= 1).all()
    run(["lldist.plot", "out.h5", "--format", "svg"], workdir)
    assert os.path.exists("out_curve.svg")


@pytest.mark.slow
def test_interpolation_hits_both_checkpoints(workdir):
    job = write_job(workdir / "job.yaml", directions={"target": "model_epoch1.pt", "seed": 0},
                    grid={"x": [0.0, 1.0, 3], "y": None})
    run(["lldist.train", job], workdir)
    run(["lldist.surface", job], workdir)
    cfg = load_job(job)
    data = load_split(cfg.data, "test")
    res = []
    for ck in ("model.pt", "model_epoch1.pt"):
        m = build_model(cfg.model, data.in_shape, data.num_classes)
        load_checkpoint(m, ck)
        res.append(evaluate_plain(m, m.state_dict(), data))
    with h5py.File("out.h5", "r") as f:
        loss, acc = f["test/loss"][()], f["test/acc"][()]
    assert res[0][0] != res[1][0]
    np.testing.assert_allclose(loss[0], res[0][0], rtol=1e-6)
    np.testing.assert_allclose(loss[-1], res[1][0], rtol=1e-5)
    np.testing.assert_allclose(acc[[0, -1]], [res[0][1], res[1][1]], rtol=1e-6)


@pytest.mark.slow
def test_interpolation_moves_batchnorm_statistics(workdir):
    """BatchNorm running statistics are part of the state: alpha = 1 must be theta' exactly."""
    job = write_job(workdir / "job.yaml", model={"name": "cnn", "checkpoint": "model.pt",
                                                 "args": {"width": 4, "stages": 2}},
                    directions={"target": "model_epoch1.pt"}, grid={"x": [0.0, 1.0, 2], "y": None})
    run(["lldist.train", job], workdir)
    run(["lldist.surface", job], workdir)
    m, data = model_and_data(job, "model_epoch1.pt")
    ref = evaluate_plain(m, m.state_dict(), data)
    with h5py.File("out.h5", "r") as f:
        np.testing.assert_allclose(f["test/loss"][1], ref[0], rtol=1e-5)


def _progress_cells(line):
    # "cells 12/35 (34%) ..."
    return int(line.split()[1].split("/")[0])


def kill_after(cmd, workdir, cells):
    """Start cmd, SIGKILL it once its progress lines reach `cells` (None: at its first line,
    which it prints once the file exists and before the first cell)."""
    p = subprocess.Popen(cmd, cwd=workdir, env=env(), stderr=subprocess.STDOUT, stdout=subprocess.PIPE, text=True)
    for line in p.stdout:
        if cells is None or (line.startswith("cells ") and _progress_cells(line) >= cells):
            p.send_signal(signal.SIGKILL)
            break
    p.wait()
    return p.returncode


def killable_cnn_job(workdir, subset, grid, chunk):
    """A CNN job, its checkpoint, an uninterrupted reference run (full.h5), and the command
    line of a run that reports progress after every chunk."""
    job = write_job(workdir / "job.yaml", model={"name": "cnn", "checkpoint": "model.pt",
                                                 "args": {"width": 8, "stages": 2}},
                    data={"name": "digits", "subset": subset}, grid=grid,
                    eval={"chunk_size": chunk, "batch_size": 4, "threads": 1})  # slow cells: time to kill
    run(["lldist.train", job], workdir)
    run(["lldist.surface", job, "--out", "full.h5"], workdir)
    return job, [sys.executable, "-m", "lldist.surface", job, "--progress-every", "0.001"]


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_arrays(workdir):
    # a run of a few seconds: progress counts committed cells (a commit a second), and the
    # kill must land after one commit and before the end
    job, cmd = killable_cnn_job(workdir, 360, {"x": [-1.0, 1.0, 12], "y": [-1.0, 1.0, 10]}, 2)
    assert kill_after(cmd, workdir, 36) == -signal.SIGKILL
    done_after_kill = done_killed("out.h5")
    assert 36 <= done_after_kill < 120
    q = run(["lldist.surface", job], workdir)
    assert f"{120 - done_after_kill} to compute" in q.stdout
    with h5py.File("out.h5", "r") as f, h5py.File("full.h5", "r") as g:
        np.testing.assert_array_equal(f["test/loss"][()], g["test/loss"][()])
        np.testing.assert_array_equal(f["test/acc"][()], g["test/acc"][()])
        assert f.attrs["runs"] == 2
    records, cells = chunk_log("out.h5")
    assert sorted(cells.tolist()) == list(range(120))  # every cell computed exactly once
    runs = records["run"]
    assert set(runs.tolist()) == {1, 2}
    assert int(records["ncells"][runs == 2].sum()) == 120 - done_after_kill
    # a third run has nothing to do
    r = run(["lldist.surface", job], workdir)
    assert " 0 to compute" in r.stdout


@pytest.mark.slow
def test_other_job_refused_and_overwrite(workdir):
    job = write_job(workdir / "job.yaml", grid={"x": [-1.0, 1.0, 3], "y": None})
    run(["lldist.surface", job], workdir)
    before = open("out.h5", "rb").read()
    p = run(["lldist.surface", job, "--set", "directions.seed=4"], workdir, check=False)
    assert p.returncode == 2 and "different job" in p.stderr and "Traceback" not in p.stderr
    assert open("out.h5", "rb").read() == before
    run(["lldist.surface", job, "--set", "directions.seed=4", "--overwrite"], workdir)
    with h5py.File("out.h5", "r") as f:
        assert "directions.seed=4" in f.attrs["job_yaml"]


@pytest.mark.slow
def test_nan_is_stored_not_recomputed(workdir):
    """A huge step overflows the loss to inf/NaN: stored as is, marked done, plotted as a gap."""
    job = write_job(workdir / "job.yaml", directions={"norm": "none"}, grid={"x": [-1e30, 1e30, 3], "y": None})
    run(["lldist.surface", job], workdir)
    with h5py.File("out.h5", "r") as f:
        loss = f["test/loss"][()]
        assert f["done"][()].all()
    assert not np.isfinite(loss[0]) and np.isfinite(loss[1])
    r = run(["lldist.surface", job], workdir)
    assert " 0 to compute" in r.stdout
    run(["lldist.plot", "out.h5"], workdir)


@pytest.mark.slow
def test_auto_batch_is_calibrated_once_and_reused(workdir):
    job = write_job(workdir / "job.yaml", eval={"batch_size": "auto", "cells_per_pass": "auto", "threads": 1,
                                                "chunk_size": 1},
                    grid={"x": [-1.0, 1.0, 6], "y": None})
    p = run(["lldist.surface", job], workdir)
    with h5py.File("out.h5", "r+") as f:
        batch, group = int(f.attrs["eval_batch_size"]), int(f.attrs["eval_cells_per_pass"])
        assert f"batch {batch}, {group} cell(s)" in p.stdout
        full = f["test/loss"][()]
        f["done"][3:] = False  # as if killed after three cells (chunks of one cell here)
        f["nchunks"][()] = 3
    q = run(["lldist.surface", job], workdir)
    assert "3 to compute" in q.stdout and f"batch {batch}, {group} cell(s)" in q.stdout
    with h5py.File("out.h5", "r+") as f:
        np.testing.assert_array_equal(f["test/loss"][()], full)
        # the stored choice is reused, not calibrated again: a value calibration never picks
        f.attrs.modify("eval_batch_size", np.int64(19))
        f["done"][4:] = False
        f["nchunks"][()] = 4
    q = run(["lldist.surface", job], workdir)
    assert "2 to compute" in q.stdout and "batch 19," in q.stdout
    r = run(["lldist.surface", job, "--set", "eval.batch_size=7", "--out", "b7.h5"], workdir)
    assert "batch 7," in r.stdout  # a number in the job always wins


@pytest.mark.slow
def test_killed_again_and_again_still_exact(workdir):
    """SIGKILL at three different moments (the first at the run's first line: start-up, the
    file made, no cell yet), then a final run: the arrays equal an uninterrupted run's."""
    job, cmd = killable_cnn_job(workdir, 200, {"x": [-1.0, 1.0, 12], "y": [-1.0, 1.0, 10]}, 1)
    for stop_at in (None, 10, 25):
        kill_after(cmd, workdir, stop_at)
    run(["lldist.surface", job], workdir)
    with h5py.File("out.h5", "r") as f, h5py.File("full.h5", "r") as g:
        np.testing.assert_array_equal(f["test/loss"][()], g["test/loss"][()])
        np.testing.assert_array_equal(f["test/acc"][()], g["test/acc"][()])
    assert sorted(chunk_log("out.h5")[1].tolist()) == list(range(120))


@pytest.mark.slow
def test_file_size_is_fixed_after_creation(workdir):
    """Every later write is in place (datasets and run attributes alike): nothing is allocated,
    so no write can leave the file's structure half-changed when killed."""
    job = write_job(workdir / "job.yaml", grid={"x": [-1.0, 1.0, 9], "y": None}, eval={"chunk_size": 2})
    run(["lldist.surface", job], workdir)
    with h5py.File("out.h5", "r+") as f:  # as if no cell had been computed yet
        f["done"][()] = False
        f["nchunks"][()] = 0
    size = os.path.getsize("out.h5")
    run(["lldist.surface", job], workdir)  # computes all 9 cells again
    run(["lldist.surface", job], workdir)  # nothing to do
    assert os.path.getsize("out.h5") == size
    with h5py.File("out.h5", "r") as f:
        assert f.attrs["runs"] == 3 and bool(f.attrs["complete"]) and f["done"][()].all()
