"""Recording your own training (issue 23, part 6): lldist.Recorder from a plain loop, as a
HuggingFace TrainerCallback and as a Lightning Callback; the series it writes is the
trajectory a pca job reads."""

import json
import os

import h5py
import pytest
import torch
import torch.nn.functional as F
from conftest import run, write_job

import lldist
from lldist.config import DataConfig, ModelConfig
from lldist.workloads.data import load_split
from lldist.workloads.models import build_model

MLP = {"name": "mlp", "checkpoint": "mine/model.pt", "args": {"hidden": [16]}}


def digits():
    ts = load_split(DataConfig(subset=120), "train")
    return ts.normalize(ts.x), ts.y


def pca_job(workdir):
    return write_job(workdir / "job.yaml", train=None, model=MLP, directions={"kind": "pca"},
                     grid={"x": [-1.0, 1.0, 5], "y": [-1.0, 1.0, 5]})


def read_trajectory(path="out.h5"):
    with h5py.File(path, "r") as f:
        return json.loads(f["trajectory"].attrs["checkpoints"]), f["trajectory"][()]


def test_a_plain_loops_series_is_the_trajectory_pca_reads(workdir):
    model = build_model(ModelConfig(name="mlp", args={"hidden": [16]}), (1, 8, 8), 10)
    x, y = digits()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = lldist.Recorder("mine/model.pt", every=5)
    for step in range(1, 21):
        i = (step * 16) % 120
        loss = F.cross_entropy(model(x[i:i + 16]), y[i:i + 16])
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.step(model, loss=loss.item())
    rec.finish(model, note="mine")
    assert sorted(os.listdir("mine")) == ["model.pt", "model_step10.pt", "model_step15.pt", "model_step20.pt",
                                          "model_step5.pt", "model_trajectory.json"]
    index = json.load(open("mine/model_trajectory.json"))
    assert [c["step"] for c in index["checkpoints"]] == [5, 10, 15, 20] and index["final"]["note"] == "mine"
    assert isinstance(index["checkpoints"][0]["loss"], float)
    run(["lldist.surface", pca_job(workdir)], workdir)
    names, coords = read_trajectory()
    assert names == ["model_step5.pt", "model_step10.pt", "model_step15.pt", "model_step20.pt"]  # training order
    assert abs(coords[-1]).max() < 1e-6  # step 20 is the final weights: at theta*
    with pytest.raises(ValueError, match="every"):
        lldist.Recorder("a.pt", every=0)
    with pytest.raises(ValueError, match="unit"):
        lldist.Recorder("a.pt", unit="batch")


@pytest.mark.slow
def test_the_huggingface_callback_records_a_trainer_run(workdir):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 32, (24, 16), generator=torch.Generator().manual_seed(0))

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": ids[i]}
    rec = lldist.Recorder("hf/model.pt", every=2)
    args = transformers.TrainingArguments(output_dir="trainer", max_steps=6, per_device_train_batch_size=4,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no",
                                          use_cpu=True, disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=Data(), callbacks=[rec.huggingface()]).train()
    index = json.load(open("hf/model_trajectory.json"))
    assert [c["step"] for c in index["checkpoints"]] == [2, 4, 6] and index["final"]["file"] == "model.pt"
    final = torch.load("hf/model.pt", weights_only=False)["state_dict"]
    last = torch.load("hf/model_step6.pt", weights_only=False)["state_dict"]
    first = torch.load("hf/model_step2.pt", weights_only=False)["state_dict"]
    for k, v in model.state_dict().items():
        assert torch.equal(final[k], v.cpu()) and torch.equal(last[k], v.cpu())
    assert any(not torch.equal(first[k], v.cpu()) for k, v in model.state_dict().items())  # it trained


@pytest.mark.slow
def test_the_lightning_callback_records_a_series_pca_reads(workdir):
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = build_model(ModelConfig(name="mlp", args={"hidden": [16]}), (1, 8, 8), 10)

        def training_step(self, batch, i):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)
    x, y = digits()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=20)
    rec = lldist.Recorder("mine/model.pt", every=3)
    trainer = pl.Trainer(max_steps=9, callbacks=[rec.lightning("net")], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(Module(), loader)
    index = json.load(open("mine/model_trajectory.json"))
    assert [c["step"] for c in index["checkpoints"]] == [3, 6, 9]
    run(["lldist.surface", pca_job(workdir)], workdir)  # the net's own state: the job's mlp loads it
    assert read_trajectory()[0] == ["model_step3.pt", "model_step6.pt", "model_step9.pt"]


def test_the_recorder_keeps_each_saved_steps_optimizer_and_adams_second_moments(workdir):
    """A schedule's learning rate as it was at each saved step, SGD's momentum, and Adam's
    exp_avg_sq by parameter name (what lldist.series's stability thresholds read)."""
    from lldist.analysis.stability import Optimizer, preconditioner, threshold
    model = build_model(ModelConfig(name="mlp", args={"hidden": [8]}), (1, 8, 8), 10)
    x, y = digits()
    sgd = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(sgd, step_size=2, gamma=0.5)
    rec = lldist.Recorder("sgd/model.pt", every=2)
    for _ in range(4):
        sgd.zero_grad()
        F.cross_entropy(model(x), y).backward()
        sgd.step()
        sched.step()
        rec.step(model, optimizer=sgd)
    saved = json.load(open("sgd/model_trajectory.json"))["checkpoints"]
    assert [c["optimizer"]["lr"] for c in saved] == [0.1, 0.05]  # after each saved step's scheduler step
    assert saved[0]["optimizer"]["class"] == "SGD" and saved[0]["optimizer"]["momentum"] == 0.9
    assert threshold(Optimizer.of(saved[1]["optimizer"])) == pytest.approx(3.8 / 0.05)

    adam = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.8, 0.99))
    rec = lldist.Recorder("adam/model.pt", every=3, second_moments=True)
    for _ in range(3):
        adam.zero_grad()
        F.cross_entropy(model(x), y).backward()
        adam.step()
        rec.step(model, optimizer=adam)
    (c,) = json.load(open("adam/model_trajectory.json"))["checkpoints"]
    moments = torch.load(os.path.join("adam", c["second_moments"]))
    assert moments["step"] == 3 and set(moments["exp_avg_sq"]) == {n for n, _ in model.named_parameters()}
    for n, p in model.named_parameters():
        torch.testing.assert_close(moments["exp_avg_sq"][n], adam.state[p]["exp_avg_sq"])
    opt = Optimizer.of(c["optimizer"])
    assert (opt.kind, opt.beta1, opt.beta2) == ("adam", 0.8, 0.99)
    assert float(preconditioner(moments["exp_avg_sq"]["net.1.bias"], opt, 3).min()) > 0
    with pytest.raises(ValueError, match="needs the optimizer"):
        rec.step(model)
    with pytest.raises(ValueError, match="keeps no exp_avg_sq"):
        lldist.Recorder("s/model.pt", every=1, second_moments=True).step(model, optimizer=sgd)
