#!/bin/bash
# The numbers of docs/CURVATURE.md that lldist.hessian makes: θ* of the digits CNNs under the
# three operators with per-layer blocks (in runs/curv, where the page's surfaces and
# checkpoints are), and GPT-2 small's spectrum over two ranks. Run from the repository root:
#   bash tools/curvature_docs.sh > runs/curvature_docs.log 2>&1
# (the page's commands block says how runs/curv's surfaces were made). About 25 minutes on 2 cores (GPT-2 small: 20).
set -euo pipefail
ROOT=$(pwd)
PY=${PY:-$ROOT/.venv/bin/python}
MPIEXEC=${MPIEXEC:-$ROOT/.venv/bin/mpiexec}
export OMP_NUM_THREADS=1
J=$ROOT/jobs/quickstart.yaml
cd runs/curv
for m in cnn cnn_skip; do
  A="--set model.name=$m --set model.checkpoint=$m.pt --set eval.batch_size=90"
  # the Hessian: top 5, density, and the layers' blocks
  "$PY" -m lldist.hessian "$J" $A --top 5 --batches 4 --density --set curvature.blocks=layers --out ${m}_random.h5
  for op in ggn fisher; do
    "$PY" -m lldist.hessian "$J" $A --top 5 --batches 4 --set curvature.operator=$op --set curvature.blocks=layers \
      --out ${m}_random.h5
  done
  "$PY" -m lldist.info ${m}_random.h5 | sed -n '/curvature at/,/run rank/p'
done
"$PY" -m lldist.plot cnn_random.h5 cnn_skip_random.h5 --dpi 120
cd "$ROOT"
# GPT-2 small (124M parameters, jobs/llm_gpt2.yaml's checkpoint): products over two ranks, on
# 2 batches of 4 sequences; the top and the smallest eigenvalue (tolerance 1e-2, one Lanczos
# run on each rank's half of every vector), the trace and each transformer block's trace. No
# block top eigenvalues, no density: a rank of this model holds 10-12 GB here.
"$MPIEXEC" -n 2 "$PY" -m lldist.hessian jobs/llm_gpt2.yaml --top 1 --batches 2 --trace-samples 8 --tol 1e-2 \
  --set eval.batch_size=4 --set curvature.blocks=transformer --no-block-top
"$PY" -m lldist.info runs/llm_gpt2/surface.h5 | sed -n '/curvature at/,/run rank/p'
"$PY" -m lldist.plot runs/llm_gpt2/surface.h5 --dpi 120
# the small GPT-style and BERT-style jobs (trained by their own jobs), the whole recipe
for j in text_gpt text_bert; do
  "$MPIEXEC" -n 2 "$PY" -m lldist.hessian jobs/$j.yaml --top 3 --batches 4 --trace-samples 64 --density \
    --density-runs 2 --density-steps 60 --set eval.batch_size=64 --set curvature.blocks=transformer
  "$PY" -m lldist.info runs/$j/surface.h5 | sed -n '/curvature at/,/run rank/p'
  "$PY" -m lldist.plot runs/$j/surface.h5 --dpi 120
done
