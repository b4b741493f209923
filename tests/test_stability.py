"""The stability thresholds (analysis/stability.py) against PyTorch's own optimizers: each is the
curvature of a quadratic on which the real optimizer, just below it, converges, and just above
it, diverges; Adam's preconditioner is the one its real step divides by."""

import pytest
import torch

from lldist.analysis.stability import Optimizer, preconditioner, ratio, threshold


def grows(make, a: float, steps: int = 3000) -> bool:
    """Whether the optimizer made by make([x]) diverges on f(x) = a x² / 2 from x = 1."""
    x = torch.ones(1, dtype=torch.float64, requires_grad=True)
    opt = make([x])
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * a * x ** 2).sum().backward()
        opt.step()
    return not abs(float(x.detach())) < 1  # (NaN once it overflows)


@pytest.mark.parametrize("kw", [{}, {"momentum": 0.9}, {"momentum": 0.5, "dampening": 0.3},
                                {"momentum": 0.9, "nesterov": True}])
def test_each_sgd_threshold_is_where_torchs_sgd_diverges(kw):
    lr = 0.1
    edge = threshold(Optimizer("sgd", lr, **kw))
    assert not grows(lambda p: torch.optim.SGD(p, lr=lr, **kw), 0.99 * edge)
    assert grows(lambda p: torch.optim.SGD(p, lr=lr, **kw), 1.01 * edge)


def test_hand_computed_thresholds():
    assert threshold(Optimizer("sgd", 0.01)) == pytest.approx(200)
    assert threshold(Optimizer("sgd", 0.01, momentum=0.9)) == pytest.approx(380)
    assert threshold(Optimizer("adam", 0.01)) == pytest.approx(3800)  # Cohen et al. 2022's 38/η
    assert ratio(100.0, Optimizer("sgd", 0.01)) == pytest.approx(0.5)


def test_adams_preconditioner_is_what_its_step_divides_by_and_its_threshold_bounds_the_frozen_iteration():
    torch.manual_seed(0)
    lr, b1, b2, eps = 1e-2, 0.9, 0.99, 1e-8
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([x], lr=lr, betas=(b1, b2), eps=eps)
    rec = Optimizer("adam", lr, beta1=b1, beta2=b2, eps=eps)
    for t in range(1, 8):
        x.grad = torch.randn(5, dtype=torch.float64)
        before = x.detach().clone()
        opt.step()
        st = opt.state[x]
        p = preconditioner(st["exp_avg_sq"], rec, t)
        torch.testing.assert_close(before - x.detach(), lr * st["exp_avg"] / p, rtol=1e-12, atol=0)
    # the iteration x <- x - lr P^-1 m, m <- b1 m + (1 - b1) H x, P held: stable iff λ(P^-1 H) < threshold
    P, edge = 3.0, threshold(rec)

    def frozen(a):
        xx, m = 1.0, 0.0
        for _ in range(5000):
            m = b1 * m + (1 - b1) * a * xx
            xx -= lr * m / P
        return not abs(xx) < 1  # (NaN once it overflows)
    assert not frozen(0.97 * edge * P) and frozen(1.03 * edge * P)


def test_records_are_read_and_bad_ones_refused():
    assert Optimizer.of({"class": "AdamW", "lr": 3e-4, "betas": [0.8, 0.95]}) == \
        Optimizer("adam", 3e-4, beta1=0.8, beta2=0.95)
    assert Optimizer.of({"class": "SGD", "lr": 0.1, "momentum": 0.9, "nesterov": True}).nesterov
    with pytest.raises(ValueError, match="kind 'rmsprop'"):
        Optimizer.of({"class": "RMSprop", "lr": 0.1})
    with pytest.raises(ValueError, match="lr must be positive"):
        Optimizer("sgd", 0.0)
    with pytest.raises(ValueError, match="step must be at least 1"):
        preconditioner(1.0, Optimizer("adam", 0.1), 0)
