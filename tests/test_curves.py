"""Curves between minima (issue 23, part 2; work in progress): the parameterization is exact at
both ends, the bend alone trains, and BatchNorm statistics are recomputed for the weights set."""

import torch
from torch import nn

from lldist.evaluation.curves import CurveModel, coefficients, point, update_bn


def states(seed):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    return m, {k: v.clone() for k, v in m.state_dict().items() if v.is_floating_point()}


def test_the_ends_are_the_two_models_bit_for_bit():
    _, a = states(0)
    _, b = states(1)
    _, bend = states(2)
    for kind in ("bezier", "polychain"):
        assert all(torch.equal(v, a[k]) for k, v in point(kind, 0.0, a, bend, b).items())
        assert all(torch.equal(v, b[k]) for k, v in point(kind, 1.0, a, bend, b).items())
    assert all(torch.equal(v, bend[k]) for k, v in point("polychain", 0.5, a, bend, b).items())
    assert coefficients("bezier", 0.5) == (0.25, 0.5, 0.25)


def test_only_the_bend_trains_and_it_moves():
    model, a = states(0)
    _, b = states(1)
    cm = CurveModel(model, a, b, "bezier", seed=0)
    assert {n for n, p in cm.named_parameters() if p.requires_grad} == {f"bend.{k.replace('.', '__')}" for k in cm.names}
    before = cm.bend_state()
    opt = torch.optim.SGD([p for p in cm.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    cm.train()
    for _ in range(5):
        loss = nn.functional.cross_entropy(cm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = cm.bend_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in model.parameters())  # the ends' model is held


def test_update_bn_gives_the_statistics_of_the_data_at_the_weights_set():
    model, _ = states(0)
    x = torch.randn(64, 4)
    update_bn(model, [(x[:32],), (x[32:],)])
    h = model[0](x)
    bn = model[1]
    torch.testing.assert_close(bn.running_mean, h.mean(0), rtol=1e-5, atol=1e-6)
    # the cumulative average of the two batches' unbiased variances
    v = (h[:32].var(0, unbiased=True) + h[32:].var(0, unbiased=True)) / 2
    torch.testing.assert_close(bn.running_var, v, rtol=1e-5, atol=1e-6)
    assert not model.training
