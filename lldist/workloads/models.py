"""Model registry, checkpoints and pretrained weights.

    from lldist.workloads.models import build_model, load_checkpoint
    model = build_model(job.model, in_shape=(3, 32, 32), num_classes=10)

Built-in models: `mlp` (the "linear layer model"), `cnn` (plain conv stack), `cnn_skip`
(the same stack with residual skips: identical parameters, only the additions differ, so the
two landscapes compare skip connections and nothing else), `mobilenet_v2` (torchvision).
Also `torchvision:<name>` for any torchvision classifier and `python:<module>:<factory>`
for user models (the factory is called with `model.args` as keyword arguments).
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import UserError
from .factory import import_object


class MLP(nn.Module):
    """Flatten -> Linear/ReLU stack -> Linear. hidden=(512, 256) on 3x32x32 is 3072-512-256-10."""

    def __init__(self, in_features: int, num_classes: int, hidden=(512, 256)):
        super().__init__()
        layers, width = [nn.Flatten()], in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def _conv_bn(cin, cout, stride, batchnorm):
    layers = [nn.Conv2d(cin, cout, 3, stride, 1, bias=not batchnorm)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(cout))
    return nn.Sequential(*layers)


class Block(nn.Module):
    """conv-(bn)-relu-conv-(bn) [+ x] -relu. With skip=False it is the same block, minus the add."""

    def __init__(self, width, batchnorm, skip):
        super().__init__()
        self.a = _conv_bn(width, width, 1, batchnorm)
        self.b = _conv_bn(width, width, 1, batchnorm)
        self.skip = skip

    def forward(self, x):
        y = self.b(torch.relu(self.a(x)))
        return torch.relu(y + x if self.skip else y)


class CNN(nn.Module):
    """Stem conv, then `stages` stages of `blocks` blocks; each new stage doubles the width and
    halves the resolution with a stride-2 conv. Global average pool, linear classifier.

    Defaults (width 16, 3 stages, 1 block): 9 convs, about 78k parameters at 10 classes."""

    def __init__(self, in_channels, num_classes, width=16, stages=3, blocks=1, batchnorm=True, skip=False):
        super().__init__()
        layers = [_conv_bn(in_channels, width, 1, batchnorm), nn.ReLU()]
        w = width
        for s in range(stages):
            if s > 0:
                layers += [_conv_bn(w, 2 * w, 2, batchnorm), nn.ReLU()]
                w *= 2
            layers += [Block(w, batchnorm, skip) for _ in range(blocks)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(w, num_classes)

    def forward(self, x):
        x = self.features(x)  # (B, w, H', W')
        return self.head(x.mean(dim=(2, 3)))


def _torchvision_model(name: str, num_classes: int, pretrained: Optional[str], args: dict) -> nn.Module:
    import torchvision
    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        raise UserError(f"model {name!r} is not a torchvision model "
                        f"(e.g. {', '.join(torchvision.models.list_models()[:5])}, ...)")
    if pretrained is None:
        args = dict(args)
        given = args.pop("num_classes", num_classes)
        if given != num_classes:  # the user's value is welcome when it agrees with the data
            raise UserError(f"model torchvision:{name}: model.args.num_classes is {given!r} but the data has "
                            f"{num_classes} classes")
        return builder(weights=None, num_classes=num_classes, **args)
    try:
        weights = torchvision.models.get_model_weights(name)[pretrained] if pretrained != "DEFAULT" \
            else torchvision.models.get_model_weights(name).DEFAULT
    except KeyError:
        names = ", ".join(w.name for w in torchvision.models.get_model_weights(name))
        raise UserError(f"model.pretrained {pretrained!r} is not a weights name of {name}; allowed: DEFAULT, {names}")
    try:
        return builder(weights=weights, **args)
    except Exception as e:  # URLError, HTTPError, OSError: offline or blocked
        hub = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise UserError(f"cannot get pretrained weights {name}.{weights.name} ({type(e).__name__}: {e}); "
                        f"offline, put the file {os.path.basename(weights.url)} into {hub}")


def _check_builtin_args(name: str, args: dict) -> None:
    """Sizes of the built-in models must be positive integers: torch accepts some bad ones
    (a layer of width 0) and fails much later, or deep inside, on others (hidden: [-1])."""
    def positive_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1
    if name == "mlp" and "hidden" in args:
        h = args["hidden"]
        if not isinstance(h, (list, tuple)) or not all(positive_int(v) for v in h):
            raise UserError(f"model mlp: model.args.hidden must be a list of positive integers, got {h!r}")
    if name in ("cnn", "cnn_skip"):
        for key in ("width", "stages", "blocks"):
            if key in args and not positive_int(args[key]):
                raise UserError(f"model {name}: model.args.{key} must be a positive integer, got {args[key]!r}")
        if "batchnorm" in args and not isinstance(args["batchnorm"], bool):
            raise UserError(f"model {name}: model.args.batchnorm must be true or false, got {args['batchnorm']!r}")


def build_model(cfg: ModelConfig, in_shape: tuple, num_classes: int, weights: bool = True) -> nn.Module:
    """A fresh model for data of shape `in_shape` (C, H, W) and `num_classes` classes, seeded.
    `weights=False`: an hf: folder's weights are not loaded (its config builds it; a loader by
    rows reads them)."""
    torch.manual_seed(cfg.seed)
    name, args = cfg.name, dict(cfg.args)
    _check_builtin_args(name, args)
    try:
        if name == "mlp":
            n = 1
            for s in in_shape:
                n *= s
            model = MLP(n, num_classes, **args)
        elif name in ("cnn", "cnn_skip"):
            model = CNN(in_shape[0], num_classes, skip=(name == "cnn_skip"), **args)
        elif name == "mobilenet_v2":
            model = _torchvision_model("mobilenet_v2", num_classes, cfg.pretrained, args)
        elif name.startswith("hf:"):
            from . import hf
            model = hf.build_model(name.split(":", 1)[1], cfg.seed, weights)
        elif name.startswith("torchvision:"):
            model = _torchvision_model(name.split(":", 1)[1], num_classes, cfg.pretrained, args)
        else:
            model = import_object(name, "model")(**args)
    except UserError:
        raise  # already one line that names the problem (a UserError is a ValueError too)
    except TypeError as e:
        raise UserError(f"model {name}: bad model.args {args}: {e}")
    except (ValueError, RuntimeError) as e:
        if name.startswith("python:"):
            raise  # the user's own factory failed: its traceback is what they need
        raise UserError(f"model {name}: cannot build it with model.args {args}: {str(e).splitlines()[0][:200]}")
    if not isinstance(model, nn.Module):
        raise UserError(f"model {name}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    if cfg.pretrained and name in ("mlp", "cnn", "cnn_skip"):
        raise UserError(f"model.pretrained is for torchvision models; {name} has no published weights")
    return model


def load_checkpoint(model: nn.Module, path: str) -> dict:
    """Load a state dict saved by lldist.train (or a plain state dict, a safetensors file, or a
    HuggingFace checkpoint folder). Returns its metadata."""
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise UserError(f"checkpoint {path} is a folder, but not a HuggingFace checkpoint (no config.json): "
                            "give a checkpoint file, or a folder save_pretrained wrote")
        from . import hf
        state = hf.folder_state(path)
        missing = set(model.state_dict()) - set(state)
        if missing:
            raise UserError(f"checkpoint {path} does not fit model {type(model).__name__}: no {sorted(missing)[0]}")
        model.load_state_dict(state, strict=False)
        return {"checkpoint_folder": os.path.abspath(path)}
    obj, meta = read_checkpoint(path)
    for name, twin in tied(model).items():  # a file that saved a tied tensor once (safetensors)
        if name not in obj and twin in obj:
            obj[name] = obj[twin]
    try:
        model.load_state_dict(obj, strict=True)
    except RuntimeError as e:
        first = [ln.strip() for ln in str(e).splitlines() if ln.strip()][1:3]
        raise UserError(f"checkpoint {path} does not fit model {type(model).__name__}: {' '.join(first)[:300]}")
    return meta


def is_safetensors(path: str) -> bool:
    """A safetensors file: by its name, or by its header (8 bytes of length, then JSON)."""
    if path.endswith(".safetensors"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < (1 << 32)


META_KEY = "lldist_meta"  # a safetensors file's metadata entry holding lldist's (JSON)


def read_checkpoint(path: str, mmap: bool = False) -> tuple:
    """(state dict, metadata) of a checkpoint file: lldist's {"state_dict", "meta"} or a plain
    state dict saved by torch.save, or a safetensors file. With `mmap`, a torch file's tensors
    are memory-mapped (only what is touched is paged in; inputs/rows.py reads safetensors by
    rows itself)."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist")
    if is_safetensors(path):
        return _read_safetensors(path)
    try:
        with warnings.catch_warnings():  # torch warns of a plain pickle's protocol in two lines of its own
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist")
    except Exception as e:  # corrupt, truncated, or not a torch file
        import re
        text = str(e)
        if mmap and "mmap" in text:  # torch's old (non-zip) format cannot be mapped: read whole
            from .notes import note
            note(f"checkpoint {path} is in torch's old (non-zip) format, which cannot be memory-mapped: each rank "
                 "reads it whole (save it again with torch.save, or as safetensors, to read it by rows)")
            return read_checkpoint(path)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:  # torch's own text is a page of advice; the class it refused is what matters
            raise UserError(f"checkpoint {path} holds a Python object ({found.group(1)}) that lldist does not "
                            "unpickle (torch.load with weights_only=True: a checkpoint can run code); save a "
                            "plain state dict of tensors, with numbers and strings as metadata")
        refused = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text, re.S)
        with open(path, "rb") as f:
            pickled = f.read(1) == b"\x80"  # pickle's PROTO opcode: a plain pickle.dump (a torch file is a zip)
        if refused and pickled:  # a pickle torch's safe loader cannot read (an odd operand, an object)
            raise UserError(f"checkpoint {path} is a pickle torch.load reads only with weights_only=False, which "
                            f"can run code ({' '.join(refused.group(1).split())}); save it with torch.save as a "
                            "plain state dict of tensors")
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}: {' '.join(text.split())[:300]})")
    meta = {}
    if isinstance(obj, dict) and "state_dict" in obj:
        raw = obj.get("meta")
        meta = plain_meta({} if raw is None else raw)  # (a tensor has no truth value: no `or {}`)
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"checkpoint {path} holds no state dict of tensors")
    return obj, meta


def _read_safetensors(path: str) -> tuple:
    try:
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            meta = lldist_meta(f.metadata())
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # a truncated file, a damaged header
        raise UserError(f"checkpoint {path} cannot be read as safetensors ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]})")
    return state, meta


def lldist_meta(metadata) -> dict:
    """lldist's metadata from a safetensors file's (strings only: lldist's is one JSON entry)."""
    import json
    raw = (metadata or {}).get(META_KEY)
    try:
        return plain_meta(json.loads(raw)) if raw else {}
    except ValueError:
        return {"meta": raw}


def plain_meta(meta) -> dict:
    """A checkpoint's metadata as plain JSON values: tensors become numbers or lists, anything
    else odd becomes its text; a non-mapping is kept under "meta". Only stored, never trusted."""
    def plain(v):
        if isinstance(v, (str, int, float, bool)) or v is None:
            return v
        if isinstance(v, torch.Tensor):
            return v.item() if v.numel() == 1 else v.tolist()
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return str(v)
    return plain(meta) if isinstance(meta, dict) else {"meta": plain(meta)}


def tied(model: nn.Module) -> dict:
    """{name: the name it shares its tensor with} for the state entries a model holds twice (a
    language model's output layer tied to its embedding), each against its first name."""
    first, out = {}, {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in first:
            out[name] = first[id(t)]
        else:
            first[id(t)] = name
    return out


def save_checkpoint(model: nn.Module, path: str, meta: dict) -> None:
    """Written to a temporary name and renamed, so a killed run never leaves half a checkpoint.
    A path ending in .safetensors gets a safetensors file (a tied tensor saved once, the
    metadata as JSON); any other torch's zip format, which is memory-mapped too when read by
    rows (inputs/rows.py): both let a rank of a shard group read only its rows."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    if path.endswith(".safetensors"):
        import json
        try:
            from safetensors.torch import save_file
        except ImportError as e:
            raise UserError(f"checkpoint {path}: writing safetensors needs the safetensors package ({e}): "
                            "pip install safetensors, or name the checkpoint .pt")
        twins = tied(model)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in twins}
        save_file(state, tmp, metadata={META_KEY: json.dumps(plain_meta(meta))})
    else:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save({"state_dict": state, "meta": meta}, tmp)
    os.replace(tmp, path)
