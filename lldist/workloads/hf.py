"""HuggingFace models and data sets: the workloads' transformers and datasets user
(an optional extra: pip install 'lldist[hf]').

    model: {name: "hf:bert-base-uncased"}          # or a local folder: hf:jobs/models/tiny_bert
    data:  {name: "hf:glue", args: {config: sst2, text: sentence, label: label, max_length: 128}}
    data:  {name: "hf:csv", root: jobs/data/pydoc_topics, args: {max_length: 48}}   # local files

Models: AutoModelForCausalLM when the config's architectures name a causal LM (...LMHeadModel,
...ForCausalLM), else AutoModelForSequenceClassification. A folder with weights (or a hub
name) is loaded with from_pretrained; a folder with only config.json is built from the config,
seeded by model.seed (what lldist.train then trains). Data: `hf:csv`, `hf:json`, `hf:parquet`
with `<root>/{train,test}.<ext>` files; a folder written by `Dataset.save_to_disk` /
`DatasetDict.save_to_disk`; or a hub data set (`load_dataset(name, args.config)`, online or
from the local cache). Texts are tokenized once, padded to `max_length` with attention masks,
by the tokenizer in `data.args.tokenizer` or the `hf:` model folder.
"""

from __future__ import annotations

import os

import torch

from ..config import DataConfig
from ..errors import UserError
from .notes import note
from .tensors import DictSet

DATA_FILE_BUILDERS = {"csv": "csv", "json": "json", "parquet": "parquet"}


def require():
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise UserError(f"hf: models and data need the HuggingFace libraries ({e.name or e}): "
                        "pip install 'lldist[hf]'")
    try:  # its "Loading weights" bar, on every rank, stood before lldist's own lines
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:
        pass
    return transformers


def _config(path: str):
    transformers = require()
    try:
        return transformers.AutoConfig.from_pretrained(path)
    except Exception as e:  # OSError offline or not found, ValueError for a foreign folder
        raise UserError(f"model hf:{path}: cannot read its config ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}); offline, give a local folder")


def is_causal(config) -> bool:
    return any(a.endswith("LMHeadModel") or "ForCausalLM" in a for a in (config.architectures or []))


def has_weights(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in
               ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"))


def adapter_base(path: str):
    """The base model of a PEFT adapter folder (adapter_config.json), or None for a model."""
    import json
    cfg = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg):
        return None
    try:
        with open(cfg) as f:
            return json.load(f)["base_model_name_or_path"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"model hf:{path}: its adapter_config.json names no base model ({type(e).__name__})")


def model_folder(path: str) -> str:
    """Where a model's config and tokenizer are: the folder, or an adapter's base model."""
    return adapter_base(path) or path


def build_model(path: str, seed: int, weights: bool = True) -> torch.nn.Module:
    """The config says the number of labels (num_labels), as HuggingFace configs do. A PEFT
    adapter folder (LoRA, ...) is loaded onto its base model with its parameters trainable and
    the base's frozen (pip install 'lldist[peft]'): `directions.params: {trainable_only: true}`
    then moves the adapter alone. `weights=False`: built from the config, the folder's weights
    not loaded (a loader by rows reads them)."""
    base = adapter_base(path)
    if base is not None:
        try:
            import peft
        except ImportError as e:
            raise UserError(f"model hf:{path} is a PEFT adapter, and peft cannot be imported ({e}): "
                            "pip install 'lldist[peft]'")
        model = build_model(base, seed)
        try:
            return peft.PeftModel.from_pretrained(model, path, is_trainable=True)
        except Exception as e:
            raise UserError(f"model hf:{path}: cannot load this adapter onto {base} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]})")
    transformers = require()
    config = _config(path)
    auto = transformers.AutoModelForCausalLM if is_causal(config) else transformers.AutoModelForSequenceClassification
    try:
        if os.path.isdir(path) and (not weights or not has_weights(path)):
            torch.manual_seed(seed)
            return auto.from_config(config)
        return auto.from_pretrained(path)
    except Exception as e:
        raise UserError(f"model hf:{path}: cannot build it ({type(e).__name__}: {str(e).splitlines()[0][:200]})")


def folder_state(path: str) -> dict:
    """The state dict of a HuggingFace checkpoint folder (model.checkpoint given as a folder)."""
    transformers = require()
    auto = transformers.AutoModelForCausalLM if is_causal(_config(path)) else \
        transformers.AutoModelForSequenceClassification
    try:
        return auto.from_pretrained(path).state_dict()
    except Exception as e:
        raise UserError(f"checkpoint {path}: cannot load this HuggingFace folder ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]})")


def _dataset_split(cfg: DataConfig, split: str):
    try:
        import datasets
    except ImportError as e:
        raise UserError(f"hf: data needs the HuggingFace datasets library ({e}): pip install 'lldist[hf]'")
    datasets.disable_progress_bars()  # its bars would stand before any error line, on every rank
    name = cfg.name.split(":", 1)[1]
    names = [split] if split == "train" else \
        ([cfg.args["test_split"]] if cfg.args.get("test_split") else ["test", "validation"])
    try:
        if name in DATA_FILE_BUILDERS:
            if not cfg.root:
                raise UserError(f"data hf:{name}: data.root must name the folder of train/test files")
            ext = name if name != "json" else "jsonl"
            files = {n: os.path.join(cfg.root, f"{n}.{e}") for n in ("train", "test", "validation")
                     for e in (name, ext) if os.path.exists(os.path.join(cfg.root, f"{n}.{e}"))}
            if not files:
                raise UserError(f"data hf:{name}: no train/test .{name} files in {cfg.root}")
            dd = datasets.load_dataset(DATA_FILE_BUILDERS[name], data_files=files)
        elif os.path.isdir(cfg.root or name):
            dd = datasets.load_from_disk(cfg.root or name)
        else:
            dd = datasets.load_dataset(name, cfg.args.get("config"))
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"data hf:{name}: cannot load it ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    if isinstance(dd, datasets.Dataset):
        return dd
    for n in names:
        if n in dd:
            return dd[n]
    raise UserError(f"data hf:{name}: no {' or '.join(names)} split (has {', '.join(dd)})")


def load_text(cfg: DataConfig, split: str, model_name: str = ""):
    """A DictSet of input_ids, attention_mask (and labels when the set has a label column)."""
    transformers = require()
    args = {"text": "text", "label": "label", "max_length": 64, **cfg.args}
    unknown = set(args) - {"text", "label", "max_length", "tokenizer", "config", "test_split"}
    if unknown:
        raise UserError(f"data {cfg.name}: unknown data.args key {sorted(unknown)[0]!r} "
                        "(known: text, label, max_length, tokenizer, config, test_split)")
    ml = args["max_length"]
    if isinstance(ml, bool) or not isinstance(ml, int) or ml < 2:
        raise UserError(f"data {cfg.name}: data.args.max_length must be a whole number of tokens >= 2, got {ml!r}")
    model_path = model_folder(model_name.split(":", 1)[1]) if model_name.startswith("hf:") else None
    tok_path = args.get("tokenizer") or model_path
    if not tok_path:
        raise UserError(f"data {cfg.name}: no tokenizer: set data.args.tokenizer or use an hf: model")
    if model_path:
        _config(model_path)  # a missing or broken model says so, not "cannot load the tokenizer"
    try:
        tok = transformers.AutoTokenizer.from_pretrained(tok_path)
    except Exception as e:
        raise UserError(f"data {cfg.name}: cannot load the tokenizer of {tok_path} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160] if str(e) else ''})")
    ds = _dataset_split(cfg, split)
    if args["text"] not in ds.column_names:
        raise UserError(f"data {cfg.name}: no text column {args['text']!r} (columns: {', '.join(ds.column_names)}); "
                        "set data.args.text")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(list(ds[args["text"]]), padding="max_length", truncation=True, max_length=ml, return_tensors="pt")
    tensors = {k: v for k, v in enc.items()}
    _check_tokenizer(tok, tok_path, tensors, model_path, cfg.name, split)
    num_classes = 0
    label = args["label"]
    if label and label not in ds.column_names and "label" in cfg.args:
        raise UserError(f"data {cfg.name}: no label column {label!r} (columns: {', '.join(ds.column_names)}); "
                        "set data.args.label, or null for a language model")
    if label and label in ds.column_names:
        tensors["labels"] = _labels(ds[label], label, cfg.name, split)
        num_classes = int(tensors["labels"].max()) + 1 if len(tensors["labels"]) else 0
    return DictSet(tensors, num_classes)


def _labels(values, column: str, name: str, split: str) -> torch.Tensor:
    """Class labels 0..C-1 as int64; anything else is refused with one line."""
    values = list(values)
    odd = next((v for v in values if isinstance(v, bool) or not isinstance(v, int)), None)
    if odd is not None:
        raise UserError(f"data {name}: label column {column!r} of the {split} split holds {type(odd).__name__} values "
                        f"such as {odd!r}; labels must be class numbers 0, 1, ... (a ClassLabel column)")
    labels = torch.as_tensor(values, dtype=torch.int64)
    if len(labels) and int(labels.min()) < 0:
        raise UserError(f"data {name}: label column {column!r} of the {split} split holds {int(labels.min())} "
                        "(hidden labels, as in GLUE's test split: use data.args.test_split: validation)")
    return labels


_ANNOUNCED = set()
UNK_SHARE = 0.5  # more than this share of the real tokens unknown: the tokenizer is not the model's


def _check_tokenizer(tok, path: str, tensors: dict, model_path, name: str, split: str = "") -> None:
    """A tokenizer that does not fit the model is refused: a folder saved without its tokenizer
    files gets a tiny default one from transformers, and every word becomes [UNK]."""
    ids, mask = tensors["input_ids"], tensors.get("attention_mask", torch.ones_like(tensors["input_ids"]))
    real = int(mask.sum())
    unk = int(((ids == tok.unk_token_id) & mask.bool()).sum()) if tok.unk_token_id is not None else 0
    vocab = len(tok)
    model_vocab = getattr(_config(model_path), "vocab_size", None) if model_path else None
    if path not in _ANNOUNCED:
        _ANNOUNCED.add(path)
        note(f"tokenizer {type(tok).__name__} from {path}: {vocab:,} tokens"
             + (f" (the model's vocabulary: {model_vocab:,})" if model_vocab else "")
             + (f", {100 * unk / real:.1f}% of the {split + ' split' if split else 'text'}'s tokens unknown"
                if real else ""))
    if real and unk > UNK_SHARE * real:
        raise UserError(f"data {name}: {100 * unk / real:.0f}% of the {split} split's tokens are unknown ({tok.unk_token}) to the "
                        f"tokenizer from {path} ({vocab:,} tokens): it is not this text's tokenizer (a model folder "
                        "saved without its tokenizer files?); set data.args.tokenizer")
    if model_vocab and vocab < model_vocab // 100:
        raise UserError(f"data {name}: the tokenizer from {path} has {vocab:,} tokens, the model's vocabulary "
                        f"{model_vocab:,}: it is not the model's tokenizer (saved without its files?); set "
                        "data.args.tokenizer")
