"""User factories for `python:<module>:<factory>` models and data, used by the tests."""

import os
import time

import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.fc1 = nn.Linear(4, width)
        self.fc2 = nn.Linear(width, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


def tiny_model(width=8):
    return Tiny(width)


def blobs(split, n=90, seed=0):
    """Three Gaussian blobs in 4-D: a float (x, y) pair, as a python: data factory may return."""
    g = torch.Generator().manual_seed(seed + (split == "test"))
    y = torch.arange(n) % 3
    centres = 4 * torch.eye(3, 4)
    return centres[y] + torch.randn(n, 4, generator=g), y


class Faulty(nn.Module):
    """Fails on the MPI rank named by LLDIST_TEST_FAIL_RANK after `after` forward calls, so a
    re-run without the variable is the same job and resumes."""

    def __init__(self, after, pause=0.0):
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.calls, self.after, self.pause = 0, after, pause
        rank = os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
        self.fail = os.environ.get("LLDIST_TEST_FAIL_RANK") == rank

    def forward(self, x):
        self.calls += 1
        time.sleep(self.pause)
        if self.fail and self.calls > self.after:
            raise RuntimeError("injected failure")
        return self.fc(x.flatten(1))


def faulty(after=3, pause=0.0):
    return Faulty(after, pause)


def _rank():
    return os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0"))


def raising(on_rank=None):
    """A factory that raises (a bug in the user's code, not bad input) on every rank, or on
    `on_rank` only."""
    if on_rank is None or str(on_rank) == _rank():
        raise ValueError(f"factory bug on rank {_rank()}")
    return Faulty(10 ** 9)


def slow_on_rank0(seconds=3.0):
    """Rank 0 takes `seconds` to build its model (as if training): the other ranks wait."""
    if _rank() == "0":
        import sys
        import time
        print("slow factory: sleeping", file=sys.stderr, flush=True)
        time.sleep(seconds)
    return Faulty(10 ** 9)


def top2(out, batch):
    """A job file's own metric (eval.metrics: {top2: python:userfactories:top2})."""
    return (out.topk(2, dim=1).indices == batch[1].unsqueeze(1)).any(1).float()


def hinge(out, batch):
    """A job file's own loss: multi-class hinge, per example."""
    import torch.nn.functional as F
    return F.multi_margin_loss(out, batch[1], reduction="none")


def with_nan(split, n=60):
    """blobs with one NaN input: a data factory a landscape must refuse."""
    x, y = blobs(split, n)
    x[4, 1] = float("nan")
    return x, y


class Paced(nn.Module):
    """A built-in lldist model that takes `seconds` more per batch when it evaluates (not when
    it trains): a run then outlasts every rank's start-up, so a test may ask that every rank
    took part without racing the launcher."""

    def __init__(self, inner, seconds):
        super().__init__()
        self.inner, self.seconds = inner, seconds

    def forward(self, x):
        if not self.training:
            time.sleep(self.seconds)
        return self.inner(x)


def paced(kind="mlp", seconds=0.01, **args):
    """python:userfactories:paced with args {kind: cnn, width: 8, ...}: digits-shaped (1, 8, 8), 10 classes."""
    from lldist.config import ModelConfig
    from lldist.workloads.models import build_model
    return Paced(build_model(ModelConfig(name=kind, args=args), (1, 8, 8), 10), seconds)


def diabetes(split, as_dataset=False):
    """scikit-learn's bundled diabetes regression (442 patients, 10 features, a real-valued
    target), standardized: an (x, y) pair or a Dataset of (x, y) samples."""
    from sklearn.datasets import load_diabetes
    x, y = load_diabetes(return_X_y=True)
    x = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)
    y = torch.tensor((y - y.mean()) / y.std(), dtype=torch.float32)
    part = slice(0, 350) if split == "train" else slice(350, None)
    x, y = x[part], y[part]
    if as_dataset:
        return torch.utils.data.TensorDataset(x, y)
    return x, y


class Regressor(nn.Module):
    """A small regression MLP whose output is one number per example."""

    def __init__(self, width=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(10, width), nn.Tanh(), nn.Linear(width, 1))

    def forward(self, x):
        return self.net(x.flatten(1)).squeeze(-1)


def regressor(width=16, seed=0):
    return Regressor(width, seed)


class Tempered(nn.Module):
    """Tiny with a learnt temperature: a 0-dimensional parameter (a scale, ReZero's alpha)."""

    def __init__(self, width=8):
        super().__init__()
        self.body = Tiny(width)
        self.temperature = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.body(x) / self.temperature


def tempered(width=8):
    return Tempered(width)


class TiedLM(nn.Module):
    """A tiny language model whose output layer is its embedding (tied weights, as GPT-2's)."""

    def __init__(self, vocab=12, width=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.out = nn.Linear(width, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, x):
        return self.out(torch.tanh(self.mix(self.embed(x.long().flatten(1)[:, :4] % 12)))).mean(1)[:, :3]


def tied_lm():
    return TiedLM()


class Valued(nn.Module):
    """A model whose __init__ reads its own weights' values (a scale fixed at construction):
    it cannot be built with its parameters on the meta device."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(64, 10)
        self.scale = float(self.fc.weight.abs().mean())  # a number, from real values

    def forward(self, x):
        return self.fc(x.flatten(1)) / self.scale


def valued():
    return Valued()
