"""Curvature of the loss: Hessian-vector products, extreme eigenvalues, the trace. No MPI, no HDF5.

    from lldist.evaluation.curvature import Curvature
    curv = Curvature(model, batches, task)          # the mean loss over these batches
    curv.at(params)                                 # any weights (default: the model's own)
    lam, vecs = curv.eigs(k=2, which="LA")          # top eigenpairs (scipy's Lanczos, eigsh)
    curv.trace(samples=64)                          # Hutchinson's estimator
    nodes, weights = curv.density(runs=4, steps=80)  # stochastic Lanczos quadrature

H v comes from double backward through `torch.func.functional_call` (the model's parameters
only; buffers, e.g. BatchNorm's running statistics, stay as the model holds them, in eval
mode). The eigen-solve is scipy's ARPACK Lanczos (`scipy.sparse.linalg.eigsh` on a
`LinearOperator`): a maintained, restarted Lanczos with deflation, better than a hand-written
power iteration (which converges slowly when the top eigenvalues are close and cannot find
the smallest algebraic eigenvalue without a shift). scipy comes with scikit-learn, already a
dependency. Only the products are written here, because no library computes them for an
arbitrary torch model; and the Lanczos recurrence of the spectral density, because it needs
the tridiagonal matrix itself (its eigenvectors' first components are the quadrature weights),
which eigsh keeps to itself. That Lanczos keeps every basis vector and re-orthogonalizes
against all of them (steps x parameters floats: 80 x 2.2M for MobileNetV2 is 0.7 GB), the
price of nodes that do not repeat as ghost eigenvalues.

The loss is the task's weighted mean over the given batches (the evaluation's own definition),
accumulated batch by batch, so memory is one batch's double backward.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from ..config import CurvatureConfig
from .tasks import Task, head, logits_of, mean_loss, model_inputs


ARPACK_BYTES = CurvatureConfig.basis_memory  # the Lanczos basis eigsh may keep by default (see Curvature.eigs)


class Watch:
    """What a long curvature computation does between Hessian-vector products: stop within one
    product when asked (SIGTERM: a Slurm time limit must not wait for a Lanczos run to end), and
    say how far it is every `every` seconds.

        curv = Curvature(model, batches, task, watch=Watch("hessian", should_stop, log))"""

    def __init__(self, what: str, should_stop=lambda: None, log=lambda m: None, every: float = 10.0):
        import time
        self.what, self.should_stop, self.log, self.every = what, should_stop, log, every
        self.t0 = self.last = time.perf_counter()
        self.stage = ""

    def __call__(self, products: int) -> None:
        import time
        signum = self.should_stop()
        if signum is not None:
            from ..errors import Stopped
            raise Stopped(signum, f"stopped by signal {signum} during the {self.what} ({products} Hessian-vector "
                                  "products done); run the same command to compute it again")
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            self.log(f"{self.what}: {self.stage + ', ' if self.stage else ''}{products} Hessian-vector products, "
                     f"{now - self.t0:.0f} s")


def first_batches(data, batch_size: int, n: int, dtype=torch.float32) -> list:
    """The first n batches of a split: the fixed sample every Hessian of a run is taken on."""
    return list(itertools.islice(data.batches(batch_size, dtype), n))


class Curvature:
    """Products of one curvature operator of the mean loss over fixed batches, and what is
    computed from them.

    `operator`: hessian | ggn | fisher (operators.py). `names`: the parameters it is taken in
    (default: all the model's; a block's for a per-block spectrum: the others are held).
    `watch`: called after every product with the count so far; it may raise (a stop request:
    errors.Stopped) and may report progress (see Watch). Over ranks, data_rows.DataRows wraps
    one, each rank computing `local` over its share of the batches (`mine`)."""

    def __init__(self, model: nn.Module, batches: list, task: Task = None, dtype=torch.float32, watch=None,
                 operator: str = "hessian", names=None, guard=None, basis_bytes: float = ARPACK_BYTES):
        from .attention import Guard
        from .operators import OPERATORS
        if operator not in OPERATORS:
            raise ValueError(f"operator {operator!r}: allowed {', '.join(OPERATORS)}")
        self.model = model.eval()
        self.watch = watch
        self.task = task or Task()
        self.batches = batches
        self.operator = operator
        self.basis_bytes = basis_bytes
        params = dict(model.named_parameters())
        self.names = list(names) if names is not None else list(params)
        unknown = [n for n in self.names if n not in params]
        if unknown:
            raise ValueError(f"names: {unknown[0]!r} is not a parameter of the model")
        self.shapes = [params[n].shape for n in self.names]
        self.sizes = [params[n].numel() for n in self.names]
        self.n = int(sum(self.sizes))
        self.dtype = dtype
        self.matvecs = 0
        self.mine = batches  # the batches `local` runs over (a rank's share: data_rows.py)
        # fused attention has no double backward: decided once, on two examples of the first batch
        self.guard = guard or Guard(model, lambda: self._forward(
            {n: p.detach() for n, p in params.items()}, head(batches[0], 2)))
        self.at(params)

    def at(self, params: dict) -> "Curvature":
        """The point the next products are taken at: {parameter name: tensor} (at least self.names;
        the model's other parameters are held at the values given, or the model's own)."""
        own = dict(self.model.named_parameters())
        self.point = {n: params[n].detach().to(self.dtype).clone().requires_grad_(True) for n in self.names}
        self.held = {n: (params[n] if n in params else p).detach().to(self.dtype)
                     for n, p in own.items() if n not in self.point}
        return self

    def _forward(self, params: dict, batch):
        args, kwargs = model_inputs(batch)
        return logits_of(functional_call(self.model, params, args, kwargs))

    def _sum_and_weight(self, params: dict, batch):
        return self.task.loss_terms(self._forward({**self.held, **params}, batch), batch)

    def loss(self) -> float:
        return mean_loss(lambda b: self._sum_and_weight(self.point, b), self.batches)

    def _flat(self, tensors) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    def _split(self, v: torch.Tensor) -> list:
        return [c.view(s) for c, s in zip(torch.split(v, self.sizes), self.shapes)]

    def local(self, v: torch.Tensor, out: torch.Tensor = None) -> tuple:
        """(Σ over this rank's batches of the summed-loss operator times v, float64; their weight).
        `out`: a float64 buffer of at least n entries to sum into (its first n; data_rows.py's
        padded layout), instead of a new one."""
        from .operators import product
        vs = dict(zip(self.names, self._split(v.to(self.dtype))))
        # (zeros when this rank has no batch: more ranks than batches)
        acc = out[:self.n].zero_() if out is not None else torch.zeros(self.n, dtype=torch.float64, device=v.device)
        total_w = 0.0
        with self.guard():
            for b in self.mine:
                out_b, w = product(self.operator, lambda q, b=b: self._forward({**self.held, **q}, b), self.point, vs,
                                   self.task, b)
                # float64 sums: the order of the batches' terms (which rank took which) moves the
                # result by float64 round-off only (products over N ranks: data_rows.py); added
                # parameter by parameter into place, never flattened whole in float32 first
                for o, piece in zip(out_b, torch.split(acc, self.sizes)):
                    piece.add_(o.detach().reshape(-1))
                del out_b
                total_w += float(w)
        return acc, total_w

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """The operator times a flat vector v over self.names (H v for the Hessian)."""
        acc, total_w = self.local(v)
        self.matvecs += 1
        if self.watch is not None:
            self.watch(self.matvecs)
        return (acc / total_w).to(self.dtype)

    def matvec(self, v: np.ndarray) -> np.ndarray:
        device = self.point[self.names[0]].device
        out = self.hvp(torch.as_tensor(np.asarray(v).reshape(-1), dtype=self.dtype, device=device))
        return out.double().cpu().numpy()

    def eigs(self, k: int = 1, which: str = "LA", tol: float = 1e-4, seed: int = 0, maxiter: int = None,
             shift: float = None):
        """k eigenpairs: which="LA" the largest, "SA" the smallest (algebraic), "BE" from both
        ends. Returns (eigenvalues descending for LA / ascending otherwise, eigenvectors as (n, k) float64 columns
        of unit norm). The start vector is seeded, so results repeat exactly. `shift`: those of
        shift*I - A instead (see smallest)."""
        from scipy.sparse.linalg import LinearOperator, eigsh
        mv = self.matvec if shift is None else (lambda v: shift * np.asarray(v).reshape(-1) - self.matvec(v))
        op = LinearOperator((self.n, self.n), matvec=mv, dtype=np.float64)
        v0 = np.random.default_rng(seed).standard_normal(self.n)
        # ARPACK keeps ncv float64 vectors of n: 20 of them for a 124M-parameter model is 20 GB,
        # so a large model gets fewer (at least 2k+1; more restarts, the same eigenvalues)
        ncv = min(self.n, max(2 * k + 1, min(20, int(self.basis_bytes // (8 * self.n)))))
        vals, vecs = eigsh(op, k=k, which=which, tol=tol, v0=v0, ncv=ncv, maxiter=maxiter or 50 * self.n)
        order = np.argsort(vals)[::-1] if which == "LA" else np.argsort(vals)
        return vals[order], vecs[:, order]

    def extremes(self, tol: float = 1e-3, seed: int = 0) -> tuple:
        """(lambda_max, lambda_min): the largest and the smallest (most negative) eigenvalue,
        from ONE Lanczos run for both ends of the spectrum (eigsh's which="BE"): on the digits
        models it needed 27-50% fewer Hessian-vector products than a run per end, with the
        same eigenvalues to six digits."""
        if self.operator != "hessian":  # semidefinite: see smallest()
            hi = float(self.eigs(1, "LA", tol, seed)[0][0])
            return hi, self.smallest(tol, seed, hi)
        if self.n < 4:  # BE with k=2 needs room for its Krylov space
            return float(self.eigs(1, "LA", tol, seed)[0][0]), float(self.eigs(1, "SA", tol, seed)[0][0])
        vals, _ = self.eigs(2, "BE", tol, seed)
        return float(vals.max()), float(vals.min())

    def smallest(self, tol: float = 1e-4, seed: int = 0, top: float = None) -> float:
        """The smallest eigenvalue. The GGN and the Fisher are positive semidefinite with a rank
        at most examples x outputs: a large cluster at zero, where asking Lanczos for the smallest
        (relative accuracy of a number near 0) never converges. For them it is top - (the largest
        eigenvalue of top*I - A): the same number, accurate relative to the top eigenvalue."""
        if self.operator == "hessian" or self.n < 2:
            return float(self.eigs(1, "SA", tol, seed)[0][0])
        top = float(self.eigs(1, "LA", tol, seed)[0][0]) if top is None else top
        return top - float(self.eigs(1, "LA", tol, seed, shift=top)[0][0])

    def trace(self, samples: int = 64, seed: int = 0, blocks: dict = None):
        """Hutchinson's estimate of tr(H) with Rademacher vectors: (mean, standard error).

        `blocks` ({name: [parameter names]}): also each block's trace tr(H_BB), from the same
        products: z_Bᵀ(H z)_B = z_Bᵀ H_BB z_B + Σ_{C≠B} z_Bᵀ H_BC z_C, and the second term has mean
        zero (z_B is independent of z_C), so it is unbiased, at no extra product (a block's own
        products would cost a pass each); its standard error, from the same samples, includes
        the cross terms' spread. Then returns ((mean, stderr), {name: (mean, stderr)})."""
        g = torch.Generator().manual_seed(seed)
        device = self.point[self.names[0]].device
        offsets = dict(zip(self.names, np.cumsum([0] + self.sizes[:-1]).tolist()))
        size = dict(zip(self.names, self.sizes))
        idx = {b: torch.cat([torch.arange(offsets[n], offsets[n] + size[n]) for n in ps]).to(device)
               for b, ps in (blocks or {}).items()}
        est, per = [], {b: [] for b in idx}
        for _ in range(samples):
            z = (torch.randint(0, 2, (self.n,), generator=g) * 2 - 1).to(self.dtype).to(device)
            zhz = z * self.hvp(z)
            est.append(float(zhz.sum()))
            for b, i in idx.items():
                per[b].append(float(zhz[i].sum()))

        mean_err = mean_and_stderr
        if blocks is None:
            return mean_err(est)
        return mean_err(est), {b: mean_err(v) for b, v in per.items()}

    def density(self, runs: int = 4, steps: int = 80, seed: int = 0) -> tuple:
        """The eigenvalue density by stochastic Lanczos quadrature (Ubaru, Chen and Saad 2017;
        Ghorbani et al. 2019): for each of `runs` Gaussian start vectors v, `steps` Lanczos steps
        give a tridiagonal T whose eigenvalues (nodes) and squared first eigenvector components
        (weights, summing to 1) form the Gauss quadrature of v'f(H)v/v'v, exact for polynomials
        f of degree < 2 steps. Averaged over v it estimates (1/n) sum_i f(lambda_i): the density
        is sum over runs and nodes of weight/runs at each node, smoothed for a picture by
        `analysis.spectrum.smoothed_density`. Returns (nodes, weights), each (runs, steps) float64; a run that
        exhausts its Krylov space early pads with weight 0."""
        g = torch.Generator().manual_seed(seed)
        device = self.point[self.names[0]].device
        steps = min(steps, self.n)
        nodes, weights = np.zeros((runs, steps)), np.zeros((runs, steps))
        for r in range(runs):
            v0 = torch.randn(self.n, generator=g, dtype=torch.float64).to(self.dtype).to(device)
            t_nodes, t_weights = lanczos_quadrature(self.hvp, v0, steps)
            nodes[r, :len(t_nodes)], weights[r, :len(t_nodes)] = t_nodes, t_weights
        return nodes, weights

    def as_state(self, vec: np.ndarray, theta: dict) -> dict:
        """A flat parameter vector as a direction over the float state: zero on buffers."""
        parts = dict(zip(self.names, self._split(torch.as_tensor(vec, dtype=torch.float64))))
        return {n: (parts[n].to(w.dtype).cpu().clone() if n in parts else torch.zeros_like(w)) for n, w in theta.items()}


def mean_and_stderr(x) -> tuple:
    """(mean, standard error of the mean) of a trace's samples; NaN error for one."""
    x = np.array(x)
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def lanczos_quadrature(matvec, v0: torch.Tensor, steps: int) -> tuple:
    """Gauss quadrature of the spectral measure of a symmetric operator at v0: (nodes, weights),
    the eigenvalues of the Lanczos tridiagonal T and the squares of its eigenvectors' first
    components. Full re-orthogonalization (twice, classical Gram-Schmidt) keeps the basis
    orthogonal in float32; the recurrence stops early when the Krylov space is exhausted."""
    from scipy.linalg import eigh_tridiagonal
    v = v0 / torch.linalg.vector_norm(v0)
    basis = [v]
    alpha, beta = [], []
    for j in range(steps):
        w = matvec(v)
        a = float(torch.dot(w, v))
        alpha.append(a)
        if j == steps - 1:
            break
        V = torch.stack(basis)
        w = w - a * v - (beta[-1] * basis[-2] if beta else 0)
        for _ in range(2):
            w = w - V.T @ (V @ w)
        b = float(torch.linalg.vector_norm(w))
        if b <= 1e-6 * max(abs(x) for x in alpha) or not np.isfinite(b):
            break  # an invariant subspace: T is exact
        beta.append(b)
        v = w / b
        basis.append(v)
    vals, vecs = eigh_tridiagonal(np.array(alpha), np.array(beta[:len(alpha) - 1]))
    return vals, vecs[0] ** 2
