"""What a batch means: how the model is called, the loss and the metrics. No MPI, no HDF5.

    task = make_task("cross_entropy")                    # quantities ("loss", "acc")
    task = make_task("lm")                               # ("loss", "acc", "perplexity"): next-token
    task = make_task(my_loss, {"top5": my_metric})       # callables (outputs, batch) -> (B,) values

A batch is what the data yields: an `(x, y, ...)` tuple (the model is called on x, the target
is y) or a dict of tensors, HuggingFace style (the model is called with every key but
`labels`/`label`; the target is `labels` or `label`). The model's output may be a tensor, an
object with `.logits` (HuggingFace) or a tuple whose first element is the logits.

Every quantity is a weighted mean over the split: per batch the task returns, for each
quantity, the float32 sum of its per-example values and of their weights (1 per example; the
number of real tokens for `lm`), accumulated in float64 across batches. Derived quantities
(perplexity = exp(loss)) are computed from the means.

`loss_se`, the standard error of the mean loss over the split's examples, comes from four more
sums per batch (of v², v·w, w² and the example count): the mean is a ratio Σv/Σw, whose
variance over examples drawn at random is n/(n−1) Σ(v − m w)² / (Σw)² (the ratio estimator's;
for unit weights the familiar s/√n). For `lm` the example is a sequence, not a token: tokens
of one sequence are not independent draws.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..config import LOSSES, EvalConfig
from ..errors import UserError

IGNORE_INDEX = -100  # the labels lm ignores, as in torch and HuggingFace


def model_inputs(batch):
    """What the model is called with: x of a tuple, or the dict without its labels."""
    if isinstance(batch, dict):
        return (), {k: v for k, v in batch.items() if k not in ("labels", "label")}
    return (batch[0],), {}


def target(batch):
    if isinstance(batch, dict):
        for k in ("labels", "label"):
            if k in batch:
                return batch[k]
        return batch.get("input_ids")  # a language model predicts its own input
    return batch[1]


def logits_of(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"the model returned {type(out).__name__}: lldist needs a tensor, an object with .logits "
                    "or a tuple whose first element is the output")


def _wide(t: torch.Tensor) -> torch.Tensor:
    """Losses in float32 at least: bf16/fp16 outputs widened, float64 kept (a float64 Hessian)."""
    return t if t.dtype == torch.float64 else t.float()


def _ce(logits, batch):
    y = target(batch)
    return F.cross_entropy(_wide(logits), y, reduction="none"), None


def _acc(logits, batch):
    return (logits.argmax(-1) == target(batch)).float(), None


def _mse(out, batch):
    y = target(batch).to(out.dtype)
    d = (_wide(out) - y.to(_wide(out).dtype)).pow(2)
    return d.flatten(1).mean(1) if d.dim() > 1 else d, None


def _lm_tokens(logits, batch):
    """Next-token targets and the mask of real tokens: (logits[:, :-1], targets, mask)."""
    ids = batch["labels"] if isinstance(batch, dict) and "labels" in batch else \
        (batch["input_ids"] if isinstance(batch, dict) else target(batch))
    pred, tgt = logits[:, :-1], ids[:, 1:]
    mask = tgt != IGNORE_INDEX
    if isinstance(batch, dict) and "attention_mask" in batch:
        mask = mask & batch["attention_mask"][:, 1:].bool()
    return pred, tgt, mask


def _lm(logits, batch):
    pred, tgt, mask = _lm_tokens(logits, batch)
    tok = F.cross_entropy(_wide(pred).reshape(-1, pred.shape[-1]), tgt.clamp_min(0).reshape(-1),
                          reduction="none").view(tgt.shape)
    return (tok * mask).sum(1), mask.sum(1).to(tok.dtype)  # per sequence: summed token loss, token count


def _lm_acc(logits, batch):
    pred, tgt, mask = _lm_tokens(logits, batch)
    return ((pred.argmax(-1) == tgt) & mask).sum(1).float(), mask.sum(1).float()


def to_device(batch, device):
    """A batch (a tuple of tensors, or a dict of them) on `device`."""
    return {k: v.to(device) for k, v in batch.items()} if isinstance(batch, dict) else \
        tuple(t.to(device) for t in batch)


def standard_error(v: float, w: float, v2: float, vw: float, w2: float, n: float) -> float:
    """The standard error of the mean Σv/Σw over n examples drawn at random (the ratio
    estimator's, from the sums of v, w, v², v·w and w²); NaN for fewer than two examples."""
    if n < 2 or not w:
        return math.nan
    m = v / w
    ss = max(v2 - 2 * m * vw + m * m * w2, 0.0)  # Σ(v − m w)², rounding may take it below 0
    return math.sqrt(n / (n - 1) * ss) / abs(w)


SE_NAMES = {"loss_se": "standard error over examples of the {loss}"}

CURVATURE_NAMES = {
    "lambda_max": "largest eigenvalue of the Hessian of the loss on the {split} split",
    "lambda_min": "smallest eigenvalue of the Hessian of the loss on the {split} split",
    "eig_ratio": "|lambda_min / lambda_max| of the Hessian of the loss on the {split} split (Li et al.'s convexity "
                 "measure)",
}
CURVATURE = tuple(CURVATURE_NAMES)

BUILTIN_LOSSES = {"cross_entropy": _ce, "mse": _mse, "lm": _lm}
DEFAULT_METRICS = {"cross_entropy": {"acc": _acc}, "mse": {}, "lm": {"acc": _lm_acc}}
DERIVED = {"lm": {"perplexity": lambda means: math.exp(means["loss"]) if means["loss"] < 700 else math.inf}}


def qualified_name(fn) -> str:
    """module.qualname of a callable (its class's for a callable object)."""
    target = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', '?')}"


def head(batch, n: int):
    """The first n examples of a batch (a tuple or a dict of tensors)."""
    if isinstance(batch, dict):
        return {k: v[:n] for k, v in batch.items()}
    return tuple(t[:n] for t in batch)


def batch_size(batch) -> int:
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return int(first.shape[0])


def _describe(v) -> str:
    return f"a tensor of shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else f"a {type(v).__name__}"


def _sum_and_weight(fn: Callable, out, batch) -> tuple:
    """(float32 sum of fn's per-example values, sum of their weights: 1 each unless fn gives them)."""
    v, w = fn(out, batch)
    v = _wide(v)
    return v.sum(), (w.sum() if w is not None else torch.tensor(float(v.numel()), device=v.device))


def _per_example(fn: Callable) -> Callable:
    """A user's callable (outputs, batch) -> (B,) values, or a (values, weights) pair."""
    def wrapped(out, batch):
        r = fn(out, batch)
        if isinstance(r, tuple):
            return r[0], r[1]
        return r, None
    wrapped.__name__ = getattr(fn, "__name__", "metric")
    return wrapped


class Task:
    """How outputs become numbers. `names`: the stored quantities, loss first."""

    def __init__(self, loss="cross_entropy", metrics: Optional[dict] = None, curvature=False):
        if isinstance(loss, str):
            if loss not in BUILTIN_LOSSES:
                raise ValueError(f"loss {loss!r}: allowed {', '.join(LOSSES)} or a callable (outputs, batch) -> "
                                 "per-example losses")
            self.loss_name, self._loss = loss, BUILTIN_LOSSES[loss]
            default = DEFAULT_METRICS[loss]
            self.derived = DERIVED.get(loss, {})
        elif callable(loss):
            self.loss_name = qualified_name(loss)
            self._loss, default, self.derived = _per_example(loss), {}, {}
        else:
            raise TypeError(f"loss must be a name or a callable, got {type(loss).__name__}")
        if metrics is None:
            metrics = default
        if not isinstance(metrics, dict):
            raise TypeError(f"metrics must be a dict of name -> callable, got {type(metrics).__name__}")
        self._metrics = {}
        # the user's own code, which the job's identity hashes (lldist.inputs.identity.task)
        self.user_loss = loss if callable(loss) else None
        self.user_metrics = {}
        for name, fn in metrics.items():
            if not isinstance(name, str) or not name.isidentifier() or name == "loss":
                raise ValueError(f"metrics: {name!r} is not a usable name (an identifier other than 'loss')")
            if not callable(fn):
                raise TypeError(f"metrics[{name!r}] must be callable, got {type(fn).__name__}")
            if fn in default.values():
                self._metrics[name] = fn
            else:
                self._metrics[name] = _per_example(fn)
                self.user_metrics[name] = fn
        self.summed = ("loss",) + tuple(self._metrics)
        self.width = 2 * len(self.summed) + 4  # the length of sums(): each quantity's pair, the loss's moments
        # per-cell curvature (eval.curvature): computed by the evaluator, not from batch sums;
        # `curvature` True (the Hessian) or the operator's name (curvature.operator: operators.py)
        from .operators import OPERATORS
        self.operator = curvature if isinstance(curvature, str) else "hessian"
        if self.operator not in OPERATORS:
            raise ValueError(f"curvature {curvature!r}: allowed True, False or {', '.join(OPERATORS)}")
        self.curvature = CURVATURE if curvature else ()
        self.names = self.summed + tuple(self.derived) + tuple(SE_NAMES) + self.curvature
        # the plain image-classification task: the evaluator's vmapped path knows it
        self.classification = self.loss_name == "cross_entropy" and set(self._metrics) <= {"acc"} and \
            all(f is _acc for f in self._metrics.values())

    @property
    def metric_names(self) -> tuple:
        return tuple(self._metrics)

    @property
    def has_user_code(self) -> bool:
        return self.user_loss is not None or bool(self.user_metrics)

    def long_name(self, q: str, split: str) -> str:
        if q == "loss":
            what = {"cross_entropy": "cross-entropy loss", "mse": "squared error", "lm": "next-token loss"}
            return f"mean {what.get(self.loss_name, 'loss (' + self.loss_name + ')')} on the {split} split"
        if q in SE_NAMES:
            return SE_NAMES[q].format(loss=self.long_name("loss", split))
        if q in CURVATURE_NAMES:
            from .operators import DESCRIPTION
            return CURVATURE_NAMES[q].format(split=split).replace("Hessian of the loss", DESCRIPTION[self.operator])
        return f"{q} on the {split} split"

    def check(self, model, batch, classes: int = 0) -> None:
        """Run the task once on the first two examples of a batch, before anything is computed
        or written. A loss or metric that does not give one value per example (a per-batch
        mean would silently weight the last, smaller batch wrongly), a dict batch without
        labels, or outputs a built-in loss cannot take are refused with a UserError (a
        ValueError) naming the argument; the user's own code raising is left to raise.
        `classes`: the split's largest class label + 1, which the model's outputs must cover."""
        batch = head(batch, 2)
        n = batch_size(batch)
        if n == 0:
            raise UserError("data: the first batch holds no examples")
        if isinstance(batch, dict) and self.loss_name != "lm" and not ({"labels", "label"} & set(batch)):
            raise UserError(f"data: dict batches need a 'labels' (or 'label') entry for loss {self.loss_name} "
                            f"(the batch has {', '.join(batch)})")
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        batch = {k: v.to(device) for k, v in batch.items()} if isinstance(batch, dict) else \
            tuple(t.to(device) for t in batch)
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = self.forward(model, batch)
        except Exception as e:  # torch's words alone do not say which data met which model
            args, kwargs = model_inputs(batch)
            shapes = ", ".join([f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in args
                                if isinstance(t, torch.Tensor)] + [f"{k} {tuple(t.shape)}" for k, t in kwargs.items()
                                                                   if isinstance(t, torch.Tensor)])
            context = (f"the model ({type(model).__name__}) failed on the data's first {n} examples (inputs "
                       f"{shapes}): is the data the model's (input shape, dtype, keys)?")
            e.add_note(f"lldist: {context}")
            e.lldist_failure = context  # the command line's last line says it (errors.run_cli)
            raise
        finally:
            model.train(was)
        parts = [("loss", self._loss, self.user_loss is not None)] + \
            [(f"metrics[{k!r}]", f, k in self.user_metrics) for k, f in self._metrics.items()]
        for what, fn, users in parts:
            try:
                v, w = fn(out, batch)
            except Exception as e:
                if users:
                    raise  # the user's own code: its own exception
                raise UserError(f"{what} {self.loss_name if what == 'loss' else ''}: cannot take the model's output "
                                f"({_describe(out)}) and the batch's targets: {str(e).splitlines()[0][:200]}")
            if not (isinstance(v, torch.Tensor) and v.dim() == 1 and v.shape[0] == n):
                raise UserError(f"{what}: returned {_describe(v)} for a batch of {n} examples; it must return one "
                                f"value per example, shape ({n},) (e.g. F.cross_entropy(outputs, y, reduction='none'); "
                                "a mean per batch would weight the batches wrongly)")
            if w is not None and not (isinstance(w, torch.Tensor) and w.shape == v.shape):
                raise UserError(f"{what}: its weights are {_describe(w)}; they must match the values, shape ({n},)")
        if self.loss_name == "cross_entropy" and isinstance(out, torch.Tensor) and out.dim() == 2 and \
                classes > out.shape[1]:
            raise UserError(f"loss cross_entropy: cannot take the model's output ({_describe(out)}): the data's labels "
                            f"go up to {classes - 1}, so the model needs at least {classes} outputs")

    def loss_terms(self, out, batch) -> tuple:
        """(sum of the per-example losses, sum of their weights), differentiable: the loss
        whose Hessian the curvature quantities are of."""
        return _sum_and_weight(self._loss, logits_of(out), batch)

    def loss_examples(self, out, batch) -> tuple:
        """((B,) per-example summed losses, (B,) their weights: 1 each unless the loss gives them),
        differentiable: the examples of the empirical Fisher (operators.py)."""
        v, w = self._loss(logits_of(out), batch)
        v = _wide(v)
        return v, (w.to(v.dtype) if w is not None else torch.ones_like(v))

    def forward(self, model, batch):
        args, kwargs = model_inputs(batch)
        return logits_of(model(*args, **kwargs))

    def sums(self, out, batch) -> torch.Tensor:
        """(2 * len(summed) + 4,) float32 on the device: [sum of values, sum of weights] per
        quantity, then the loss's sums of v², v·w, w² and its example count (loss_se)."""
        v, w = self._loss(out, batch)
        v = _wide(v)
        w = w.to(v.dtype) if w is not None else torch.ones_like(v)
        parts = [v.sum(), w.sum()]
        for fn in self._metrics.values():
            parts += _sum_and_weight(fn, out, batch)
        parts += [(v * v).sum(), (v * w).sum(), (w * w).sum(), torch.tensor(float(v.numel()), dtype=v.dtype, device=v.device)]
        return torch.stack(parts)

    def means(self, total: torch.Tensor) -> list:
        """Per quantity of `names` (curvature excepted), from the float64 totals of sums()."""
        t = total.tolist()
        means = {n: (t[2 * i] / t[2 * i + 1] if t[2 * i + 1] else math.nan) for i, n in enumerate(self.summed)}
        means.update({n: f(means) for n, f in self.derived.items()})
        means["loss_se"] = standard_error(t[0], t[1], *t[-4:])
        return [means[n] for n in self.names if n not in self.curvature]


@torch.no_grad()
def mean_loss(terms: Callable, batches) -> float:
    """The mean loss over fixed batches from each batch's (sum, weight) (`terms(batch)`, the
    task's loss_terms at some weights), accumulated as Python floats: the curvature's and the
    sharpness measures' loss at a point."""
    v = w = 0.0
    for b in batches:
        s, n = terms(b)
        v, w = v + float(s), w + float(n)
    return v / w


@torch.no_grad()
def mean_over(model, data, task: Task, batch_size: int) -> dict:
    """{quantity: its mean over the split} of the task at the weights the model holds, the plain
    way (eval mode, one batch at a time, the batch sums accumulated in float64): what training
    reports each epoch and a PCA plane's checkpoints are measured by. The evaluator's own loops
    (evaluator.py) add groups, vmapped passes and one device sync per split to the same sums."""
    model.eval()
    total = None
    for batch in data.batches(batch_size):
        sums = task.sums(task.forward(model, batch), batch).double()
        total = sums if total is None else total + sums
    return dict(zip([n for n in task.names if n not in task.curvature], task.means(total)))


def make_task(loss="cross_entropy", metrics=None) -> Task:
    return loss if isinstance(loss, Task) else Task(loss, metrics)


def task_from_config(cfg: EvalConfig, operator: str = "hessian") -> Task:
    """The job file's eval.loss and eval.metrics, python: references imported; `operator`: the
    job's curvature.operator, of its per-cell maps (eval.curvature)."""
    from ..workloads.factory import import_object
    if cfg.loss.startswith("object:") or any(v.startswith("object:") for v in (cfg.metrics or {}).values()):
        raise UserError("eval.loss and eval.metrics given as object: are callables from Python "
                        "(lldist.landscape); a job file names python:<module>:<function>")
    loss = import_object(cfg.loss, "eval.loss") if cfg.loss.startswith("python:") else cfg.loss
    metrics = None
    if cfg.metrics:  # added to the loss's own metrics (accuracy, perplexity)
        metrics = dict(DEFAULT_METRICS.get(cfg.loss, {}))
        metrics.update({k: import_object(v, f"eval.metrics.{k}") for k, v in cfg.metrics.items()})
    return Task(loss, metrics, curvature=operator if cfg.curvature else False)
