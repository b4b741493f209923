"""Build the small text data set the text-model jobs use, from docstrings of Python's own
standard library (a package every machine has; no download), and write it where the jobs read it.

    python tools/make_text_data.py              # -> jobs/data/pydoc_topics/{train,test}.csv
    python tools/make_text_data.py --models     # -> jobs/models/tiny_{bert,gpt}/ (needs lldist[hf])

Each row is one sentence of a docstring, labelled by the topic of its module: 0 files and
processes (os, shutil, pathlib, ...), 1 text (re, string, textwrap, ...), 2 numbers (math,
statistics, random, ...), 3 dates and times (datetime, time, calendar, ...). The rows depend
on the Python version that made them, so the CSV files are committed: the jobs read those.
"""

import csv
import hashlib
import importlib
import inspect
import os
import re

TOPICS = {
    0: ["os", "os.path", "shutil", "pathlib", "glob", "fnmatch", "tempfile", "subprocess", "stat", "filecmp"],
    1: ["re", "string", "textwrap", "difflib", "unicodedata", "codecs", "html", "shlex"],
    2: ["math", "cmath", "statistics", "random", "fractions", "decimal", "numbers", "operator"],
    3: ["datetime", "time", "calendar", "zoneinfo", "sched"],
}
WORDS = re.compile(r"[A-Za-z][A-Za-z0-9_']*")


def sentences(module):
    seen = set()
    objs = [module] + [getattr(module, n) for n in dir(module) if not n.startswith("_")]
    for obj in objs:
        members = [obj] + ([getattr(obj, n) for n in dir(obj) if not n.startswith("_")] if inspect.isclass(obj) else [])
        for m in members:
            doc = inspect.getdoc(m) if (inspect.isroutine(m) or inspect.isclass(m) or inspect.ismodule(m)) else None
            if not doc:
                continue
            for s in re.split(r"(?<=[.!?])\s+|\n\s*\n", doc):
                s = " ".join(s.split())
                n = len(WORDS.findall(s))
                if 5 <= n <= 30 and s not in seen and not s.startswith((">>>", "...")):
                    seen.add(s)
                    yield s


def main(out="jobs/data/pydoc_topics", per_topic=400):
    rows = {"train": [], "test": []}
    for label, names in TOPICS.items():
        got = []
        for name in names:
            try:
                got.extend(sentences(importlib.import_module(name)))
            except ImportError:
                continue
        got = sorted(set(got), key=lambda s: hashlib.sha256(s.encode()).hexdigest())[:per_topic]
        for s in got:  # a fixed 80/20 split by hash
            split = "test" if int(hashlib.sha256(s.encode()).hexdigest(), 16) % 5 == 0 else "train"
            rows[split].append((s, label))
    os.makedirs(out, exist_ok=True)
    for split, rs in rows.items():
        rs.sort(key=lambda r: hashlib.sha256(r[0].encode()).hexdigest())
        with open(os.path.join(out, f"{split}.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(rs)
        print(f"{split}: {len(rs)} rows, per topic {[sum(1 for r in rs if r[1] == t) for t in TOPICS]}")


def make_models(data="jobs/data/pydoc_topics", out="jobs/models"):
    """A word-level tokenizer learnt from the training sentences, and two model folders that
    hold a config and that tokenizer but no weights: lldist builds the model from the config
    (seeded by model.seed) and lldist.train trains it. tiny_bert: a 2-layer BERT-style encoder
    for sequence classification; tiny_gpt: a 2-layer GPT-2-style causal language model."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, GPT2Config, PreTrainedTokenizerFast
    with open(os.path.join(data, "train.csv")) as f:
        texts = [row["text"] for row in csv.DictReader(f)]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    for kind in ("bert", "gpt"):
        tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.train_from_iterator(texts, trainers.WordLevelTrainer(min_frequency=2, special_tokens=specials))
        if kind == "bert":
            tok.post_processor = processors.TemplateProcessing(
                single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]")
        folder = os.path.join(out, f"tiny_{kind}")
        os.makedirs(folder, exist_ok=True)
        fast.save_pretrained(folder)
        vocab = tok.get_vocab_size()
        if kind == "bert":
            cfg = BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=128, max_position_embeddings=64, num_labels=len(TOPICS),
                             pad_token_id=0)
            cfg.architectures = ["BertForSequenceClassification"]
        else:
            cfg = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                             bos_token_id=2, eos_token_id=3, pad_token_id=0)
            cfg.architectures = ["GPT2LMHeadModel"]
        cfg.save_pretrained(folder)
        print(f"{folder}: vocabulary {vocab}")


if __name__ == "__main__":
    import sys
    make_models() if "--models" in sys.argv else main()
