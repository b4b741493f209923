"""Bad input: one clear line on stderr, exit status 2, no traceback, no output file damaged."""

import os

import pytest
import torch

from conftest import run, write_job
from lldist import plot, surface
from lldist.config import ModelConfig
from lldist.errors import run_cli
from lldist.models import build_model


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
]


@pytest.mark.parametrize("name,spec,expect", CASES, ids=[c[0] for c in CASES])
def test_bad_job(workdir, capsys, name, spec, expect):
    open("afile", "w").close()
    if isinstance(spec, str):
        job = raw(workdir / "job.yaml", spec)
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
