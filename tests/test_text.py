"""Text models through HuggingFace (the optional lldist[hf] extra): a BERT-style classifier and
a GPT-style causal LM built from the configs in jobs/models, on the shipped docstring data,
against plain loops over the same batches; directions per row; the error without the extra."""

import math
import shutil
import os
import sys

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, run, write_job

transformers = pytest.importorskip("transformers", reason="pip install 'lldist[hf]'")

from lldist.directions.kinds import as_tensors
from lldist.config import DirectionsConfig, load_job  # noqa: E402
from lldist.directions.random import make_directions  # noqa: E402
from lldist.directions.state import model_state  # noqa: E402
from lldist.store import SurfaceReader  # noqa: E402

BERT = os.path.join(ROOT, "jobs", "models", "tiny_bert")
GPT = os.path.join(ROOT, "jobs", "models", "tiny_gpt")
DATA = os.path.join(ROOT, "jobs", "data", "pydoc_topics")


def text_job(path, model, loss="cross_entropy", label="label", train=None, checkpoint=None):
    return write_job(path, model={"name": f"hf:{model}", "checkpoint": checkpoint, "seed": 1},
                     data={"name": "hf:csv", "root": DATA, "subset": 40,
                           "args": {"text": "text", "label": label, "max_length": 24}},
                     train=train, grid={"x": [-1.0, 1.0, 3], "y": [-1.0, 1.0, 2]},
                     eval={"batch_size": 16, "loss": loss, "threads": 1})


def plain_batches(job):
    """The same 40 test sentences, tokenized by hand with the model folder's tokenizer."""
    import csv
    cfg = load_job(job)
    tok = transformers.AutoTokenizer.from_pretrained(cfg.model.name[3:])
    with open(os.path.join(DATA, "test.csv")) as f:
        rows = list(csv.DictReader(f))
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(rows), generator=g)[:40].sort().values.tolist()
    rows = [rows[i] for i in idx]
    enc = tok([r["text"] for r in rows], padding="max_length", truncation=True, max_length=24, return_tensors="pt")
    return enc, torch.tensor([int(r["label"]) for r in rows])


def at(model, path, a, b):
    """The model at theta + a dx + b dy, theta being the model's state at its first call."""
    with SurfaceReader(path) as sf:
        dirs = as_tensors(sf.read_directions())
    if not hasattr(model, "theta_"):
        model.theta_ = {k: v.clone() for k, v in model_state(model)[0].items()}
    theta = model.theta_
    state = {k: theta[k] + a * dirs.x[k] + b * dirs.y[k] for k in theta}
    model.load_state_dict(state, strict=False)
    return model.eval()


def test_sequence_classifier_matches_a_plain_loop(workdir):
    job = text_job(workdir / "job.yaml", BERT)
    run(["lldist.surface", job], workdir)
    enc, labels = plain_batches(job)
    torch.manual_seed(1)
    model = transformers.AutoModelForSequenceClassification.from_config(transformers.AutoConfig.from_pretrained(BERT))
    with h5py.File("out.h5", "r") as f:
        loss, acc, x, y = f["test/loss"][()], f["test/acc"][()], f["x"][()], f["y"][()]
    for iy, b in enumerate(y):
        for ix, a in enumerate(x):
            m = at(model, "out.h5", a, b)
            with torch.no_grad():
                logits = torch.cat([m(**{k: v[i:i + 16] for k, v in enc.items()}).logits for i in range(0, 40, 16)])
            assert math.isclose(loss[iy, ix], float(F.cross_entropy(logits, labels)), rel_tol=1e-5)
            assert acc[iy, ix] == int((logits.argmax(1) == labels).sum()) / 40


def test_causal_lm_matches_a_plain_loop(workdir):
    job = text_job(workdir / "job.yaml", GPT, loss="lm", label=None)
    run(["lldist.surface", job], workdir)
    enc, _ = plain_batches(job)
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(GPT))
    with h5py.File("out.h5", "r") as f:
        assert json_list(f.attrs["quantities"]) == ["loss", "acc", "perplexity", "loss_se"]
        loss, acc, ppl = f["test/loss"][()], f["test/acc"][()], f["test/perplexity"][()]
    m = at(model, "out.h5", 1.0, 1.0)  # the last cell: x[-1], y[-1]
    with torch.no_grad():
        logits = torch.cat([m(input_ids=enc["input_ids"][i:i + 16],
                              attention_mask=enc["attention_mask"][i:i + 16]).logits for i in range(0, 40, 16)])
    mask = enc["attention_mask"][:, 1:].bool()
    tok = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), enc["input_ids"][:, 1:].reshape(-1),
                          reduction="none").view(mask.shape)
    want = float(tok[mask].mean())
    assert math.isclose(loss[-1, -1], want, rel_tol=1e-5)
    hits = (logits[:, :-1].argmax(-1) == enc["input_ids"][:, 1:])[mask]
    assert acc[-1, -1] == int(hits.sum()) / int(mask.sum())
    assert math.isclose(ppl[-1, -1], math.exp(want), rel_tol=1e-5)


def json_list(text):
    import json
    return json.loads(text)


def test_directions_for_transformers_are_per_row():
    """Filter normalization on a transformer: each row of a Linear weight (an output unit) and
    of an Embedding (a token) has the norm of the same row of theta; LayerNorm weights and
    biases get zero under ignore: biasbn; the tied output layer of a causal LM is moved once."""
    torch.manual_seed(0)
    bert = transformers.AutoModelForSequenceClassification.from_config(transformers.AutoConfig.from_pretrained(BERT))
    theta, kinds = model_state(bert)
    d = make_directions(theta, kinds, DirectionsConfig(seed=0), 1).x
    modules = dict(bert.named_modules())
    checked = {"linear": 0, "embedding": 0, "layernorm": 0}
    for name, w in theta.items():
        owner = modules[name.rsplit(".", 1)[0]]
        if isinstance(owner, (torch.nn.Linear, torch.nn.Embedding)) and name.endswith("weight"):
            np.testing.assert_allclose(d[name].norm(dim=1), w.norm(dim=1), rtol=1e-4, atol=1e-6)
            checked["linear" if isinstance(owner, torch.nn.Linear) else "embedding"] += 1
        elif isinstance(owner, torch.nn.LayerNorm) or name.endswith("bias"):
            assert not d[name].any()
            checked["layernorm"] += isinstance(owner, torch.nn.LayerNorm)
    assert checked["linear"] >= 10 and checked["embedding"] == 3 and checked["layernorm"] >= 5
    gpt = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(GPT))
    names = set(model_state(gpt)[0])
    assert ("lm_head.weight" in names) != ("transformer.wte.weight" in names)  # tied: one entry


def test_directions_for_gpt2_follow_the_module_type():
    """GPT-2's attention and MLP weights are transformers' Conv1D, stored (in, out): a filter
    (an output unit) is a column there. Every Conv1D column, Embedding row and LayerNorm is
    checked as the BERT test checks rows (the old rule, dim 0, normalized input units)."""
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    gpt = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(GPT))
    theta, kinds = model_state(gpt)
    d = make_directions(theta, kinds, DirectionsConfig(seed=0), 1).x
    modules = dict(gpt.named_modules())
    checked = {"conv1d": 0, "embedding": 0, "layernorm": 0}
    for name, w in theta.items():
        owner = modules.get(name.rsplit(".", 1)[0])
        if isinstance(owner, Conv1D) and name.endswith("weight"):
            assert kinds[name] == "weight_t" and w.shape == (owner.weight.shape[0], owner.nf)
            np.testing.assert_allclose(d[name].norm(dim=0), w.norm(dim=0), rtol=1e-4, atol=1e-6)  # per output unit
            assert not np.allclose(d[name].norm(dim=1), w.norm(dim=1), rtol=1e-2)  # not per input unit
            checked["conv1d"] += 1
        elif isinstance(owner, torch.nn.Embedding):
            np.testing.assert_allclose(d[name].norm(dim=1), w.norm(dim=1), rtol=1e-4, atol=1e-6)
            checked["embedding"] += 1
        elif isinstance(owner, torch.nn.LayerNorm) or name.endswith("bias"):
            assert not d[name].any()
            checked["layernorm"] += isinstance(owner, torch.nn.LayerNorm)
    n_layer = gpt.config.n_layer
    assert checked == {"conv1d": 4 * n_layer, "embedding": 2, "layernorm": 2 * (2 * n_layer + 1)}  # weight, bias


def test_train_a_text_model_and_a_huggingface_checkpoint_folder(workdir):
    job = text_job(workdir / "job.yaml", BERT, checkpoint="model.pt",
                   train={"optimizer": "adamw", "lr": 3e-3, "warmup_steps": 5, "epochs": 2, "batch_size": 64})
    out = run(["lldist.train", job], workdir).stdout
    losses = [float(line.split("train loss")[1].split()[0]) for line in out.splitlines() if "train loss" in line]
    assert len(losses) == 2 and losses[1] < losses[0] and os.path.exists("model_epoch2.pt")
    # the same weights as a HuggingFace folder are the same model
    from lldist.config import ModelConfig
    from lldist.workloads.models import build_model, load_checkpoint
    m = build_model(ModelConfig(name=f"hf:{BERT}", seed=1), (24,), 4)
    load_checkpoint(m, "model.pt")
    m.save_pretrained("hf_folder")
    m2 = build_model(ModelConfig(name=f"hf:{BERT}", seed=5), (24,), 4)
    load_checkpoint(m2, "hf_folder")
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k])


def test_without_the_extra_the_error_names_it(workdir):
    job = text_job(workdir / "job.yaml", BERT)
    code = "import sys; sys.modules['transformers'] = None; from lldist.surface import cli; cli()"
    p = run([sys.executable, "-c", code, job], workdir, check=False)
    assert p.returncode == 2 and "pip install 'lldist[hf]'" in p.stderr and p.stderr.count("\n") == 1


def test_a_lora_adapter_landscape_moves_the_adapter_alone(workdir):
    """A PEFT adapter folder through hf:, with directions.params.trainable_only: the directions
    are zero on every base weight, filter-normalized on the adapter's, and alpha = 0 is the
    adapted model's own loss."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(GPT))
    base.save_pretrained("base")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(GPT, f), "base")
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)  # a trained adapter: B is zero only at its start
    lora.save_pretrained("adapter")
    job = write_job(workdir / "job.yaml", train=None, model={"name": "hf:adapter", "checkpoint": None, "args": {}},
                    data={"name": "hf:csv", "root": DATA, "args": {"max_length": 24, "label": None}, "subset": 32},
                    directions={"seed": 0, "params": {"trainable_only": True}}, grid={"x": [-1, 1, 3], "y": None},
                    eval={"batch_size": 16, "loss": "lm", "threads": 1})
    run(["lldist.surface", job], workdir, HF_HUB_OFFLINE=1)
    with h5py.File("out.h5", "r") as f:
        d = {n: f["directions/x"][n][()] for n in f["directions/x"]}
        loss0 = f["test/loss"][1]
    adapters = [n for n in d if "lora_" in n]
    assert adapters and all(np.abs(d[n]).sum() > 0 for n in adapters)
    assert all(not np.any(d[n]) for n in d if "lora_" not in n)  # every base weight stays at theta*
    for n in adapters:  # rows of lora_A (r x in) and lora_B (out x r): one output unit each
        w = dict(lora.named_parameters())[n].detach().numpy()
        np.testing.assert_allclose(np.linalg.norm(d[n], axis=1), np.linalg.norm(w, axis=1), rtol=1e-4, atol=1e-6)
    # alpha = 0 is the adapted model itself
    from lldist.workloads.data import load_split
    cfg = load_job(job)
    data = load_split(cfg.data, "test", model_name=cfg.model.name)
    lora.eval()
    total = tokens = 0.0
    with torch.no_grad():
        for b in data.batches(16):
            logits = lora(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            tgt, mask = b["input_ids"][:, 1:], b["attention_mask"][:, 1:].bool()
            tok = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1),
                                  reduction="none").view(tgt.shape)
            total += float((tok * mask).sum())
            tokens += float(mask.sum())
    assert loss0 == pytest.approx(total / tokens, rel=1e-5)


@pytest.mark.parametrize("model,loss,label", [(BERT, "cross_entropy", "label"), (GPT, "lm", None)])
@pytest.mark.slow
def test_hessian_of_the_text_models_over_ranks_with_the_attention_fallback(workdir, model, loss, label):
    """Both text jobs attend through sdpa, whose double backward fails here: the Hessian and
    the GGN at θ* run with eager attention, over two ranks, and the file and the log say so."""
    from conftest import mpiexec
    job = text_job(workdir / "job.yaml", model, loss=loss, label=label)
    run(["lldist.surface", job, "--set", "grid.x=[0,0,1]", "--set", "grid.y=null"], workdir)
    for op in ("hessian", "ggn"):
        r = run([mpiexec(), "-n", "2", sys.executable, "-m", "lldist.hessian", job, "--top", "1", "--batches", "2",
                 "--trace-samples", "4", "--set", "curvature.blocks=transformer", "--no-block-top",
                 "--set", f"curvature.operator={op}", "--out", "out.h5"], workdir)
        assert "attention: eager" in r.stdout
    with SurfaceReader("out.h5") as sf:
        got = sf.curvature(operator=None)
    for key, c in got.items():
        assert c["ranks"] == 2 and c["attention"].startswith("attention: eager")
        assert np.isfinite(c["lambda_max"]) and c["lambda_max"] > 0
        names = [b["block"] for b in c["blocks"]]
        assert any(n.endswith("attention") or n.endswith(".attn") for n in names) and names[-1] == "rest"
        # the blocks partition the model: their traces add up to the whole one (same products)
        assert sum(b["trace"] for b in c["blocks"]) == pytest.approx(c["trace"], rel=1e-4, abs=1e-6)
    assert got["test_ggn"]["lambda_min"] > -1e-5 * got["test_ggn"]["lambda_max"]


@pytest.mark.slow
def test_connect_trains_a_gpts_bend_with_the_lm_task(workdir):
    """lldist.connect on a causal LM (tied input and output embeddings): the trainer's task is
    the job's lm loss, the curve's ends are the line's bit for bit, the bend moved off the
    midpoint, and the saved bend keeps the tie."""
    job = text_job(workdir / "job.yaml", GPT, loss="lm", label=None,
                   train={"optimizer": "adamw", "lr": 0.002, "batch_size": 16, "epochs": 1, "seed": 0},
                   checkpoint="g0.pt")
    run(["lldist.train", job], workdir)
    run(["lldist.train", job, "--set", "model.checkpoint=g1.pt", "--set", "model.seed=2", "--set", "train.seed=2"],
        workdir)
    run(["lldist.connect", "g0.pt", "g1.pt", job, "--out", "c", "--set", "connect.points=3", "--set", "connect.plane=3",
         "--set", "connect.train={optimizer: adamw, lr: 0.002, batch_size: 16, epochs: 1}"], workdir)
    with h5py.File("c/curve.h5", "r") as f, h5py.File("c/line.h5", "r") as g:
        for q in ("loss", "acc", "perplexity"):
            c, ln = f[f"test/{q}"][()], g[f"test/{q}"][()]
            assert c[0] == ln[0] and c[-1] == ln[-1]
    a, b, bend = (torch.load(p, weights_only=True)["state_dict"] for p in ("g0.pt", "g1.pt", "c/bend.pt"))
    assert torch.equal(bend["lm_head.weight"], bend["transformer.wte.weight"])
    assert not torch.equal(bend["transformer.h.0.attn.c_attn.weight"],
                           (a["transformer.h.0.attn.c_attn.weight"] + b["transformer.h.0.attn.c_attn.weight"]) / 2)
