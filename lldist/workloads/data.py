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
from dataclasses import dataclass, replace
from typing import Iterator, Optional

import numpy as np
import torch

from ..config import DataConfig
from ..errors import UserError

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TensorSet:
    x: torch.Tensor  # (N, C, H, W), uint8 or float32
    y: torch.Tensor  # (N,) int64 class labels
    num_classes: int
    scale: float = 1.0  # x * scale brings raw values to [0, 1]
    mean: Optional[tuple] = None  # per channel, applied after scale
    std: Optional[tuple] = None

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def in_shape(self) -> tuple:
        return tuple(self.x.shape[1:])

    def to(self, device) -> "TensorSet":
        return replace(self, x=self.x.to(device), y=self.y.to(device))

    def normalize(self, xb: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """(B, C, H, W) raw -> normalized `dtype` on xb's device."""
        if xb.dtype == dtype and self.scale == 1.0 and self.mean is None:
            return xb  # already normalized (a pre-normalized copy): no work, no copy
        xb = xb.to(dtype)
        if self.scale != 1.0:
            xb = xb * self.scale
        if self.mean is not None:
            m = torch.tensor(self.mean, dtype=dtype, device=xb.device).view(1, -1, 1, 1)
            s = torch.tensor(self.std, dtype=dtype, device=xb.device).view(1, -1, 1, 1)
            xb = (xb - m) / s
        return xb

    def batches(self, batch_size: int, dtype=torch.float32) -> Iterator[tuple]:
        for i in range(0, len(self), batch_size):
            yield self.normalize(self.x[i:i + batch_size], dtype), self.y[i:i + batch_size]

    def select(self, idx: torch.Tensor) -> "TensorSet":
        return replace(self, x=self.x[idx], y=self.y[idx])

    def take(self, idx: torch.Tensor) -> tuple:
        """One training batch: (normalized x, y)."""
        return self.normalize(self.x[idx]), self.y[idx]


@dataclass(frozen=True)
class DictSet:
    """Tokenized text: equal-length tensors by name (input_ids, attention_mask, labels...),
    sliced into HuggingFace-style dict batches on the device."""
    tensors: dict  # name -> (N, ...) tensor
    num_classes: int = 0

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    @property
    def in_shape(self) -> tuple:
        return tuple(self.tensors["input_ids"].shape[1:])

    def to(self, device) -> "DictSet":
        return replace(self, tensors={k: v.to(device) for k, v in self.tensors.items()})

    def batches(self, batch_size: int, dtype=None) -> Iterator[dict]:
        for i in range(0, len(self), batch_size):
            yield {k: v[i:i + batch_size] for k, v in self.tensors.items()}

    def select(self, idx: torch.Tensor) -> "DictSet":
        return replace(self, tensors={k: v[idx] for k, v in self.tensors.items()})

    def take(self, idx: torch.Tensor) -> dict:
        return {k: v[idx] for k, v in self.tensors.items()}


class BatchList:
    """Batches as the caller made them (tuples or dicts of tensors, HuggingFace style), kept as
    they come: their size is the caller's. `len()` counts examples (the first dimension)."""

    def __init__(self, batches: list):
        self.batches_ = batches

    @staticmethod
    def _tensors(b):
        return list(b.values()) if isinstance(b, dict) else list(b)

    def __len__(self) -> int:
        return sum(self._tensors(b)[0].shape[0] for b in self.batches_)

    def to(self, device) -> "BatchList":
        def move(b):
            if isinstance(b, dict):
                return {k: v.to(device) for k, v in b.items()}
            return tuple(t.to(device) for t in b)
        return BatchList([move(b) for b in self.batches_])

    def batches(self, batch_size=None, dtype=None) -> Iterator:
        return iter(self.batches_)


def _subset_indices(n: int, cfg: DataConfig) -> Optional[np.ndarray]:
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
    idx = _subset_indices(len(ds), cfg) if subset else None  # drawn before decoding: cheaper
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
    from .models import _import_factory
    obj = _import_factory(cfg.name, "data")(split=split, **cfg.args)
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[0], torch.Tensor):
        x, y = obj
    else:
        try:
            pairs = [obj[i] for i in range(len(obj))]
        except TypeError:
            raise UserError(f"data {cfg.name}: the factory must return (x, y) tensors or a Dataset")
        x = torch.stack([torch.as_tensor(p[0]) for p in pairs])
        y = torch.as_tensor([int(p[1]) for p in pairs])
    y = torch.as_tensor(y).long()
    if x.dtype != torch.uint8:
        x = x.float()
    n = int(y.max()) + 1 if len(y) else 0
    return TensorSet(x, y, int(cfg.args.get("num_classes", n)))


def data_fingerprint(cfg: DataConfig, splits) -> str:
    """A hash of the files a job reads its images from, for the job's identity: the same
    `data.root` holding other images must not resume a file computed on the first ones.
    CIFAR-10: the content of each batch file read (180 MB in all, under a second). ImageFolder:
    every image's path and size, and the content of up to 64 of them spread over the folder.
    Bundled digits and python: factories: "" (a factory's data is its author's to version)."""
    import hashlib
    h = hashlib.sha256()
    if cfg.name == "cifar10":
        folder = os.path.join(cfg.root, "cifar-10-batches-py")
        names = sorted({n for sp in splits
                        for n in ([f"data_batch_{i}" for i in range(1, 6)] if sp == "train" else ["test_batch"])})
        for name in names:
            path = os.path.join(folder, name)
            h.update(name.encode())
            if os.path.exists(path):
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
        return h.hexdigest()
    if cfg.name == "imagefolder":
        files = []
        for sp in splits:
            names = ("train",) if sp == "train" else ("val", "test")
            top = next((os.path.join(cfg.root, n) for n in names if os.path.isdir(os.path.join(cfg.root, n))), None)
            if top is None:
                continue
            for d, _, fs in os.walk(top):
                files += [os.path.join(d, f) for f in fs]
        files.sort()
        for path in files:
            h.update(f"{os.path.relpath(path, cfg.root)}\0{os.path.getsize(path)}\n".encode())
        for path in files[::max(1, len(files) // 64)]:
            with open(path, "rb") as f:
                h.update(f.read())
        return h.hexdigest()
    if cfg.name.startswith("hf:") and cfg.root and os.path.isdir(cfg.root):  # local text files
        for d, _, fs in sorted(os.walk(cfg.root)):
            for name in sorted(fs):
                with open(os.path.join(d, name), "rb") as f:
                    h.update(name.encode() + f.read())
        return h.hexdigest()
    return ""


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
        idx = _subset_indices(len(ts), cfg)
        if idx is not None:
            ts = ts.select(torch.from_numpy(idx))
    if len(ts) == 0:
        raise UserError(f"data {cfg.name}: the {split} split is empty")
    return ts
