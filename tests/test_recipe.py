"""Directions by recipe (directions/recipe.py): any rank makes exactly its rows, bit for bit
what the whole direction holds; nothing but the row's own seed, axis and name decides them;
parameter subsets move only what they choose, filter-normalized."""

import math

import pytest
import torch
from torch import nn

from lldist.config import DirectionsConfig
from lldist.directions.random import make_directions
from lldist.directions.recipe import Recipe, direction
from lldist.directions.state import model_state


class Net(nn.Module):
    def __init__(self, extra=False):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.conv = nn.Conv2d(3, 7, 3)
        self.up = nn.ConvTranspose2d(7, 5, 3)  # weight_t: filters along dim 1
        self.bn = nn.BatchNorm2d(5)
        self.fc = nn.Linear(6, 13)
        if extra:
            self.head = nn.Linear(13, 4)


def shard_rows(n: int, k: int, m: int) -> slice:
    """The rows member m of k holds when dim 0 is split as torch.chunk splits it (FSDP2's way):
    ceil(n/k) rows each, fewer (or none) at the end."""
    size = math.ceil(n / k)
    return slice(min(n, m * size), min(n, (m + 1) * size))


@pytest.mark.parametrize("norm", ["filter", "layer", "weight", "none"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_every_shard_is_its_rows_of_the_whole(norm, k):
    torch.manual_seed(0)
    theta, kinds = model_state(Net())
    assert kinds["up.weight"] == "weight_t"
    recipe = Recipe(seed=5, norm=norm, ignore="none")
    whole = direction(theta, kinds, recipe, "y")
    for name, w in theta.items():
        parts = [direction({name: w}, kinds, recipe, "y", rows={name: shard_rows(w.shape[0], k, m)})[name]
                 for m in range(k)] if w.dim() else [whole[name]]
        assert torch.equal(torch.cat(parts) if w.dim() else parts[0], whole[name]), (name, k, norm)
    # and the whole is what make_directions gives a job, filter-normalized per output unit
    d = make_directions(theta, kinds, DirectionsConfig(seed=5, norm=norm, ignore="none"), 2).y
    assert all(torch.equal(d[n], whole[n]) for n in theta)
    if norm == "filter":
        torch.testing.assert_close(d["up.weight"].transpose(0, 1).flatten(1).norm(dim=1),
                                   theta["up.weight"].transpose(0, 1).flatten(1).norm(dim=1), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(d["fc.weight"].norm(dim=1), theta["fc.weight"].norm(dim=1), rtol=1e-5, atol=1e-7)


def test_a_direction_depends_only_on_its_own_seed_axis_and_name():
    torch.manual_seed(0)
    small = model_state(Net())
    torch.manual_seed(0)
    big = model_state(Net(extra=True))  # one more layer: the others' directions do not move
    cfg = DirectionsConfig(seed=3)
    a, b = make_directions(*small, cfg, 2), make_directions(*big, cfg, 2)
    for n in small[0]:
        assert torch.equal(a.x[n], b.x[n]) and torch.equal(a.y[n], b.y[n])
    reordered = dict(reversed(list(small[0].items())))
    c = make_directions(reordered, small[1], cfg, 2)
    assert all(torch.equal(c.x[n], a.x[n]) for n in small[0])
    one = make_directions(*small, cfg, 1)  # a 1D job shares x with the 2D job
    assert all(torch.equal(one.x[n], a.x[n]) for n in small[0])
    other = make_directions(*small, DirectionsConfig(seed=4), 2)
    assert not torch.equal(other.x["fc.weight"], a.x["fc.weight"])
    assert not torch.equal(a.x["fc.weight"], a.y["fc.weight"])  # x and y differ


def test_rows_are_unrelated_draws():
    """Neighbouring rows (seeds differing in the row index alone) are independent: no row repeats
    or follows another's stream."""
    d = direction({"w": torch.ones(64, 256)}, {"w": "weight"}, Recipe(seed=0, norm="none"), "x")["w"]
    c = torch.corrcoef(d)
    off = c - torch.eye(64)
    assert off.abs().max() < 0.3 and abs(float(d.mean())) < 0.02 and abs(float(d.std()) - 1) < 0.02


def test_a_subset_moves_only_what_it_chooses():
    torch.manual_seed(0)
    model = Net()
    model.conv.weight.requires_grad_(False)
    theta, kinds = model_state(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    cases = [({"include": ["^fc\\.", "emb"]}, {"fc.weight", "emb.weight"}),
             ({"exclude": ["conv", "up"]}, {"emb.weight", "fc.weight"}),
             ({"trainable_only": True}, {"emb.weight", "up.weight", "fc.weight"})]
    full = make_directions(theta, kinds, DirectionsConfig(seed=2), 2)
    for params, chosen in cases:
        d = make_directions(theta, kinds, DirectionsConfig(seed=2, params=params), 2, trainable=trainable)
        for axis in ("x", "y"):
            for n in theta:
                if n in chosen:  # the same values as without the subset: normalized as ever
                    assert torch.equal(getattr(d, axis)[n], getattr(full, axis)[n]) and getattr(d, axis)[n].any(), (params, n)
                else:
                    assert not getattr(d, axis)[n].any(), (params, n)
        torch.testing.assert_close(d.x["fc.weight"].norm(dim=1), theta["fc.weight"].norm(dim=1),
                                   rtol=1e-5, atol=1e-7)


def test_a_target_with_a_subset_moves_only_the_chosen_parameters():
    torch.manual_seed(0)
    theta, kinds = model_state(Net())
    torch.manual_seed(1)
    other = model_state(Net())[0]
    d = make_directions(theta, kinds, DirectionsConfig(seed=0, params={"include": ["fc"]}), 1, other)
    for n, w in theta.items():
        moved = torch.lerp(w, d.target[n], 1.0)
        assert torch.equal(moved, other[n] if n.startswith("fc") else w), n
    everything = make_directions(theta, kinds, DirectionsConfig(seed=0), 1, other)  # no subset: all, buffers too
    assert all(torch.equal(everything.target[n], other[n]) for n in theta)


def test_a_shards_rows_are_checked_by_their_sums_over_the_group():
    """directions.kinds.check_rows: each rank's rows' float64 sums, added over the group, give the sum the
    file keeps (k = 3, uneven rows); a stream that is not the file's (another seed here, another
    torch's generator in life) is refused by name."""
    from types import SimpleNamespace

    from lldist.directions.recipe import summarize, to_dict
    from lldist.errors import UserError
    from lldist.directions.kinds import check_rows
    from lldist.directions.record import Directions
    torch.manual_seed(0)
    theta, kinds = model_state(Net())
    recipe = Recipe(seed=5, ignore="none")
    stored = Directions(recipe=to_dict(recipe), summary=summarize(theta, kinds, recipe, ("x", "y")))
    job, loaded = SimpleNamespace(output="r.h5"), SimpleNamespace(theta=theta)
    k = 3

    def shards(rec):
        out = []
        for m in range(k):
            rows = {n: shard_rows(w.shape[0], k, m) for n, w in theta.items() if w.dim()}
            out.append((rows, Directions(**{a: direction(theta, kinds, rec, a, rows) for a in ("x", "y")})))
        return out

    def check_all(parts):
        # the group's all-reduce: per axis (x, then y), each sharded entry's rows summed on
        # every rank, added up
        names = sorted(parts[0][0])
        totals = [torch.tensor([sum(float(getattr(d, a)[n].double().sum()) for _, d in parts) for n in names],
                               dtype=torch.float64) for a in ("x", "y")]
        for rows, dirs in parts:
            calls = iter(totals)
            check_rows(dirs, stored, job, loaded, rows, lambda t: next(calls))

    check_all(shards(recipe))  # the file's recipe: agrees
    with pytest.raises(UserError, match=r"direction x of \S+ regenerated"):
        check_all(shards(Recipe(seed=6, ignore="none")))
