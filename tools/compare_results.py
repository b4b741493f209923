"""Compare two folders of lldist results bit for bit (tools/layout_reference.sh makes them).

    python tools/compare_results.py runs/ref_before runs/ref_after

Every HDF5 file: every dataset's bytes (NaN where NaN), every attribute's value, except what
records when and where a run happened (times, hosts, the git revision, seconds, the
coordinator's timings, the per-chunk work log, which with several ranks depends on who asked
first). Every checkpoint (.pt): every tensor's bytes and its metadata. Every report (.md):
its text. Prints each difference; exits 1 if there is any.
"""

import json
import os
import sys

import h5py
import numpy as np
import torch

# what differs between two runs of the same job by design: when, where, how fast, who did it
VOLATILE_ATTRS = {"created", "last_started", "last_finished", "hostname", "git_revision", "runs", "seconds",
                  "coordinator_ms_per_message", "coordinator_ms_median", "coordinator_ms_p99", "coordinator_ms_max",
                  "coordinator_results", "python_version", "lldist_version", "torch_version", "numpy_version",
                  "h5py_version", "forward_passes",
                  # HDF5's dimension-scale bookkeeping: object references, equal only as objects
                  "DIMENSION_LIST", "REFERENCE_LIST"}
VOLATILE_DATASETS = {"chunks", "nchunks", "cell_chunk"}


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.dtype.kind == "f":
            return bool(np.array_equal(a.view(f"u{a.itemsize}"), b.view(f"u{b.itemsize}")))
        return bool(np.array_equal(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (a != a and b != b)
    return a == b


def _attrs(name: str, a, b, out: list) -> None:
    for k in sorted(set(a) | set(b)):
        if k in VOLATILE_ATTRS:
            continue
        if k not in a or k not in b:
            out.append(f"{name}@{k}: only in {'after' if k not in a else 'before'}")
            continue
        va, vb = a[k], b[k]
        if isinstance(va, str) and isinstance(vb, str) and va[:1] in "[{" and k not in ("job_yaml",):
            try:
                va, vb = json.loads(va), json.loads(vb)
            except ValueError:
                pass
        if isinstance(va, dict) and isinstance(vb, dict):  # JSON: volatile keys inside too
            va = {kk: vv for kk, vv in va.items() if kk not in VOLATILE_ATTRS}
            vb = {kk: vv for kk, vv in vb.items() if kk not in VOLATILE_ATTRS}
        if not _same(va, vb):
            out.append(f"{name}@{k}: {str(va)[:80]} != {str(vb)[:80]}")


def compare_h5(pa: str, pb: str) -> list:
    out = []
    with h5py.File(pa, "r") as fa, h5py.File(pb, "r") as fb:
        _attrs("/", fa.attrs, fb.attrs, out)
        names = set()
        for f in (fa, fb):  # (visit stops at the first callback that returns something: add returns None)
            f.visit(names.add)
        for n in sorted(names):
            if n.split("/")[-1] in VOLATILE_DATASETS:
                continue
            if n not in fa or n not in fb:
                out.append(f"/{n}: only in {'after' if n not in fa else 'before'}")
                continue
            oa, ob = fa[n], fb[n]
            _attrs(f"/{n}", oa.attrs, ob.attrs, out)
            if isinstance(oa, h5py.Dataset) and not _same(oa[()], ob[()]):
                out.append(f"/{n}: the values differ")
    return out


def compare_pt(pa: str, pb: str) -> list:
    a, b = torch.load(pa, weights_only=False), torch.load(pb, weights_only=False)
    out = []
    sa, sb = a.get("state_dict", a), b.get("state_dict", b)
    for k in sorted(set(sa) | set(sb)):
        if k not in sa or k not in sb or not torch.equal(sa[k], sb[k]):
            out.append(f"tensor {k} differs")
    ma = {k: v for k, v in a.get("meta", {}).items() if k not in VOLATILE_ATTRS}
    mb = {k: v for k, v in b.get("meta", {}).items() if k not in VOLATILE_ATTRS}
    if json.dumps(ma, sort_keys=True, default=str) != json.dumps(mb, sort_keys=True, default=str):
        out.append("metadata differs")
    return out


def main(before: str, after: str) -> int:
    found, bad = 0, 0
    for d, _, files in sorted(os.walk(before)):
        for f in sorted(files):
            pa = os.path.join(d, f)
            pb = os.path.join(after, os.path.relpath(pa, before))
            kind = os.path.splitext(f)[1]
            if kind not in (".h5", ".pt", ".md"):
                continue
            found += 1
            if not os.path.exists(pb):
                print(f"{pb}: missing")
                bad += 1
                continue
            if kind == ".h5":
                diffs = compare_h5(pa, pb)
            elif kind == ".pt":
                diffs = compare_pt(pa, pb)
            else:
                diffs = [] if open(pa).read() == open(pb).read() else ["the text differs"]
            for x in diffs:
                print(f"{os.path.relpath(pa, before)}: {x}")
            bad += bool(diffs)
    print(f"{found} files compared, {bad} differ")
    return 1 if bad or not found else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
