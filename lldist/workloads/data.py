"""Datasets -> compact tensors that live on the evaluation device.

    from lldist.workloads.data import load_split
    test = load_split(job.data, "test").to("cuda")
    for xb, yb in test.batches(512): ...

A landscape evaluates the same images thousands of times, so each split is decoded once
(no per-cell DataLoader, no per-sample transforms) into a `TensorSet`: images as uint8 where
the source is 8-bit (a quarter of float32's memory), normalized on the device batch by batch.

Sources: `digits` (scikit-learn's bundled load_digits: 1,797 real 8x8 images, split 80/20
with a fixed seed), `cifar10` (torchvision's on-disk format under `root`), `imagefolder`
(ImageNet-style `root/{train,val}/<class>/<image>`, standard eval transforms: resize, centre
crop), and `python:<module>:<factory>` (called as `factory(split=..., **args)`, returning a
(x, y) pair of tensors or a torch Dataset of (x, y) samples).
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

from ..config import DataConfig
from ..errors import UserError
from .factory import import_object
from .tensors import BatchList, DictSet, TensorSet  # noqa: F401 - the containers, re-exported

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def subset_indices(n: int, cfg: DataConfig) -> Optional[np.ndarray]:
    if cfg.subset is None or cfg.subset >= n:
        return None
    g = torch.Generator().manual_seed(cfg.subset_seed)
    return torch.randperm(n, generator=g)[: cfg.subset].sort().values.numpy()


def _digits(split: str) -> TensorSet:
    from sklearn.datasets import load_digits
    d = load_digits()
    images = d.images.astype(np.uint8)  # values 0..16
    order = np.random.RandomState(0).permutation(len(images))  # fixed 80/20 split
    cut = int(0.8 * len(images))
    idx = order[:cut] if split == "train" else order[cut:]
    idx.sort()
    x = torch.from_numpy(images[idx]).unsqueeze(1)  # (N, 1, 8, 8)
    y = torch.from_numpy(d.target[idx].astype(np.int64))
    return TensorSet(x, y, 10, scale=1 / 16, mean=(0.5,), std=(0.5,))


def _cifar10(cfg: DataConfig, split: str) -> TensorSet:
    """CIFAR-10 in its official on-disk format (`<root>/cifar-10-batches-py/`, python pickles of
    uint8 rows), the folder torchvision's CIFAR10 downloads and reads. We read the batches
    ourselves rather than through torchvision, whose md5 check of every file would reject a
    re-packed or subset copy; `download: true` still goes through torchvision."""
    import pickle
    folder = os.path.join(cfg.root, "cifar-10-batches-py")
    if not os.path.isdir(folder):
        if not cfg.download:
            raise UserError(f"data.root {cfg.root}: no cifar-10-batches-py/ folder "
                            "(set data.download: true to fetch CIFAR-10)")
        import torchvision
        try:
            torchvision.datasets.CIFAR10(cfg.root, train=True, download=True)
        except Exception as e:  # URLError offline, OSError
            raise UserError(f"data.root {cfg.root}: cannot download CIFAR-10 ({type(e).__name__}: {e})")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for name in names:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
        except FileNotFoundError:
            raise UserError(f"data.root {cfg.root}: CIFAR-10 file {name} is missing")
        except Exception as e:
            raise UserError(f"data.root {cfg.root}: CIFAR-10 file {name} is unreadable ({type(e).__name__})")
    x = torch.from_numpy(np.concatenate(xs))  # (N, 3, 32, 32) uint8
    y = torch.tensor(ys, dtype=torch.int64)
    return TensorSet(x, y, 10, scale=1 / 255, mean=CIFAR_MEAN, std=CIFAR_STD)


def _imagefolder(cfg: DataConfig, split: str, subset: bool) -> TensorSet:
    import torchvision
    from torchvision import transforms as T
    names = ("train",) if split == "train" else ("val", "test")
    folder = next((os.path.join(cfg.root, n) for n in names if os.path.isdir(os.path.join(cfg.root, n))), None)
    if folder is None:
        raise UserError(f"data.root {cfg.root}: no {' or '.join(names)}/ folder of class folders")
    tf = T.Compose([T.Resize(cfg.resize), T.CenterCrop(cfg.crop), T.PILToTensor()])  # uint8 (3, crop, crop)
    try:
        ds = torchvision.datasets.ImageFolder(folder, transform=tf)
    except (FileNotFoundError, OSError) as e:
        raise UserError(f"data.root {cfg.root}: {e}")
    num_classes = len(ds.classes)
    idx = subset_indices(len(ds), cfg) if subset else None  # drawn before decoding: cheaper
    if idx is not None:
        ds = torch.utils.data.Subset(ds, idx.tolist())
    # decoded once; a few workers since JPEG decoding is the slow part
    loader = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=min(4, os.cpu_count() or 1))
    xs, ys = [], []
    for xb, yb in loader:
        xs.append(xb)
        ys.append(yb)
    return TensorSet(torch.cat(xs), torch.cat(ys).long(), num_classes,
                     scale=1 / 255, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _python(cfg: DataConfig, split: str) -> TensorSet:
    obj = import_object(cfg.name, "data")(split=split, **cfg.args)
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[0], torch.Tensor):
        x, y = obj
    else:
        try:
            pairs = [obj[i] for i in range(len(obj))]
        except TypeError:
            raise UserError(f"data {cfg.name}: the factory must return (x, y) tensors or a Dataset")
        x = torch.stack([torch.as_tensor(p[0]) for p in pairs])
        y = torch.stack([torch.as_tensor(p[1]) for p in pairs])
    # the targets keep their kind: integers are class labels (int64, as cross-entropy takes
    # them), real values a regression's targets (mse) and stay what they are
    y = torch.as_tensor(y)
    y = y.long() if not y.is_floating_point() else y
    if x.dtype != torch.uint8:
        x = x.float()
    n = int(y.max()) + 1 if len(y) and not y.is_floating_point() else 0
    return TensorSet(x, y, int(cfg.args.get("num_classes", n)))


def load_split(cfg: DataConfig, split: str, subset: bool = True, model_name: str = ""):
    """The `split` ("train" or "test") of the dataset, on the CPU: a TensorSet of images, or a
    DictSet of tokenized text (`hf:` data; its tokenizer comes from `data.args.tokenizer` or
    the `hf:` model folder `model_name`).

    With subset=True, `data.subset` samples are drawn with `data.subset_seed` (for evaluation);
    training passes subset=False and gets the whole split."""
    if cfg.name == "digits":
        ts = _digits(split)
    elif cfg.name == "cifar10":
        ts = _cifar10(cfg, split)
    elif cfg.name == "imagefolder":
        ts = _imagefolder(cfg, split, subset)
        subset = False
    elif cfg.name.startswith("hf:"):
        from . import hf
        ts = hf.load_text(cfg, split, model_name)
    else:
        ts = _python(cfg, split)
    if subset:
        idx = subset_indices(len(ts), cfg)
        if idx is not None:
            ts = ts.select(torch.from_numpy(idx))
    if len(ts) == 0:
        raise UserError(f"data {cfg.name}: the {split} split is empty")
    bad = ts.nonfinite()
    if bad:
        raise UserError(f"data {cfg.name}: the {split} split's inputs hold {bad:,} NaN or infinite values "
                        "(every cell's loss would be NaN)")
    return ts
