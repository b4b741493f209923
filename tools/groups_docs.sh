#!/bin/bash
# The numbers of docs/GROUPS.md's "Models no rank holds" section: memory per rank and cells/s
# of GPT-2 small in shard groups built by rows, and the 608M-parameter Llama job that four
# unsharded ranks could not run here. Run from the repository root:
#   bash tools/groups_docs.sh > runs/groups_docs.log 2>&1
# About an hour on 2 cores; the Llama part needs 12 GB of memory free.
set -euo pipefail
ROOT=$(pwd)
PY=${PY:-$ROOT/.venv/bin/python}
BIN=$(dirname "$PY")
export PATH=$BIN:$PATH OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
mkdir -p runs/groups_docs
# GPT-2 small at its seeded initialization, read from safetensors: two groups of one against a
# shard group of two on 2 ranks (the speed comparison), then sizes 1, 2, 4 on 4 ranks (memory)
"$PY" -m lldist.bench groups --models gpt2 --ranks 2 --sizes 1 2 --json docs/bench_groups_rows2.json
"$PY" -m lldist.bench groups --models gpt2 --ranks 4 --sizes 1 2 4 --json docs/bench_groups_rows4.json
"$PY" -m lldist.bench groups --models mlp --json docs/bench_groups_mlp.json
# eval.precision: bf16 in a shard group (FSDP2 gathers in bf16) against fp32 and bf16 on one rank
# (a CPU without AVX-512 runs bf16 about 30x slower than fp32: more than 15 minutes a setting)
"$PY" -m lldist.bench groups --models gpt2 --ranks 2 --sizes 1 2 --modes shard --keep runs/groups_docs/fp32
"$PY" -m lldist.bench groups --models gpt2 --ranks 2 --sizes 1 2 --modes shard --keep runs/groups_docs/bf16 \
  --set eval.precision=bf16
# Llama, 608M parameters: written as sharded safetensors (seeded, no training), then one shard
# group of four ranks, and one unsharded process for the same numbers
[ -f runs/llama_600m/model.safetensors.index.json ] || "$PY" tools/seeded_model.py jobs/models/llama_600m runs/llama_600m
"$PY" -m lldist.bench groups --job jobs/llm_llama.yaml --ranks 4 --sizes 4 --modes shard --keep runs/groups_docs/llama \
  --json docs/bench_groups_llama4.json
"$PY" -m lldist.bench groups --job jobs/llm_llama.yaml --ranks 1 --sizes 1 --keep runs/groups_docs/llama \
  --json docs/bench_groups_llama1.json
# the largest difference between files, relative to the quantity's largest value
agree() { "$PY" -c "
import sys, h5py, numpy as np
a, b = (h5py.File(p, 'r') for p in sys.argv[1:3])
for q in a['test']:
    x, y = a['test/' + q][()], b['test/' + q][()]
    print(f'{q}: largest |difference| {np.nanmax(np.abs(x - y)):.3g}, relative {np.nanmax(np.abs(x - y)) / np.nanmax(np.abs(x)):.3g}')
" "$@"; }
agree runs/groups_docs/llama/llm_llama_1_data.h5 runs/groups_docs/llama/llm_llama_4_shard.h5
agree runs/groups_docs/fp32/gpt2_1_data.h5 runs/groups_docs/bf16/gpt2_2_shard.h5   # bf16 shard group against fp32
agree runs/groups_docs/bf16/gpt2_1_data.h5 runs/groups_docs/bf16/gpt2_2_shard.h5   # against bf16 on one rank
