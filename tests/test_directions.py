"""Filter-wise normalization (Li et al. 2018): norms per filter, ignored entries, seeds, cosine."""

import pytest
import torch

from lldist.config import DirectionsConfig, ModelConfig
from lldist.directions.random import make_directions
from lldist.directions.state import cosine, model_state
from lldist.workloads.models import build_model


@pytest.fixture
def cnn():
    return build_model(ModelConfig(name="cnn", args={"width": 6, "stages": 2}), (1, 8, 8), 10)


def test_filter_norm_matches_theta_per_filter(cnn):
    theta, kinds = model_state(cnn)
    d = make_directions(theta, kinds, DirectionsConfig(seed=5, norm="filter", ignore="biasbn"), 2)
    n_weights = 0
    for axis in ("x", "y"):
        for name, w in theta.items():
            dv = getattr(d, axis)[name]
            assert dv.shape == w.shape and dv.dtype == w.dtype
            if kinds[name] == "weight":
                n_weights += 1
                # every filter (index along dim 0) has the norm of the same filter in theta
                torch.testing.assert_close(dv.flatten(1).norm(dim=1), w.flatten(1).norm(dim=1), rtol=1e-6, atol=1e-7)
            else:  # biases, BatchNorm affine parameters and running statistics
                assert torch.count_nonzero(dv) == 0
    assert n_weights >= 2 * 5  # conv and linear weights both covered
    assert any(k == "buffer" for k in kinds.values()) and any(k == "vector" for k in kinds.values())


def test_include_biasbn_normalizes_vectors(cnn):
    theta, kinds = model_state(cnn)
    d = make_directions(theta, kinds, DirectionsConfig(seed=5, norm="filter", ignore="none"), 1).x
    for name, w in theta.items():
        if kinds[name] == "vector":
            torch.testing.assert_close(d[name].norm(), w.norm(), rtol=1e-6, atol=1e-7)
        if kinds[name] == "buffer":
            assert torch.count_nonzero(d[name]) == 0


def test_layer_and_weight_norms(cnn):
    theta, kinds = model_state(cnn)
    lay = make_directions(theta, kinds, DirectionsConfig(seed=1, norm="layer"), 1).x
    wt = make_directions(theta, kinds, DirectionsConfig(seed=1, norm="weight"), 1).x
    raw = make_directions(theta, kinds, DirectionsConfig(seed=1, norm="none"), 1).x
    for name, w in theta.items():
        if kinds[name] == "weight":
            torch.testing.assert_close(lay[name].norm(), w.norm(), rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(wt[name], raw[name] * w)  # same draw, scaled by theta


def test_same_seed_same_directions_other_seed_differs(cnn):
    theta, kinds = model_state(cnn)
    a = make_directions(theta, kinds, DirectionsConfig(seed=7), 2)
    b = make_directions(theta, kinds, DirectionsConfig(seed=7), 2)
    c = make_directions(theta, kinds, DirectionsConfig(seed=8), 2)
    for ax in ("x", "y"):
        for n in theta:
            assert torch.equal(getattr(a, ax)[n], getattr(b, ax)[n])
    name = next(n for n in theta if kinds[n] == "weight")
    assert not torch.equal(a.x[name], c.x[name])
    assert not torch.equal(a.x[name], a.y[name])
    # independent Gaussian directions in many dimensions are nearly orthogonal
    assert abs(cosine(a.x, a.y)) < 0.2
    assert cosine(a.x, a.x) == pytest.approx(1.0)


def test_target_direction_is_difference(cnn):
    theta, kinds = model_state(cnn)
    other = {k: v + torch.randn_like(v) for k, v in theta.items()}
    d = make_directions(theta, kinds, DirectionsConfig(seed=0), 1, theta_target=other).x
    for n in theta:
        torch.testing.assert_close(theta[n] + d[n], other[n])


def test_transposed_convolutions_are_normalized_per_output_channel():
    """ConvTranspose2d stores (in, out, kh, kw): its filters (output channels) run along dim 1."""
    import torch
    model = torch.nn.Sequential(torch.nn.ConvTranspose2d(3, 5, 3), torch.nn.Conv2d(5, 4, 3))
    theta, kinds = model_state(model)
    assert kinds["0.weight"] == "weight_t" and kinds["1.weight"] == "weight"
    d = make_directions(theta, kinds, DirectionsConfig(seed=2), 1).x
    per_out = lambda t: t.transpose(0, 1).flatten(1).norm(dim=1)  # noqa: E731
    torch.testing.assert_close(per_out(d["0.weight"]), per_out(theta["0.weight"]), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(d["1.weight"].flatten(1).norm(dim=1), theta["1.weight"].flatten(1).norm(dim=1),
                               rtol=1e-5, atol=1e-7)
