"""Permutation alignment (issue 23, part 4): weight matching undoes a known permutation, the
aligned model computes the same function on real inputs, and it lowers the barrier between two
independently trained MLPs."""

import h5py
import numpy as np
import pytest
import torch
from conftest import run, write_job

from lldist.analysis import metrics
from lldist.config import DataConfig, ModelConfig
from lldist.directions.align import permutation_spec, permute, weight_matching
from lldist.workloads.data import load_split
from lldist.workloads.models import build_model

MODELS = [("mlp", {"hidden": [16, 12]}), ("cnn", {"width": 4, "stages": 2, "blocks": 2}),
          ("cnn_skip", {"width": 4, "stages": 2, "blocks": 2})]


def model(name, args, seed):
    m = build_model(ModelConfig(name=name, args=args, seed=seed), (1, 8, 8), 10).eval()
    with torch.no_grad():  # BatchNorm statistics that matter: they are permuted with their units
        g = torch.Generator().manual_seed(seed + 100)
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g))
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
    return m


def digits_batch(n=64):
    ts = load_split(DataConfig(subset=n), "test")
    return ts.normalize(ts.x)


@pytest.mark.parametrize("name,args", MODELS)
def test_weight_matching_undoes_a_known_permutation(name, args):
    a = model(name, args, 0)
    spec = permutation_spec(a)
    theta = a.state_dict()
    g = torch.Generator().manual_seed(3)
    sizes = {p: theta[n].shape[ax] for n, axes in spec.items() for ax, p in enumerate(axes) if p}
    scrambled = permute(spec, theta, {p: torch.randperm(k, generator=g) for p, k in sizes.items()})
    assert not all(torch.equal(scrambled[k], theta[k]) for k in theta)
    aligned, perms = weight_matching(spec, theta, scrambled)
    for k in theta:
        assert torch.equal(aligned[k], theta[k]), k
    assert all((p != torch.arange(len(p))).any() for p in perms.values())  # every layer had to move


@pytest.mark.parametrize("name,args", MODELS)
def test_the_aligned_model_computes_the_same_function(name, args):
    a, b = model(name, args, 0), model(name, args, 1)
    x = digits_batch()
    with torch.no_grad():
        before = b(x)
        aligned, perms = weight_matching(permutation_spec(a), a.state_dict(), b.state_dict())
        b.load_state_dict(aligned)
        after = b(x)
    assert sum(int((p != torch.arange(len(p))).sum()) for p in perms.values()) > 0  # a real permutation
    np.testing.assert_allclose(after.numpy(), before.numpy(), atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_alignment_lowers_the_barrier_between_two_trained_mlps(workdir):
    job = write_job(workdir / "job.yaml", model={"name": "mlp", "checkpoint": "model.pt", "args": {"hidden": [32]}},
                    train={"epochs": 15, "lr": 0.01, "batch_size": 32, "seed": 0}, data={"name": "digits", "subset": 300},
                    grid={"x": [0.0, 1.0, 11], "y": None}, eval={"split": "test", "batch_size": 100})
    run(["lldist.train", job], workdir)
    run(["lldist.train", job, "--set", "train.seed=1", "--set", "model.checkpoint=other.pt"], workdir)
    run(["lldist.surface", job, "--set", "directions.target=other.pt", "--out", "plain.h5"], workdir)
    p = run(["lldist.surface", job, "--set", "directions.target=other.pt", "--set", "directions.align=weights",
             "--out", "aligned.h5"], workdir)
    assert "hidden units moved" in p.stdout
    plain, aligned = metrics.from_file("plain.h5"), metrics.from_file("aligned.h5")
    assert aligned["barrier_loss"] < 0.7 * plain["barrier_loss"], (plain["barrier_loss"], aligned["barrier_loss"])
    with h5py.File("plain.h5", "r") as f, h5py.File("aligned.h5", "r") as g:
        # the end points: theta* itself, and theta' or its aligned copy, which compute the same function
        assert f["test/loss"][0] == g["test/loss"][0]
        assert g["test/loss"][-1] == pytest.approx(f["test/loss"][-1], rel=1e-5)
        assert g["directions"].attrs["align"] == "weights" and g["directions"].attrs["align_units_moved"] > 0


def test_alignment_of_an_unknown_model_is_refused_in_one_line(workdir):
    job = write_job(workdir / "job.yaml", train=None, grid={"x": [0.0, 1.0, 3], "y": None},
                    model={"name": "python:userfactories:tiny_model", "checkpoint": None, "args": {}},
                    data={"name": "python:userfactories:blobs"})
    torch.save(build_model(ModelConfig(name="python:userfactories:tiny_model", seed=1), (4,), 3).state_dict(), "t.pt")
    for bad, says in ((["--set", "directions.target=t.pt", "--set", "directions.align=weights"], "supports lldist's mlp"),
                      (["--set", "directions.align=weights"], "needs directions.target"),
                      (["--set", "directions.target=t.pt", "--set", "directions.align=units"], "allowed: weights")):
        p = run(["lldist.surface", job, *bad], workdir, check=False)
        assert p.returncode == 2 and says in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
