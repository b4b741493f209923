"""Loading data in the real on-disk formats, written by the tests: CIFAR-10's python batches,
an ImageNet-style folder of JPEG/PNG files, and python: factories for data and models."""

import os
import pickle

import h5py
import numpy as np
import pytest
import torch
from conftest import run, write_job
from PIL import Image

from lldist.config import DataConfig
from lldist.workloads.data import CIFAR_MEAN, load_split


def write_cifar(root, n_train=6, n_test=10, seed=0):
    rng = np.random.RandomState(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    images = {}
    for name, n in [(f"data_batch_{i}", n_train) for i in range(1, 6)] + [("test_batch", n_test)]:
        data = rng.randint(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = list(rng.randint(0, 10, size=n))
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({b"batch_label".decode(): name, "data": data, "labels": labels,
                         "filenames": [f"{i}.png" for i in range(n)]}, f)
        images[name] = (data, labels)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072}, f)
    return images


def test_cifar10_on_disk_format(tmp_path):
    images = write_cifar(str(tmp_path))
    test = load_split(DataConfig(name="cifar10", root=str(tmp_path)), "test")
    train = load_split(DataConfig(name="cifar10", root=str(tmp_path)), "train")
    assert test.x.shape == (10, 3, 32, 32) and test.x.dtype == torch.uint8 and len(train) == 30
    data, labels = images["test_batch"]
    # rows are 1024 red, 1024 green, 1024 blue values, row-major within each plane
    assert test.x[3, 1, 2, 5] == data[3, 1024 + 2 * 32 + 5]
    assert test.y.tolist() == labels
    xb = test.normalize(test.x[:1])
    expect = (data[0, 0] / 255 - CIFAR_MEAN[0]) / 0.2470
    assert float(xb[0, 0, 0, 0]) == pytest.approx(expect, rel=1e-5)
    sub = load_split(DataConfig(name="cifar10", root=str(tmp_path), subset=4, subset_seed=1), "test")
    assert len(sub) == 4 and set(sub.y.tolist()) <= set(labels)


def test_cifar10_job_end_to_end(workdir):
    write_cifar("cifar")
    job = write_job(workdir / "job.yaml", data={"name": "cifar10", "root": "cifar"},
                    train={"epochs": 1}, grid={"x": [-1, 1, 3], "y": None})
    run(["lldist.surface", job], workdir)
    with h5py.File("out.h5", "r") as f:
        assert f["done"][()].all() and f.attrs["eval_samples"] == '{"test": 10}'


def write_folder(root, split, classes=("cat", "dog", "emu"), per_class=3):
    rng = np.random.RandomState(1)
    for c in classes:
        d = os.path.join(root, split, c)
        os.makedirs(d)
        for i in range(per_class):
            arr = rng.randint(0, 256, size=(30 + i, 40, 3), dtype=np.uint8)
            ext = "JPEG" if i % 2 == 0 else "png"
            Image.fromarray(arr).save(os.path.join(d, f"img{i}.{ext}"))


def test_imagefolder_eval_transforms(tmp_path):
    write_folder(str(tmp_path), "val")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), resize=20, crop=16)
    ts = load_split(cfg, "test")
    assert ts.x.shape == (9, 3, 16, 16) and ts.x.dtype == torch.uint8
    assert ts.y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and ts.num_classes == 3  # sorted class folders
    # the standard eval transform: resize the shorter side, then centre crop
    from torchvision.transforms import functional as TF
    img = Image.open(os.path.join(tmp_path, "val", "dog", "img1.png")).convert("RGB")
    ref = TF.pil_to_tensor(TF.center_crop(TF.resize(img, 20), 16))
    assert torch.equal(ts.x[4], ref)
    sub = load_split(DataConfig(name="imagefolder", root=str(tmp_path), resize=20, crop=16, subset=5), "test")
    assert len(sub) == 5


def test_python_factories(workdir):
    job = write_job(workdir / "job.yaml",
                    model={"name": "python:userfactories:tiny_model", "checkpoint": "m.pt", "args": {"width": 5}},
                    data={"name": "python:userfactories:blobs", "args": {"n": 60}, "subset": None},
                    train={"epochs": 3, "lr": 0.05})
    p = run(["lldist.surface", job], workdir)
    assert "60 train / 60 test" in p.stdout
    with h5py.File("out.h5", "r") as f:
        assert f["test/acc"][2, 3] > 0.8  # the blobs are easy: the trained centre classifies well
        assert "fc1.weight" in f["directions/x"]


def test_torchvision_model_by_name():
    from lldist.config import ModelConfig
    from lldist.workloads.models import build_model
    m = build_model(ModelConfig(name="torchvision:resnet18"), (3, 32, 32), 7)
    assert m.fc.out_features == 7
    m = build_model(ModelConfig(name="mobilenet_v2"), (3, 32, 32), 10)
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
