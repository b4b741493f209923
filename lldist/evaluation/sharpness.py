"""The sharpness measures of the generalization literature at a point θ of a model, on fixed
batches. No MPI, no HDF5: lldist/runs/sharpness.py spreads the restarts, draws and groups over ranks.

    s = Sharpness(model, batches, task)          # L(θ*) on the batches, the parameters' |θ*|
    s.worst(rho=0.5, p=2, steps=20, restart=0)   # the largest rise one restart of PGD finds
    s.average(rho=0.5, draw=3)                   # the rise along one random adaptive direction
    s.sam(group=7, m=128, rho=0.05)              # SAM's sharpness of one group of m examples
    s.pac_rise(sigma=0.01, draw=3)               # the rise under one draw of N(0, σ²θ² + ε²)
    bisect_sigma(lambda sg: mean_and_se(...), threshold=0.1)   # Jiang et al.'s σ'

Definitions (docs/METRICS.md gives them with their papers, units and invariances); L is the
task's mean loss over the batches, c = |θ| + eta elementwise (eta = 0: Kwon et al.'s adaptive
scaling), ⊘ elementwise division:
- worst-case adaptive sharpness (Kwon et al. 2021; Andriushchenko et al. 2023):
  max L(θ + δ) − L(θ) over ‖δ ⊘ c‖_p ≤ ρ, p = 2 or ∞, by projected gradient ascent in u = δ ⊘ c
  (steps normalized in the norm's dual: ℓ2 the unit gradient, ℓ∞ its sign; step size ρ/2
  cosine-decayed to 0; restart 0 starts at u = 0, the others at a random point of the ball);
  the largest rise met on the path is kept. A lower bound of the true maximum.
- average-case adaptive sharpness: E L(θ + δ) − L(θ) over δ = ρ c ⊙ z/‖z‖, z standard normal:
  uniform directions on the same sphere the worst case searches. Andriushchenko et al. draw
  δ ~ N(0, ρ'² diag(c²)) instead, the same measure at ρ ≈ ρ' √d. Each draw is an antithetic
  pair, (L(θ + δ) + L(θ − δ))/2 − L(θ): the gradient's first-order term cancels exactly.
- SAM's m-sharpness (Foret et al. 2021): the examples split in groups of m; per group S,
  max L_S(θ + ε) − L_S(θ) over ‖ε‖₂ ≤ ρ (not adaptive), by `steps` ascent steps (1: SAM's own
  first-order ε = ρ ∇L_S/‖∇L_S‖); the mean over groups.
- PAC-Bayes flatness magnitude (Jiang et al. 2019, "pacbayes.mag.flatness"): the largest σ with
  E L(θ + u) − L(θ) ≤ threshold, u ~ N(0, σ²θ² + ε²) elementwise (ε = 1e-3), found by bisection
  in log σ with the same draws for every σ (common random numbers: the estimate is a smooth
  function of σ); the measure is 1/σ².

Every random vector comes from its own generator seeded by (seed, kind, index), so restart k
or draw k is the same numbers whichever rank computes it, and the results do not depend on the
number of ranks.

In a rank group (`group`, eval.group_size; its process group made already) the members
compute each measure together: each runs its share of the batches (batch i on member
i % size), the float32 batch sums meet in their slots by an all-reduce and are summed in batch
order as one rank sums them, so every loss is one rank's bit for bit. In `data` mode each
member holds the whole model and the gradients are all-reduced; in `shard` mode the model is
FSDP2's (evaluation/groups.py), θ*, |θ*| and every vector are the member's own rows, a random
vector is drawn whole one parameter at a time and its rows kept, norms are all-reduced, and the
gradient is FSDP2's reduce-scatter of each member's (summed, not averaged). The gradients are
then sums in another order than one rank's: the ascent steps agree with one rank's to float32
round-off, not bit for bit (tests/test_group_features.py states the agreement).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import Stopped
from .groups import (GroupSpec, all_reduce_sum, group_pass, held_rows, local, sharded_modules, sum_gradients,
                     write_point)
from .tasks import Task, batch_size, mean_loss, model_inputs

PAC_EPS = 1e-3  # Jiang et al.'s additive noise floor
KIND = {"worst": 1, "average": 2, "pac": 3}  # the generator streams, apart per measure


def rows(batch, lo: int, hi: int):
    """Examples lo..hi of a batch (a tuple or a dict of tensors)."""
    if isinstance(batch, dict):
        return {k: v[lo:hi] for k, v in batch.items()}
    return tuple(t[lo:hi] for t in batch)


def mean_and_se(values: list) -> tuple:
    """(mean, standard error of the mean) of a list of floats, in its order; se NaN for one."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    m = math.fsum(values) / n
    if n == 1:
        return m, math.nan
    return m, math.sqrt(math.fsum((v - m) ** 2 for v in values) / (n - 1) / n)


class Sharpness:
    """The measures above at the model's current parameters (θ), on fixed batches."""

    def __init__(self, model: nn.Module, batches: list, task: Optional[Task] = None, eta: float = 0.0,
                 should_stop: Callable = lambda: None, log: Callable = lambda m: None, every: float = 10.0,
                 group: Optional[GroupSpec] = None):
        """`group`: the rank group this one computes every measure with (its process group made,
        a shard group's model sharded already: evaluation/groups.py), or None alone."""
        import time
        self.model = model.eval()
        self.group = group if group is not None and group.size > 1 else None
        self.fsdp = sharded_modules(model)
        sum_gradients(model)  # each member's gradient summed into the rows, as one rank sums batches
        # progress: every `every` seconds a line with the measure under way (`stage`) and the passes
        self.log, self.every, self.stage = log, every, ""
        self.t0 = self.last = time.perf_counter()
        self.task = task or Task()
        self.batches = batches
        self.should_stop = should_stop
        params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
        if not params:
            raise ValueError("model: it has no floating-point parameters to perturb")
        self.names = list(params)
        self.shapes = {n: tuple(p.shape) for n, p in params.items()}  # (a DTensor's: the whole parameter's)
        self.count = sum(p.numel() for p in params.values())
        self.rows = {}  # a sharded parameter -> this member's rows of it (None: a 0-dim one, whole)
        for n, p in params.items():
            if hasattr(p, "to_local"):
                self.rows[n] = held_rows(n, local(p), p.shape[0], self.group) if p.dim() else None
            if self.group is not None:
                p.requires_grad_(True)  # (the group's gradient is the parameters' own)
        self.theta = {n: local(p).detach().clone() for n, p in params.items()}
        self.c = {n: t.abs() + eta for n, t in self.theta.items()}
        self.buffers = {n: b for n, b in model.named_buffers()}
        self.device = next(iter(self.theta.values())).device
        self.passes = 0  # forward passes over the batches, for the record
        self.base = self.loss()

    # ------------------------------------------------------------------ the loss
    def _terms(self, point: dict, batch) -> tuple:
        args, kwargs = model_inputs(batch)
        out = torch.func.functional_call(self.model, {**point, **self.buffers}, args, kwargs)
        return self.task.loss_terms(out, batch)

    def _passed(self) -> None:
        """One more pass over the batches; a stop asked for (SIGTERM: a Slurm time limit) ends the
        measures here, within one pass, with errors.Stopped."""
        import time
        self.passes += 1
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            self.log(f"sharpness: {self.stage + ', ' if self.stage else ''}{self.passes} passes over the examples, "
                     f"{now - self.t0:.0f} s")
        signum = self.should_stop()
        if signum is not None:
            raise Stopped(signum, f"stopped by signal {signum} during the sharpness measures ({self.passes} passes "
                                  "done); run the same command to compute them again")

    def loss(self, delta: Optional[dict] = None, sign: float = 1.0, batches=None) -> float:
        """L(θ + sign·δ), the mean over the batches (float64 sums of the float32 batch sums)."""
        batches = self.batches if batches is None else batches
        point = self.theta if delta is None else {n: self.theta[n] + sign * delta[n] for n in self.names}
        if self.group is not None:
            with torch.no_grad():
                value, _ = self._group_pass(point, batches, grad=False)
        else:
            value = mean_loss(lambda b: self._terms(point, b), batches)
        self._passed()
        return value

    # ------------------------------------------------------------------ in a rank group
    def _group_pass(self, point: dict, batches, grad: bool) -> tuple:
        """(L(point), ∇L(point) by parameter or None) with every member of the group."""
        write_point(self.model, self.names, point)
        return group_pass(self.model, self.names, batches, self.task, self.group, grad)

    def loss_and_grad(self, delta: dict, batches=None) -> tuple:
        """(L(θ + δ), ∇L(θ + δ) by parameter): the batches' summed losses backward one at a
        time (one batch's graph in memory), the gradient divided by the total weight last."""
        batches = self.batches if batches is None else batches
        if self.group is not None:
            value, grads = self._group_pass({n: self.theta[n] + delta[n] for n in self.names}, batches, grad=True)
            self._passed()
            return value, grads
        point = {n: (self.theta[n] + delta[n]).requires_grad_(True) for n in self.names}
        grads = {n: torch.zeros_like(t) for n, t in self.theta.items()}
        v = w = 0.0
        for b in batches:
            s, n = self._terms(point, b)
            gs = torch.autograd.grad(s, [point[k] for k in self.names], allow_unused=True)
            for k, g in zip(self.names, gs):
                if g is not None:
                    grads[k] += g
            v, w = v + float(s.detach()), w + float(n)
        self._passed()
        return v / w, {k: g / w for k, g in grads.items()}

    # ------------------------------------------------------------------ random vectors
    def _normal(self, seed: int, kind: str, index: int) -> dict:
        """Standard normal entries shaped like θ, drawn on the CPU (the same numbers on any
        device and rank) from the generator of (seed, kind, index); in a shard group each
        parameter is drawn whole in turn and this member's rows kept."""
        g = torch.Generator().manual_seed((seed * 1_000_003 + KIND[kind]) * 1_000_003 + index)
        out = {}
        for n, t in self.theta.items():
            z = torch.randn(self.shapes[n], generator=g, dtype=torch.float32)
            rows = self.rows.get(n)
            out[n] = (z[rows] if rows is not None else z).to(self.device, t.dtype)
        return out

    def _norm(self, vectors: dict) -> float:
        """‖v‖₂ over every entry: float64 sums of squares per parameter, added in parameter
        order; a shard group's row sums all-reduced first (each parameter's sum is then the
        whole parameter's, to float64 round-off)."""
        sums = torch.stack([vectors[n].double().square().sum() for n in self.names])
        if self.fsdp:
            all_reduce_sum(sums)
        return math.sqrt(sum(sums.tolist()))

    # ------------------------------------------------------------------ the measures
    def worst(self, rho: float, p: float = 2, steps: int = 20, restart: int = 0, seed: int = 0,
              batches=None) -> float:
        """The largest L(θ + c⊙u) − L(θ) met by projected gradient ascent over ‖u‖_p ≤ rho."""
        if p not in (2, math.inf):
            raise ValueError(f"p must be 2 or inf, got {p!r}")
        base = self.base if batches is None else self.loss(batches=batches)
        u = {n: torch.zeros_like(t) for n, t in self.theta.items()}
        if restart > 0:
            z = self._normal(seed, "worst", restart)
            if p == 2:  # a random point of the ball, half way out
                scale = rho / 2 / self._norm(z)
                u = {n: v * scale for n, v in z.items()}
            else:  # uniform in the cube, from the normal draw's CDF
                u = {n: rho * (2 * torch.special.ndtr(v) - 1) for n, v in z.items()}
        best = 0.0
        for t in range(steps):
            value, grad = self.loss_and_grad({n: self.c[n] * u[n] for n in self.names}, batches)
            best = max(best, value - base)
            gu = {n: self.c[n] * grad[n] for n in self.names}  # the gradient in u
            step = rho / 2 * (1 + math.cos(math.pi * t / steps)) / 2
            if p == 2:
                if not _l2_step(u, gu, step, rho, self._norm):
                    break
            else:
                for n in self.names:
                    u[n].add_(gu[n].sign(), alpha=step).clamp_(-rho, rho)
        last = self.loss({n: self.c[n] * u[n] for n in self.names}, batches=batches)
        return max(best, last - base)

    def average(self, rho: float, draw: int, seed: int = 0) -> float:
        """(L(θ + δ) + L(θ − δ))/2 − L(θ) for δ = rho c ⊙ z/‖z‖ of draw `draw`."""
        z = self._normal(seed, "average", draw)
        scale = rho / self._norm(z)
        delta = {n: self.c[n] * z[n] * scale for n in self.names}
        return (self.loss(delta) + self.loss(delta, -1.0)) / 2 - self.base

    def groups(self, m: int) -> list:
        """[(batch index, first example)] of every whole group of m examples in the batches."""
        return [(i, j * m) for i, b in enumerate(self.batches) for j in range(batch_size(b) // m)]

    def sam(self, group: int, m: int, rho: float, steps: int = 1) -> float:
        """SAM's sharpness of group `group` (of groups(m)): its largest L_S(θ + ε) − L_S(θ) over
        ‖ε‖₂ ≤ rho by `steps` normalized ascent steps, the first from θ."""
        i, lo = self.groups(m)[group]
        part = [rows(self.batches[i], lo, lo + m)]
        base = self.loss(batches=part)
        eps = {n: torch.zeros_like(t) for n, t in self.theta.items()}
        alpha = rho if steps == 1 else 2 * rho / steps  # several steps: the sphere by half way
        for _ in range(steps):
            _, grad = self.loss_and_grad(eps, part)
            if not _l2_step(eps, grad, alpha, rho, self._norm):
                break
        return self.loss(eps, batches=part) - base

    def pac_rise(self, sigma: float, draw: int, seed: int = 0, eps: float = PAC_EPS) -> float:
        """(L(θ + u) + L(θ − u))/2 − L(θ), u = sqrt(σ²θ² + ε²) ⊙ z of draw `draw`."""
        z = self._normal(seed, "pac", draw)
        u = {n: torch.sqrt(sigma * sigma * self.theta[n] ** 2 + eps * eps) * z[n] for n in self.names}
        return (self.loss(u) + self.loss(u, -1.0)) / 2 - self.base


def _l2_step(u: dict, grad: dict, step: float, rho: float, norm_of: Callable) -> bool:
    """u += step · grad/‖grad‖, then back onto the ℓ2 ball of radius rho (in place, over every
    entry at once; `norm_of`: the Sharpness's norm, over a group's rows). False, and u
    unchanged, when the gradient is zero."""
    norm = norm_of(grad)
    if norm == 0:
        return False
    for n in u:
        u[n].add_(grad[n], alpha=step / norm)
    size = norm_of(u)
    if size > rho:
        for v in u.values():
            v.mul_(rho / size)
    return True


def bisect_sigma(rise: Callable, threshold: float, tol: float = 0.01, start: float = 0.01,
                 limit: int = 60) -> dict:
    """The largest σ whose expected rise `rise(σ) -> (mean, se)` stays at or under `threshold`:
    a bracket [lo, hi] found by doubling or halving from `start`, then bisection in log σ until
    hi/lo <= 1 + tol. Returns {sigma: lo, rise and rise_se at lo, sigma_above: hi, evaluations}."""
    if threshold <= 0:
        raise ValueError(f"threshold must be positive, got {threshold!r}")
    seen = {}

    def f(s):
        seen[s] = rise(s)
        return seen[s][0]
    lo, hi = None, None
    s = start
    for _ in range(limit):  # the bracket
        if f(s) <= threshold:
            lo = s
            if hi is not None:
                break
            s *= 2
        else:
            hi = s
            if lo is not None:
                break
            s /= 2
    if lo is None or hi is None:
        return {"sigma": lo if lo is not None else math.nan, "sigma_above": hi if hi is not None else math.nan,
                "rise": seen[s][0], "rise_se": seen[s][1], "evaluations": len(seen), "bracketed": False}
    while hi / lo > 1 + tol:
        mid = math.sqrt(lo * hi)
        if f(mid) <= threshold:
            lo = mid
        else:
            hi = mid
    return {"sigma": lo, "sigma_above": hi, "rise": seen[lo][0], "rise_se": seen[lo][1],
            "evaluations": len(seen), "bracketed": True}
