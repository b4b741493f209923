"""Write a seeded HuggingFace model from its config straight to sharded safetensors (no
training): a folder an `hf:` job reads, each rank of a shard group reading only its rows.

    python tools/seeded_model.py jobs/models/llama_600m runs/llama_600m            # the config's folder -> weights
    python tools/seeded_model.py jobs/models/tiny_gpt runs/tiny_gpt --shard-size 1MB --seed 3

The folder gets config.json, the tokenizer files of the config's folder, and the weights as
model-0000k-of-0000n.safetensors with model.safetensors.index.json (save_pretrained's layout),
each shard at most --shard-size. The weights are the config's initialization under
torch.manual_seed(seed), as lldist builds an hf: config folder that holds no weights with
model.seed: seed, so a job on the written folder and one on the config with model.seed give
the same θ*.
"""

import argparse
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "tokenizer.model")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="a folder with config.json (and its tokenizer's files)")
    ap.add_argument("out", help="the folder to write")
    ap.add_argument("--seed", type=int, default=0, help="torch.manual_seed before the model is made (model.seed)")
    ap.add_argument("--shard-size", default="500MB", help="largest safetensors shard (save_pretrained's max_shard_size)")
    args = ap.parse_args(argv)
    from lldist.errors import UserError
    from lldist.workloads import hf
    if not os.path.isfile(os.path.join(args.config, "config.json")):
        print(f"seeded_model: {args.config} has no config.json", file=sys.stderr)
        return 2
    if os.path.abspath(args.config) == os.path.abspath(args.out):
        print("seeded_model: write to another folder than the config's", file=sys.stderr)
        return 2
    try:
        model = hf.build_model(args.config, args.seed, weights=False)
    except UserError as e:
        print(f"seeded_model: {e}", file=sys.stderr)
        return 2
    tmp = args.out.rstrip("/") + ".tmp"  # written whole, then renamed: a killed run leaves no half folder
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size=args.shard_size, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(args.config, name)):
            shutil.copy(os.path.join(args.config, name), tmp)
    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(tmp, args.out)
    n = sum(p.numel() for p in model.parameters())
    files = sorted(f for f in os.listdir(args.out) if f.endswith(".safetensors"))
    print(f"seeded_model: {type(model).__name__}, {n:,} parameters, seed {args.seed} -> {args.out} "
          f"({len(files)} safetensors file(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
