#!/bin/bash
# Result files from fixed seeds, one of each kind lldist makes, for checking that a change of
# the code's layout leaves every number as it was (issue 31: "numbers unchanged"):
#   bash tools/layout_reference.sh runs/ref_before      # on the old code
#   bash tools/layout_reference.sh runs/ref_after       # on the new code
#   python tools/compare_results.py runs/ref_before runs/ref_after
# Makes: a 2D surface on both splits (with per-cell curvature maps), an interpolation, a PCA
# plane, Hessian directions, directions from a file, directions kept as a recipe, an adaptive
# grid, a plane through three models, lldist.connect's curve, line and plane (aligned),
# repeats, the Hessian at theta* with blocks and the GGN and its density, the sharpness
# measures, a study of two variants with both, and rank groups (data and shard) over two
# ranks. About 6 minutes on 2 cores. Everything runs through the command lines, which the
# change must not alter.
set -euo pipefail
OUT=${1:?usage: layout_reference.sh OUTDIR}
ROOT=$(pwd)
PY=${PY:-$ROOT/.venv/bin/python}
MPIEXEC=${MPIEXEC:-$ROOT/.venv/bin/mpiexec}
export OMP_NUM_THREADS=1 PYTHONPATH=$ROOT
# built in one fixed folder, then moved: a bend's and an aligned checkpoint's metadata hold
# absolute paths, and the files' job hashes hold those checkpoints' sha256
WORK=$ROOT/runs/layout_reference
rm -rf "$OUT" "$WORK" && mkdir -p "$WORK" "$(dirname "$OUT")" && cd "$WORK"
q="--progress-every 0"

cat > base.yaml <<'EOF'
name: ref
output: surface.h5
model: {name: mlp, checkpoint: model.pt, args: {hidden: [24]}}
data: {name: digits, subset: 300}
train: {epochs: 3, lr: 0.01, batch_size: 64, seed: 0}
directions: {seed: 3, norm: filter, ignore: biasbn}
grid: {x: [-1.0, 1.0, 9], y: [-0.5, 0.5, 7]}
eval: {split: both, batch_size: 100, threads: 1}
curvature: {operator: hessian}
sharpness: {examples: 200, restarts: 2, steps: 3, draws: 4, m: 50}
EOF
"$PY" -m lldist.surface base.yaml $q
"$PY" -m lldist.surface base.yaml $q --out curvmap.h5 --set eval.split=test --set eval.curvature=true \
  --set grid.x=[-1,1,5] --set grid.y=[-1,1,4]
"$PY" -m lldist.surface base.yaml $q --out interp.h5 --set directions.target=model_epoch1.pt \
  --set 'grid.y=null' --set grid.x=[-0.5,1.5,11]
"$PY" -m lldist.surface base.yaml $q --out pca.h5 --set directions.kind=pca
"$PY" -m lldist.surface base.yaml $q --out hessdir.h5 --set directions.kind=hessian --set directions.batches=2
"$PY" -m lldist.surface base.yaml $q --out fromfile.h5 --set directions.kind=file --set directions.file=surface.h5 \
  --set grid.x=[-2,2,5]
"$PY" -m lldist.surface base.yaml $q --out recipe.h5 --set directions.store=recipe --set directions.seed=5
"$PY" -m lldist.surface base.yaml $q --out adaptive.h5 --set 'grid.adaptive={coarse: 4}' \
  --set grid.x=[-1,1,17] --set grid.y=[-1,1,17] --set eval.split=test
"$PY" -m lldist.surface base.yaml $q --out repeats.h5 --set directions.repeats=3 --set eval.split=test
"$PY" -m lldist.surface base.yaml $q --out plane.h5 --set directions.kind=plane \
  --set 'directions.points=[model.pt, model_epoch1.pt, model_epoch2.pt]' --set model.checkpoint=model.pt
# the Hessian at theta* with blocks and the GGN (and its density), the sharpness measures
"$PY" -m lldist.hessian base.yaml --top 3 --trace-samples 8 --batches 2 --density --density-runs 2 \
  --density-steps 10 --set curvature.blocks=layers
"$PY" -m lldist.hessian base.yaml --top 2 --trace-samples 8 --batches 3 --set curvature.operator=ggn --split test
"$MPIEXEC" -n 2 "$PY" -m lldist.hessian base.yaml --top 2 --trace-samples 4 --batches 2 --set curvature.operator=fisher
"$PY" -m lldist.sharpness base.yaml
# a second minimum, and what connects the two
"$PY" -m lldist.train base.yaml --set model.checkpoint=b.pt --set train.seed=1 --set model.seed=1 > /dev/null
"$PY" -m lldist.connect model.pt b.pt base.yaml --out connect $q --set connect.points=7 --set connect.plane=5 \
  --set 'connect.train={epochs: 2, lr: 0.01, batch_size: 64, seed: 0}' --set connect.align=weights
# rank groups: data and shard
"$MPIEXEC" -n 2 "$PY" -m lldist.surface base.yaml $q --out group_data.h5 --set eval.group_size=2 \
  --set eval.split=test
"$MPIEXEC" -n 2 "$PY" -m lldist.surface base.yaml $q --out group_shard.h5 --set eval.group_size=2 \
  --set eval.group_mode=shard --set directions.store=recipe --set eval.split=test
"$MPIEXEC" -n 3 "$PY" -m lldist.surface base.yaml $q --out three_ranks.h5
# a study of two variants, with the Hessian and the sharpness at each
cat > study.yaml <<'EOF'
name: refstudy
out: study
base:
  data: {name: digits, subset: 300}
  train: {optimizer: adam, lr: 0.01, epochs: 2, seed: 0}
  directions: {seed: 0}
  grid: {x: [-1.0, 1.0, 5], y: [-1.0, 1.0, 5]}
  eval: {split: both, batch_size: 100, threads: 1}
  sharpness: {examples: 100, restarts: 1, steps: 2, draws: 2, m: 50}
variants:
  - {label: mlp, model.name: mlp, model.args: {hidden: [16]}}
cross:
  train.batch_size: [32, 128]
curvature: {batches: 1, top: 2, trace_samples: 4}
sharpness: true
EOF
"$PY" -m lldist.study study.yaml --progress-every 0 > /dev/null
cd "$ROOT" && mv "$WORK" "$OUT"
echo "reference results in $OUT"
