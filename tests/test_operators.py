"""The curvature operators, blocks and the attention fallback against matrices built by hand:
the GGN from the outputs' Jacobian and the loss's Hessian in the outputs, the empirical
Fisher from per-example gradients one at a time, block spectra from sub-blocks of the exact
Hessian, and a one-layer transformer's Hessian by torch.autograd.functional.hessian in float64."""

import numpy as np
import pytest
import torch
from test_curvature import full_hessian, small_model_and_batches
from torch import nn

from lldist.evaluation.attention import Guard
from lldist.evaluation.blocks import blocks
from lldist.evaluation.curvature import Curvature
from lldist.evaluation.tasks import Task


def _flat_fn(model, names):
    base = dict(model.named_parameters())
    shapes = [base[n].shape for n in names]
    sizes = [base[n].numel() for n in names]

    def unflat(flat):
        return dict(zip(names, (p.view(s) for p, s in zip(torch.split(flat, sizes), shapes))))
    flat = torch.cat([base[n].detach().reshape(-1) for n in names])
    return unflat, flat


def explicit_ggn(model, batches):
    """(1/N) Σ_b J_bᵀ H_out,b J_b: J by autograd.functional.jacobian of the outputs, H_out of the
    summed cross-entropy in the outputs by autograd.functional.hessian, per batch."""
    names = [n for n, _ in model.named_parameters()]
    unflat, flat = _flat_fn(model, names)
    G, N = 0, 0
    for x, y in batches:
        J = torch.autograd.functional.jacobian(lambda f: torch.func.functional_call(model, unflat(f), (x,)), flat)
        J = J.reshape(-1, flat.numel()).double()
        out = torch.func.functional_call(model, unflat(flat), (x,)).detach()
        Ho = torch.autograd.functional.hessian(
            lambda o: nn.functional.cross_entropy(o.view(out.shape), y, reduction="sum"), out.reshape(-1)).double()
        G = G + J.T @ Ho @ J
        N += len(y)
    return (G / N).numpy()


def explicit_fisher(model, batches):
    """(1/N) Σ_i g_i g_iᵀ with g_i each example's own gradient, one backward per example."""
    names = [n for n, _ in model.named_parameters()]
    unflat, flat = _flat_fn(model, names)
    F, N = 0, 0
    for x, y in batches:
        for i in range(len(y)):
            f = flat.clone().requires_grad_(True)
            loss = nn.functional.cross_entropy(torch.func.functional_call(model, unflat(f), (x[i:i + 1],)), y[i:i + 1])
            (g,) = torch.autograd.grad(loss, f)
            F = F + torch.outer(g, g).double()
            N += 1
    return (F / N).numpy()


@pytest.mark.parametrize("operator,build", [("ggn", explicit_ggn), ("fisher", explicit_fisher)])
def test_ggn_and_fisher_equal_the_explicit_matrices(operator, build):
    m, batches = small_model_and_batches(2)
    M = build(m, batches)
    ev = np.linalg.eigvalsh(M)
    assert ev[0] > -1e-6 * ev[-1]  # positive semidefinite, as both must be
    c = Curvature(m, batches, Task(), operator=operator)
    v = np.random.default_rng(0).standard_normal(c.n)
    np.testing.assert_allclose(c.matvec(v), M @ v, rtol=1e-4, atol=1e-6)
    vals, _ = c.eigs(k=3, which="LA", tol=1e-10)
    np.testing.assert_allclose(vals, ev[::-1][:3], rtol=1e-5)
    # and they are not the Hessian: the Hessian of this model is indefinite
    H = full_hessian(m, batches)
    assert np.linalg.eigvalsh(H)[0] < -1e-4 and not np.allclose(M, H, atol=1e-4)


def test_fisher_of_a_weighted_loss_weights_the_examples():
    """A loss that gives weights (a sequence's tokens): F = Σ w_i g_i g_iᵀ / Σ w_i, g_i the
    gradient of example i's own mean loss."""
    m, batches = small_model_and_batches(3)
    wts = torch.arange(1, 51, dtype=torch.float32) % 4 + 1

    def loss(out, batch):
        x, y = batch
        w = wts[:len(y)] if len(y) == 32 else wts[32:]
        return nn.functional.cross_entropy(out, y, reduction="none") * w, w
    names = [n for n, _ in m.named_parameters()]
    unflat, flat = _flat_fn(m, names)
    F, W = 0, 0
    for b, (x, y) in enumerate(batches):
        w = wts[:32] if b == 0 else wts[32:]
        for i in range(len(y)):
            f = flat.clone().requires_grad_(True)
            li = nn.functional.cross_entropy(torch.func.functional_call(m, unflat(f), (x[i:i + 1],)), y[i:i + 1])
            (g,) = torch.autograd.grad(li, f)
            F, W = F + float(w[i]) * torch.outer(g, g).double(), W + float(w[i])
    F = (F / W).numpy()
    c = Curvature(m, batches, Task(loss), operator="fisher")
    v = np.random.default_rng(1).standard_normal(c.n)
    np.testing.assert_allclose(c.matvec(v), F @ v, rtol=1e-4, atol=1e-6)


def test_block_spectra_are_the_exact_sub_blocks():
    m, batches = small_model_and_batches(4)
    H = full_hessian(m, batches)
    names = [n for n, _ in m.named_parameters()]
    sizes = [p.numel() for _, p in m.named_parameters()]
    offsets = dict(zip(names, np.cumsum([0] + sizes[:-1])))
    spec = blocks(m, "layers")
    assert spec == {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]}
    assert blocks(m, {"weights": r"weight$", "first_bias": r"^0\.bias"}) == {
        "weights": ["0.weight", "2.weight"], "first_bias": ["0.bias"]}
    for b, ps in spec.items():
        idx = np.concatenate([np.arange(offsets[n], offsets[n] + dict(zip(names, sizes))[n]) for n in ps])
        Hb = H[np.ix_(idx, idx)]
        c = Curvature(m, batches, Task(), names=ps)
        top = float(c.eigs(1, "LA", tol=1e-10)[0][0])
        assert top == pytest.approx(np.linalg.eigvalsh(Hb)[-1], rel=1e-5)
        # Hutchinson on the block: the same Rademacher vectors through the sub-block by hand,
        # and within its stated error of the exact trace
        tr, err = c.trace(samples=300, seed=2)
        g = torch.Generator().manual_seed(2)
        zs = [(torch.randint(0, 2, (c.n,), generator=g) * 2 - 1).double().numpy() for _ in range(300)]
        assert tr == pytest.approx(np.mean([z @ Hb @ z for z in zs]), rel=1e-4)
        assert abs(tr - np.trace(Hb)) < 4 * err
    # the blocks' traces from the whole model's own Hutchinson products: z_Bᵀ(H z)_B, unbiased
    c = Curvature(m, batches, Task())
    (tr, err), per = c.trace(samples=300, seed=3, blocks=spec)
    g = torch.Generator().manual_seed(3)
    zs = [(torch.randint(0, 2, (c.n,), generator=g) * 2 - 1).double().numpy() for _ in range(300)]
    assert tr == pytest.approx(np.mean([z @ H @ z for z in zs]), rel=1e-4)
    for b, ps in spec.items():
        idx = np.concatenate([np.arange(offsets[n], offsets[n] + dict(zip(names, sizes))[n]) for n in ps])
        by_hand = np.mean([z[idx] @ (H @ z)[idx] for z in zs])
        assert per[b][0] == pytest.approx(by_hand, rel=1e-4)
        assert abs(per[b][0] - np.trace(H[np.ix_(idx, idx)])) < 4 * per[b][1]
    assert sum(v[0] for v in per.values()) == pytest.approx(tr, rel=1e-6)  # the blocks partition the model
    with pytest.raises(ValueError, match="transformer found no attention"):
        blocks(m, "transformer")
    with pytest.raises(ValueError, match="curvature.blocks.none"):
        blocks(m, {"none": "^nothing"})


def _tiny_gpt(layers=1, attn="sdpa"):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=layers, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).double().eval()


def test_attention_fallback_matches_the_exact_hessian_of_a_one_layer_transformer():
    m = _tiny_gpt()
    assert m.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 11, (3, 8), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": ids[:2]}, {"input_ids": ids[2:]}]
    task = Task("lm")
    names = [n for n, _ in m.named_parameters()]
    unflat, flat = _flat_fn(m, names)

    def mean_loss(f):  # the task's mean next-token loss over both batches, in float64
        s = w = 0
        for b in batches:
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
                out = torch.func.functional_call(m, unflat(f), (), b).logits
            bs, bw = task.loss_terms(out.double(), b)
            s, w = s + bs, w + bw
        return s / w
    # the fused kernel's own double backward is what fails (pytorch #116350)
    with pytest.raises(RuntimeError, match="derivative for .* is not implemented"):
        f = flat.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(torch.func.functional_call(m, unflat(f), (), batches[0]).logits.sum() ** 2, f,
                                   create_graph=True)
        torch.autograd.grad(g.sum(), f)
    H = torch.autograd.functional.hessian(mean_loss, flat).numpy()
    c = Curvature(m, batches, task, dtype=torch.float64)
    assert c.guard.note.startswith("attention: eager")
    v = np.random.default_rng(0).standard_normal(c.n)
    np.testing.assert_allclose(c.matvec(v), H @ v, rtol=1e-9, atol=1e-10)
    assert m.config._attn_implementation == "sdpa"  # switched back after each product


def test_a_plain_module_calling_sdpa_runs_on_the_math_backend():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.out = nn.Linear(6, 18), nn.Linear(6, 3)

        def forward(self, x):  # (B, T, 6) -> (B, 3)
            q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 3).permute(2, 0, 3, 1, 4)
            a = nn.functional.scaled_dot_product_attention(q, k, v)  # (B, 2, T, 3)
            return self.out(a.transpose(1, 2).reshape(x.shape[0], x.shape[1], 6).mean(1))
    torch.manual_seed(0)
    m = Attn().eval()
    x, y = torch.randn(20, 5, 6), torch.randint(0, 3, (20,))
    batches = [(x[:12], y[:12]), (x[12:], y[12:])]
    assert Guard(m, lambda: m(x[:2])).math
    c = Curvature(m, batches, Task())
    assert c.guard.note.startswith("attention: math")
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):  # (the reference's own way round)
        H = full_hessian(m, batches)
    v = np.random.default_rng(0).standard_normal(c.n)
    np.testing.assert_allclose(c.matvec(v), H @ v, rtol=1e-4, atol=1e-6)
    plain = nn.Sequential(nn.Linear(6, 3))
    assert Guard(plain, lambda: plain(x[:2, 0])).note is None


def test_transformer_blocks_of_gpt2_and_bert():
    transformers = pytest.importorskip("transformers")
    m = _tiny_gpt(layers=2)
    b = blocks(m, "transformer")
    assert list(b) == ["transformer.h.0.attn", "transformer.h.0.mlp", "transformer.h.1.attn", "transformer.h.1.mlp",
                       "rest"]
    assert b["transformer.h.0.attn"] == ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
                                         "transformer.h.0.attn.c_proj.weight", "transformer.h.0.attn.c_proj.bias"]
    assert sum(len(v) for v in b.values()) == len(list(m.parameters()))
    cfg = transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=16, max_position_embeddings=16, num_labels=2)
    bert = transformers.AutoModelForSequenceClassification.from_config(cfg)
    b = blocks(bert, "transformer")
    assert "bert.encoder.layer.0.attention" in b and "bert.encoder.layer.1.mlp" in b
    assert b["bert.encoder.layer.0.mlp"][0].startswith("bert.encoder.layer.0.intermediate.")
    assert any(n.startswith("bert.encoder.layer.0.output.") for n in b["bert.encoder.layer.0.mlp"])
    assert not any(n.startswith("bert.encoder.layer.0.attention.") for n in b["bert.encoder.layer.0.mlp"])
