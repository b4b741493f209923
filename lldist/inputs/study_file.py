"""A study file: several variants of one job (model x batch size, or any keys), each a
validated job. `python -m lldist.study` runs them (lldist/runs/study.py) and reports.

    study = load_study("jobs/study_digits.yaml")    # Study(name, out, variants, curvature, sharpness)
    for v in study.variants: v.name, v.job, v.label, v.cross

A study file holds `name`, `out` (a folder), `base` (a job, as in a job file), `variants` (a
list of {label, key.sub: value, ...} overrides), `cross` (key: [values]: every variant is
run at every combination; `train.seed: [0, 1, 2]` makes the seed-to-seed variation one of
the report's error bars), `curvature` (the Hessian at each variant's theta*: `true`, or a
mapping of the job's `curvature:` keys, over the study's defaults below and the base job's
own; `false` for none) and `sharpness` (`true`, or a mapping of the job's `sharpness:` keys:
the sharpness measures at each variant's theta*; default none). Each variant lives in
`<out>/<label>_<cross values>/` (model.pt, per-epoch checkpoints, surface.h5, plots).
"""

from __future__ import annotations

import copy
import itertools
import os
import re
from dataclasses import dataclass

import yaml

from ..config import apply_override, job_from_dict, load_yaml, read_text
from ..errors import UserError

SHORT = {"batch_size": "b", "lr": "lr", "epochs": "e", "seed": "s", "weight_decay": "wd", "optimizer": ""}
# A study's Hessian at theta* by default, beneath the base job's and the study's own curvature
# keys: on the training loss (sharpness is a property of the minimum training found: Keskar et
# al. 2017), on a small fixed sample of batches of eval.batch_size.
CURVATURE = {"split": "train", "batches": 2, "top": 2, "trace_samples": 32}


@dataclass
class Variant:
    name: str
    job: object  # config.Job
    label: str = ""
    cross: tuple = ()  # ((key, value), ...): where this variant sits in the study's cross


@dataclass
class Study:
    """A study file, read and checked: every variant a validated job."""
    name: str
    out: str  # the folder of the variants and the report
    variants: list  # [Variant], in the file's order, each at every combination of the cross
    curvature: bool  # the Hessian at each variant's theta*, with its job's curvature: settings
    sharpness: bool  # the sharpness measures at each variant's theta*


def load_study(path: str) -> Study:
    """The study file at `path` (see the module docstring); a bad one is one UserError."""
    raw = load_yaml(read_text(path, "study file"), path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a study file must be a mapping")
    unknown = set(raw) - {"name", "out", "base", "variants", "cross", "curvature", "sharpness"}
    if unknown:
        raise UserError(f"{path}: unknown key '{sorted(unknown)[0]}' (known: name, out, base, variants, cross, "
                        "curvature, sharpness)")
    sharp = raw.get("sharpness", False)
    if sharp not in (True, False, None) and not isinstance(sharp, dict):
        raise UserError(f"{path}: 'sharpness' must be true, false or a mapping of sharpness keys, got {sharp!r}")
    for key in ("name", "out"):
        if key in raw and not (isinstance(raw[key], str) and raw[key].strip()):
            raise UserError(f"{path}: '{key}' must be a non-empty string, got {raw[key]!r}")
    out = raw.get("out") or os.path.join("runs", raw.get("name", "study"))
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise UserError(f"{path}: 'base' must be a mapping of job keys, got {type(base).__name__}")
    curv = raw.get("curvature", True)
    if curv not in (True, False, None) and not isinstance(curv, dict):
        raise UserError(f"{path}: 'curvature' must be true, false or a mapping of curvature keys, got {curv!r}")
    for key in ("sharpness", "curvature"):
        if not isinstance(base.get(key) or {}, dict):
            raise UserError(f"{path}: 'base.{key}' must be a mapping of {key} keys, got {base[key]!r}")
    # the study's sharpness: and curvature: mappings are the job's own sections in every variant,
    # checked as a job's; the Hessian's over the study's defaults (CURVATURE) and the base job's
    if isinstance(sharp, dict):
        base = {**base, "sharpness": {**(base.get("sharpness") or {}), **sharp}}
    if curv not in (False, None):
        base = {**base, "curvature": {**CURVATURE, **(base.get("curvature") or {}),
                                      **(curv if isinstance(curv, dict) else {})}}
    variants = raw.get("variants") or [{"label": "base"}]
    cross = raw.get("cross") or {}
    if not isinstance(variants, list) or not all(isinstance(v, dict) and "label" in v for v in variants):
        raise UserError(f"{path}: 'variants' must be a list of mappings, each with a 'label'")
    if not isinstance(cross, dict) or not all(isinstance(v, list) and v for v in cross.values()):
        raise UserError(f"{path}: 'cross' must map keys to non-empty lists of values")
    labels = [str(v["label"]) for v in variants]
    for lab in labels:  # each variant gets a folder named after its label, inside `out`
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", lab):
            raise UserError(f"{path}: variant label {lab!r} is not a plain name (letters, digits, _ . + -, not "
                            "starting with a dot): it names the variant's folder")
    twice = sorted({lab for lab in labels if labels.count(lab) > 1})
    if twice:
        raise UserError(f"{path}: variant label {twice[0]!r} is used more than once (each variant gets a "
                        "folder named after its label)")
    result = []
    for v in variants:
        for combo in itertools.product(*cross.values()) if cross else [()]:
            sets = {k: val for k, val in v.items() if k != "label"}
            sets.update(dict(zip(cross.keys(), combo)))
            suffix = "_".join(f"{SHORT.get(k.split('.')[-1], k.split('.')[-1])}{val}"
                              for k, val in zip(cross.keys(), combo))
            name = f"{v['label']}_{suffix}" if suffix else str(v["label"])
            job_raw = copy.deepcopy(base)
            for k, val in sets.items():
                apply_override(job_raw, f"{k}={yaml.safe_dump(val, default_flow_style=True).strip()}", path)
            folder = os.path.join(out, name)
            job_raw["name"] = name
            job_raw["output"] = os.path.join(folder, "surface.h5")
            job_raw.setdefault("model", {})
            if job_raw.get("train") is not None:
                job_raw["model"]["checkpoint"] = os.path.join(folder, "model.pt")
            text = yaml.safe_dump(job_raw, sort_keys=False)
            result.append(Variant(name, job_from_dict(job_raw, f"{path}#{name}", text), str(v["label"]),
                                  tuple(zip(cross.keys(), combo))))
    return Study(raw.get("name", "study"), out, result, curv not in (False, None), sharp not in (False, None))
