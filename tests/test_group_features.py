"""Every feature in rank groups (issue 32 item 4): directions.repeats, adaptive grids, per-cell
curvature maps and eval.bn: recompute, each computed by a real group of MPI ranks (a shard
group builds its model on the meta device and reads its rows) and equal to one process."""

import sys

import h5py
import numpy as np
import pytest
from conftest import mpiexec, run, write_job
from test_groups import mpirun

ADAPTIVE = {"coarse": 4, "tolerance": 0.2, "levels": 10}


def arrays(path):
    with h5py.File(path, "r") as f:
        return {q: f[f"test/{q}"][()] for q in f["test"]}, f["done"][()]


def same_as_one_process(job, workdir, k, mode, *extra, ranks=None):
    """The group's file against one process's: every quantity of every cell, bit for bit
    (NaN where neither computed: an adaptive grid's interpolated cells are not stored)."""
    if not (workdir / "one.h5").exists():
        run(["lldist.surface", job, "--out", "one.h5", *extra], workdir)
    out = f"{mode}{k}.h5"
    p = mpirun(ranks or k, job, workdir, "--out", out, "--set", f"eval.group_size={k}", "--set",
               f"eval.group_mode={mode}", *extra)
    assert ("built on the meta device" in p.stdout) == (mode == "shard"), p.stdout
    (a, da), (b, db) = arrays("one.h5"), arrays(out)
    np.testing.assert_array_equal(da, db)
    assert a.keys() == b.keys()
    for q in a:
        np.testing.assert_array_equal(a[q][da], b[q][db], err_msg=q)
    return p


def mlp(workdir, **kw):
    return write_job(workdir / "job.yaml", model={"name": "mlp", "checkpoint": "model.pt", "args": {"hidden": [32, 16]}},
                     **{"eval": {"batch_size": 40, "chunk_size": 2, "threads": 1}, **kw})


@pytest.mark.parametrize("mode", ["shard", pytest.param("data", marks=pytest.mark.slow)])
def test_repeats_in_groups_equal_one_process(workdir, mode):
    """directions.repeats: 3 planes, each rank of a shard group regenerating its rows of each."""
    job = mlp(workdir, grid={"x": [-1, 1, 4], "y": [-1, 1, 3]},
              directions={"seed": 3, "repeats": 3, "store": "recipe"})
    same_as_one_process(job, workdir, 2, mode)
    with h5py.File("shard2.h5" if mode == "shard" else "data2.h5", "r") as f:
        assert f["test/loss"].shape[0] == 3 and f["done"][()].all()


@pytest.mark.slow
def test_an_adaptive_grid_in_shard_groups_equals_one_process(workdir):
    """Two groups of two: the schedule takes their chunks as they come, and computes the cells
    one process computes, with its values."""
    job = mlp(workdir, grid={"x": [-1.0, 1.0, 21], "y": [-1.0, 1.0, 21], "adaptive": ADAPTIVE},
              directions={"seed": 3, "store": "recipe"}, eval={"batch_size": 40, "chunk_size": 4, "threads": 1})
    same_as_one_process(job, workdir, 2, "shard", ranks=4)
    _, done = arrays("shard2.h5")
    assert 0.05 < done.mean() < 1.0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["shard", "data"])
def test_adaptive_planes_with_a_budget_in_groups_equal_one_process(workdir, mode):
    """Everything at once: two planes (directions.repeats), each refined on its own cells up to
    a budget, in two groups of two: one process's cells and values."""
    ad = {**ADAPTIVE, "tolerance": 0.0, "budget": 150}
    job = mlp(workdir, grid={"x": [-1.0, 1.0, 21], "y": [-1.0, 1.0, 21], "adaptive": ad},
              directions={"seed": 3, "store": "recipe", "repeats": 2},
              eval={"batch_size": 40, "chunk_size": 4, "threads": 1})
    same_as_one_process(job, workdir, 2, mode, ranks=4)
    _, done = arrays(f"{mode}2.h5")
    assert done.shape == (2, 21, 21) and [int(d.sum()) for d in done] == [150, 150]


@pytest.mark.slow
def test_curvature_maps_in_a_data_group_equal_one_process(workdir):
    job = mlp(workdir, grid={"x": [-1, 1, 3], "y": [-1, 1, 2]},
              eval={"batch_size": 40, "chunk_size": 1, "threads": 1, "curvature": True, "curvature_batches": 2})
    same_as_one_process(job, workdir, 2, "data")
    assert "lambda_max" in arrays("data2.h5")[0]


def exact_extremes(job_path, cells, operator="hessian"):
    """λmax and λmin of the exact Hessian (torch.autograd.functional, float64, the whole
    model) of the mean test loss over the first two batches of 40, at each cell's weights θ* +
    x δ + y η with the directions as stored (an independent reference)."""
    import torch
    from conftest import Flat
    from lldist.config import load_job
    from lldist.evaluation.curvature import first_batches
    from lldist.store import SurfaceReader
    f = Flat(load_job(job_path))
    names = f.names
    with SurfaceReader(str(job_path.parent / "one.h5")) as r:
        dirs = r.read_directions()
    theta = torch.cat([f.loaded.theta[n].reshape(-1) for n in names]).double()
    dx, dy = (torch.cat([torch.as_tensor(d[n]).reshape(-1) for n in names]).double() for d in (dirs.x, dirs.y))
    batches = first_batches(f.loaded.splits["test"], 40, 2, torch.float64)

    def loss(flat):
        return f.loss(flat, batches)
    out = []
    for x, y in cells:
        # the cell's weights as the float32 evaluator makes them (θ* + x δ, then + y η, in float32)
        point = (theta.float() + x * dx.float()) + y * dy.float()
        e = np.linalg.eigvalsh(torch.autograd.functional.hessian(loss, point.double()).numpy())
        out.append((e[-1], e[0]))
    return np.array(out)


def test_curvature_maps_in_a_shard_group_equal_the_exact_hessian_and_one_process(workdir):
    """Per-cell λmax and λmin in a shard group of 2 (products: differences of the sharded
    gradient of a float64 copy, Lanczos on sharded vectors): the losses one process's bit for
    bit, the curvature within 1e-3 of λmax of the exact Hessian at each cell and of one
    process's (eigsh at tol 1e-3 in float32)."""
    job = write_job(workdir / "job.yaml", model={"name": "mlp", "checkpoint": "model.pt", "args": {"hidden": [8]}},
              grid={"x": [-1, 1, 3], "y": [-1, 1, 2]},
              eval={"batch_size": 40, "chunk_size": 1, "threads": 1, "curvature": True, "curvature_batches": 2})
    run(["lldist.surface", job, "--out", "one.h5"], workdir)
    p = mpirun(2, job, workdir, "--out", "s.h5", "--set", "eval.group_size=2", "--set", "eval.group_mode=shard")
    assert "built on the meta device in float64" in p.stdout, p.stdout
    (a, da), (b, db) = arrays("one.h5"), arrays("s.h5")
    assert da.all() and db.all() and a.keys() == b.keys()
    for q in set(a) - {"lambda_max", "lambda_min", "eig_ratio"}:  # the loss, the accuracy, ...
        np.testing.assert_array_equal(a[q], b[q], err_msg=q)
    xs, ys = np.linspace(-1, 1, 3), np.linspace(-1, 1, 2)
    cells = [(x, y) for y in ys for x in xs]  # (the file's cells: [y, x])
    ex = exact_extremes(workdir / "job.yaml", cells)
    got = np.stack([b["lambda_max"].reshape(-1), b["lambda_min"].reshape(-1)], 1)
    one = np.stack([a["lambda_max"].reshape(-1), a["lambda_min"].reshape(-1)], 1)
    scale = np.abs(ex[:, 0])[:, None]
    assert np.abs(got - ex).max() / scale.min() < 1e-3, (got, ex)
    assert np.abs(got - one).max() / scale.min() < 2e-3, (got, one)
    np.testing.assert_allclose(b["eig_ratio"].reshape(-1), np.abs(got[:, 1] / got[:, 0]), rtol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["shard", "data"])
def test_bn_recompute_in_groups_equals_one_process(workdir, mode):
    """eval.bn: recompute: every rank of the group takes BatchNorm's statistics on every train
    batch through the (sharded) model: the statistics, and so the cells, are one rank's."""
    job = write_job(workdir / "job.yaml", model={"name": "cnn_skip", "checkpoint": "model.pt",
                                                  "args": {"width": 8, "stages": 2}},
                    data={"name": "digits", "subset": 120}, grid={"x": [-1, 1, 3], "y": [-1, 1, 2]},
                    directions={"seed": 3, "store": "recipe"},
                    eval={"batch_size": 40, "chunk_size": 1, "threads": 1, "bn": "recompute"})
    same_as_one_process(job, workdir, 2, mode)


# ----------------------------------------------------------------------------- python -m lldist.sharpness

SMALL = ["--set", "sharpness.examples=200", "--set", "sharpness.steps=3", "--set", "sharpness.restarts=3",
         "--set", "sharpness.draws=5", "--set", "sharpness.m=25", "--set", "sharpness.pac_tol=0.2"]
COUNTS = ("examples", "batch_size", "num_parameters", "sam_groups", "sam_examples_left_out", "pac_bayes_evaluations",
          "pac_bayes_bracketed")


def sharpness(path):
    with h5py.File(path, "r") as f:
        return dict(f["sharpness/train"].attrs)


def sharpness_same_as_one_process(job, workdir, ranks, k, mode, *extra, **envs):
    """Every measure of a run in groups against one process's. The losses are one rank's bit
    for bit; the ascent's gradients are sums over the members in another order (FSDP2's
    reduce-scatter, or an all-reduce), so the measures agree to float32 round-off: 1e-6 relative
    (bit for bit on the MLP here, 2026-12-07)."""
    import json
    run(["lldist.surface", job, "--progress-every", "0"], workdir, **envs)
    run(["lldist.sharpness", job, *SMALL, *extra], workdir, **envs)
    one = sharpness("out.h5")
    p = run([mpiexec(), "-n", str(ranks), sys.executable, "-m", "lldist.sharpness", job, *SMALL, *extra,
             "--set", f"eval.group_size={k}", "--set", f"eval.group_mode={mode}"], workdir, timeout=600, **envs)
    assert ("built on the meta device" in p.stdout) == (mode == "shard"), p.stdout
    assert f"in {ranks // k} {mode} group(s) of {k}" in p.stdout, p.stdout
    grouped = sharpness("out.h5")
    assert (grouped["ranks"], grouped["group_size"], grouped["group_mode"]) == (ranks, k, mode)
    assert one["loss"] == grouped["loss"]  # a pass of the group's: one rank's sums
    for key, v in one.items():
        if key in ("ranks", "group_size", "group_mode", "seconds", "forward_passes", "split", "settings"):
            continue
        a, b = (json.loads(v), json.loads(grouped[key])) if isinstance(v, str) else (v, grouped[key])
        if key in COUNTS:
            assert a == b, key
        else:
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-9, err_msg=key)
    assert one["worst_2"] > 0 and one["sam"] > 0 and one["pac_bayes_bracketed"]
    return one


@pytest.mark.parametrize("mode", ["shard", pytest.param("data", marks=pytest.mark.slow)])
def test_sharpness_in_groups_equals_one_process(workdir, mode):
    """Two groups of two ranks share the restarts and draws; each group's gradient steps go
    through its (FSDP2-sharded, read by rows) model; 4 batches of 50: two a member."""
    job = write_job(workdir / "job.yaml", model={"name": "mlp", "checkpoint": "model.pt", "args": {"hidden": [32, 16]}},
                    grid={"x": [-1, 1, 3], "y": None}, eval={"batch_size": 50, "threads": 1})
    sharpness_same_as_one_process(job, workdir, 4, 2, mode)


@pytest.mark.slow
def test_sharpness_of_a_tied_gpt2_in_a_shard_group_equals_one_process(workdir):
    """GPT-2 (its output layer tied to its embedding: one parameter, one gradient) from sharded
    safetensors, read by rows, in a shard group of 3 (uneven rows), on the language-model loss."""
    from test_rows import TEXT, seeded_folder
    folder = seeded_folder("tiny_gpt", workdir / "model")
    job = write_job(workdir / "job.yaml", model={"name": f"hf:{folder}", "checkpoint": None}, train=None,
                    data=dict(TEXT, args={"max_length": 24, "label": None}, subset=60),
                    grid={"x": [-1, 1, 3], "y": None}, eval={"batch_size": 25, "threads": 1, "loss": "lm"})
    sharpness_same_as_one_process(job, workdir, 3, 3, "shard", "--set", "sharpness.examples=60", HF_HUB_OFFLINE=1)
