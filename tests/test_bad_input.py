"""Bad input: one clear line on stderr, exit status 2, no traceback, no output file damaged."""

import os

import numpy as np
import pytest
import torch
from conftest import run, write_job

from lldist.analysis import figures
from lldist import plot, surface
from lldist.config import ModelConfig
from lldist.errors import run_cli
from lldist.workloads.models import build_model


def fails(capsys, main, argv, expect):
    code = run_cli(main, argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lldist: error:"), err
    assert "Traceback" not in err
    assert expect in lines[0], lines[0]
    return lines[0]


def raw(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


CASES = [
    # (name, yaml text or job overrides, expected fragment)
    ("malformed yaml", "model: {name: mlp\ngrid: [", "malformed YAML"),
    ("not a mapping", "- a\n- b\n", "must be a mapping"),
    ("unknown top key", {"modle": {"name": "mlp"}}, "unknown key 'modle'"),
    ("unknown nested key", {"grid": {"z": [0, 1, 3]}}, "unknown key 'grid.z'"),
    ("wrong type axis", {"grid": {"x": "wide"}}, "'grid.x' must be [min, max, num]"),
    ("wrong type int", {"eval": {"batch_size": 2.5}}, "'eval.batch_size'"),
    ("bool for number", {"train": {"lr": True}}, "'train.lr' must be a number"),
    ("empty grid", {"grid": {"x": [-1, 1, 0]}}, "empty grid"),
    ("xmin >= xmax", {"grid": {"y": [1, -1, 5]}}, "'grid.y': min must be below max"),
    ("unknown normalization", {"directions": {"norm": "filterwise"}}, "allowed: filter, layer, weight, none"),
    ("unknown split", {"eval": {"split": "val"}}, "'eval.split'"),
    ("unknown model", {"model": {"name": "resnet9000", "checkpoint": "model.pt"}}, "'model.name'"),
    ("missing checkpoint", {"train": None, "model": {"name": "mlp", "checkpoint": "nope.pt"}}, "nope.pt does not exist"),
    ("negative subset", {"data": {"subset": -5}}, "'data.subset'"),
    ("cifar without root", {"data": {"name": "cifar10"}}, "'data.root' is required"),
    ("wrong dataset root", {"data": {"name": "cifar10", "root": "no/such/dir"}}, "no cifar-10-batches-py/ folder"),
    ("cifar download offline", {"data": {"name": "cifar10", "root": "dl", "download": True}},
     "cannot download CIFAR-10"),
    ("imagefolder without val", {"train": None, "model": {"name": "mlp", "checkpoint": None},
                                 "data": {"name": "imagefolder", "root": "."}}, "no val or test/ folder"),
    ("python factory missing", {"model": {"name": "python:no_such_mod:make", "checkpoint": "model.pt"}},
     "cannot import module"),
    ("bad model args", {"model": {"name": "mlp", "checkpoint": "model.pt", "args": {"depth": 3}}}, "bad model.args"),
    ("unwritable output", {"output": "afile/out.h5"}, "cannot create folder"),
    ("cuda without gpu", {"eval": {"device": "cuda"}}, "no CUDA device"),
    ("infinite bounds", {"grid": {"x": [float("-inf"), float("inf"), 5]}}, "must be finite numbers"),
    ("nan bound", {"grid": {"y": [float("nan"), 1.0, 5]}}, "must be finite numbers"),
    ("grid too large", {"grid": {"x": [-1, 1, 100000], "y": [-1, 1, 100000]}}, "more than lldist stores"),
    ("cnn width 0", {"model": {"name": "cnn", "checkpoint": "model.pt", "args": {"width": 0}}},
     "model.args.width must be a positive integer"),
    ("mlp hidden -1", {"model": {"name": "mlp", "checkpoint": "model.pt", "args": {"hidden": [-1]}}},
     "model.args.hidden must be a list of positive integers"),
    ("bn batch with auto batch", {"eval": {"bn": "batch", "batch_size": "auto"}},
     "'eval.batch_size' must be a number with eval.bn: batch"),
    ("bn batch with vmapped cells", {"eval": {"bn": "batch", "cells_per_pass": 4}},
     "'eval.cells_per_pass' must be 1 with eval.bn: batch"),
    ("not utf-8", "name: caf\xe9\n", "not UTF-8"),
    ("duplicate key", "name: a\nname: b\n", "duplicate key 'name'"),
]


@pytest.mark.parametrize("name,spec,expect", CASES, ids=[c[0] for c in CASES])
def test_bad_job(workdir, capsys, name, spec, expect):
    open("afile", "w").close()
    if isinstance(spec, str):
        job = str(workdir / "job.yaml")
        with open(job, "wb") as f:
            f.write(spec.encode("latin-1"))
    else:
        job = write_job(workdir / "job.yaml", **spec)
    fails(capsys, surface.main, [job], expect)


def test_bad_override(workdir, capsys):
    job = write_job(workdir / "job.yaml")
    fails(capsys, surface.main, [job, "--set", "grid.x"], "expected key.sub=value")
    fails(capsys, surface.main, [job, "--set", "eval.precision=fp8"], "allowed: fp32, tf32, bf16")
    fails(capsys, surface.main, ["no_such_job.yaml"], "cannot read job file")


def test_corrupt_and_foreign_checkpoints(workdir, capsys):
    with open("garbage.pt", "wb") as f:
        f.write(b"\x00not a checkpoint" * 10)
    job = write_job(workdir / "job.yaml", train=None, model={"name": "mlp", "checkpoint": "garbage.pt"})
    fails(capsys, surface.main, [job], "garbage.pt cannot be read")
    cnn = build_model(ModelConfig(name="cnn"), (1, 8, 8), 10)
    torch.save(cnn.state_dict(), "cnn.pt")
    job = write_job(workdir / "job.yaml", train=None, model={"name": "mlp", "checkpoint": "cnn.pt",
                                                             "args": {"hidden": [16]}})
    fails(capsys, surface.main, [job], "does not fit model MLP")
    torch.save({"a": 1}, "notensors.pt")
    job = write_job(workdir / "job.yaml", train=None, model={"name": "mlp", "checkpoint": "notensors.pt"})
    fails(capsys, surface.main, [job], "no state dict of tensors")


def test_existing_files_are_never_damaged(workdir, capsys):
    # a non-HDF5 file where the output goes
    with open("out.h5", "w") as f:
        f.write("my notes")
    job = write_job(workdir / "job.yaml", grid={"x": [-1, 1, 3], "y": None})
    fails(capsys, surface.main, [job], "cannot be opened as HDF5")
    assert open("out.h5").read() == "my notes"
    # an HDF5 file that is not an lldist surface
    import h5py
    os.remove("out.h5")
    with h5py.File("out.h5", "w") as f:
        f["data"] = [1, 2, 3]
    fails(capsys, surface.main, [job], "not an lldist surface")
    with h5py.File("out.h5", "r") as f:
        assert list(f["data"][()]) == [1, 2, 3]
    fails(capsys, plot.main, ["out.h5"], "not an lldist surface")
    fails(capsys, plot.main, ["missing.h5"], "does not exist")


@pytest.mark.slow
def test_cli_subprocess_one_line(workdir):
    """The real command line: exit status 2 and a single line, for a job of another run too."""
    job = write_job(workdir / "job.yaml", grid={"x": [-1, 1, 3], "y": None})
    run(["lldist.surface", job], workdir)
    before = open("out.h5", "rb").read()
    p = run(["lldist.surface", job, "--set", "grid.x=[-2,2,3]"], workdir, check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "different job" in p.stderr
    assert open("out.h5", "rb").read() == before
    p = run(["lldist.train", write_job(workdir / "j2.yaml", train=None)], workdir, check=False)
    assert p.returncode == 2 and "no 'train:' section" in p.stderr and "Traceback" not in p.stderr


def test_pretrained_offline_is_a_clear_error(workdir, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(workdir / "torch_home"))  # nothing cached
    job = write_job(workdir / "job.yaml", train=None,
                    model={"name": "mobilenet_v2", "checkpoint": None, "pretrained": "IMAGENET1K_V1"},
                    data={"name": "digits"})
    line = fails(capsys, surface.main, [job], "cannot get pretrained weights mobilenet_v2.IMAGENET1K_V1")
    assert "torch_home" in line  # says where to put the file
    job = write_job(workdir / "job.yaml", train=None,
                    model={"name": "mobilenet_v2", "checkpoint": None, "pretrained": "IMAGENET9K"})
    fails(capsys, surface.main, [job], "not a weights name")


def test_full_disk_is_one_line_and_creates_nothing(workdir, capsys, monkeypatch):
    from lldist.store import writer
    monkeypatch.setattr(writer, "free_bytes", lambda folder: 4096)
    job = write_job(workdir / "job.yaml", grid={"x": [-1, 1, 3], "y": None})
    fails(capsys, surface.main, [job], "has 4.1 kB free")
    assert not os.path.exists("out.h5") and not os.path.exists("out.h5.creating")
    assert not os.path.exists("out.h5.lock")


@pytest.mark.slow
def test_odd_checkpoint_metadata_is_stored_as_text(workdir):
    import json

    import h5py
    m = build_model(ModelConfig(name="mlp", args={"hidden": [16]}), (1, 8, 8), 10)
    for i, meta in enumerate(({"epoch": torch.tensor(3), "w": torch.ones(2), "nested": [1, {"a": (2, 3)}]}, "a note")):
        torch.save({"state_dict": m.state_dict(), "meta": meta}, f"odd{i}.pt")
        job = write_job(workdir / "job.yaml", train=None, output=f"o{i}.h5",
                        model={"name": "mlp", "checkpoint": f"odd{i}.pt", "args": {"hidden": [16]}},
                        grid={"x": [-1, 1, 3], "y": None})
        run(["lldist.surface", job], workdir)
        with h5py.File(f"o{i}.h5", "r") as f:
            stored = json.loads(f.attrs["checkpoint_meta"])
        assert stored == ({"epoch": 3, "w": [1.0, 1.0], "nested": [1, {"a": [2, 3]}]} if i == 0 else {"meta": "a note"})


def test_bad_study_files(workdir, capsys):
    from lldist import study
    raw(workdir / "s1.yaml", "name: s\nbase: [1, 2]\n")
    fails(capsys, study.main, ["s1.yaml"], "'base' must be a mapping")
    raw(workdir / "s2.yaml", "name: s\nbase: {model: {name: mlp}}\nvariants: [{label: a}, {label: a}]\n")
    fails(capsys, study.main, ["s2.yaml"], "variant label 'a' is used more than once")


def test_bad_plot_options(workdir, capsys):
    job = write_job(workdir / "job.yaml", grid={"x": [-1, 1, 3], "y": [-1, 1, 3]})
    run(["lldist.surface", job], workdir)
    fails(capsys, plot.main, ["out.h5", "--vmin", "nan"], "--vmin must be a finite number")
    fails(capsys, plot.main, ["out.h5", "--dpi", "0"], "--dpi must be between")
    fails(capsys, plot.main, ["out.h5", "--vmin", "5", "--vmax", "1"], "must be below --vmax")


def test_metrics_store_failure_is_one_line_and_keeps_the_file(workdir, capsys, monkeypatch):
    from lldist import metrics
    job = write_job(workdir / "job.yaml", grid={"x": [-1, 1, 5], "y": None})
    run(["lldist.surface", job], workdir)
    with open("out.h5", "rb") as f:
        before = f.read()

    def full(src, dst):
        raise OSError(28, "No space left on device")
    real = os.replace
    monkeypatch.setattr(os, "replace", full)
    fails(capsys, metrics.main, ["out.h5", "--store"], "No space left on device")
    monkeypatch.setattr(os, "replace", real)
    with open("out.h5", "rb") as f:
        assert f.read() == before
    assert not os.path.exists("out.h5.metrics")


@pytest.mark.parametrize("grid,curve", [({"x": [-1, 1, 5], "y": [0, 0, 1]}, "alpha"),
                                        ({"x": [0.5, 0.5, 1], "y": [-1, 1, 4]}, "beta"),
                                        ({"x": [0, 0, 1], "y": [0, 0, 1]}, "alpha")])
def test_one_row_or_column_grid_plots_as_a_curve(workdir, grid, curve):
    job = write_job(workdir / "job.yaml", grid=grid)
    run(["lldist.surface", job], workdir)
    p = run(["lldist.plot", "out.h5"], workdir)
    assert "wrote 1 figures" in p.stdout and os.path.exists("out_curve.png")
    s = figures.read_surface("out.h5")
    assert s.y is None and s.xlabel.startswith(curve)
    n = max(grid["x"][2], grid["y"][2])
    assert s.values[("test", "loss")].shape == (n,) and np.isfinite(s.values[("test", "loss")]).all()
