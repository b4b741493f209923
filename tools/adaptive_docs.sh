#!/usr/bin/env bash
# The evidence of docs/ADAPTIVE.md, from scratch: nine digits models trained and their full
# 101 x 101 grids (three also at 201 x 201) computed in full, then the adaptive schedule replayed
# on every full grid (python -m lldist.bench adaptive: exactly what an adaptive run computes, as
# it decides from the values of the cells it asked for) and compared at four level choices; the
# pictures of four of them, the budget's error curve, a real adaptive run at 501 x 501, and the
# wall time of a full and an adaptive run at 101 x 101 on 4 ranks. About 40 minutes on 2 cores. (Options are dotted keys or flow mappings
# without spaces, "{hidden:[128,64]}": the words are split on spaces.)
#   bash tools/adaptive_docs.sh [OUT]        (OUT: runs/adaptive)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/adaptive}
mkdir -p "$out"
py=${PYTHON:-python}
job=jobs/quickstart.yaml  # a CNN on digits, trained in-process; models differ by --set
declare -A models=(
  [cnn_bn]="--set model.args.batchnorm=true"
  [cnn_plain]="--set model.args.batchnorm=false"
  [cnn_skip]="--set model.name=cnn_skip --set model.args.batchnorm=false"
  [mlp]="--set model.name=mlp --set model.args={hidden:[128,64]}"
  [cnn_deep_plain]="--set model.args.stages=3 --set model.args.blocks=2 --set model.args.batchnorm=false --set train.lr=0.001 --set train.epochs=40"
  [mlp_deep]="--set model.name=mlp --set model.args={hidden:[128,128,128,128]} --set train.epochs=15"
  [cnn_skip_wide_bn]="--set model.name=cnn_skip --set model.args.width=16 --set model.args.blocks=2 --set model.args.batchnorm=true"
  # two trained differently: SGD with momentum and weight decay; plain SGD at batch 8
  [cnn_bn_sgd_wd]="--set model.args.batchnorm=true --set train.optimizer=sgd --set train.lr=0.05 --set train.weight_decay=0.0005 --set train.epochs=15"
  [mlp_sgd_bs8]="--set model.name=mlp --set model.args={hidden:[128,64]} --set train.optimizer=sgd --set train.lr=0.02 --set train.momentum=0 --set train.batch_size=8 --set train.epochs=20"
)
set -f  # the options hold brackets: no globbing while they are split into words
for name in cnn_bn cnn_plain cnn_skip mlp cnn_deep_plain mlp_deep cnn_skip_wide_bn cnn_bn_sgd_wd mlp_sgd_bs8; do
  [ -f "$out/${name}_101.h5" ] && continue  # a finished grid is kept (a killed one resumes)
  # shellcheck disable=SC2086  # the options are words on purpose
  $py -m lldist.surface $job ${models[$name]} --set model.checkpoint="$out/$name.pt" \
      --set "grid.x=[-1,1,101]" --set "grid.y=[-1,1,101]" --out "$out/${name}_101.h5" --progress-every 60
done
for name in cnn_bn cnn_plain mlp_sgd_bs8; do
  [ -f "$out/${name}_201.h5" ] && continue
  # shellcheck disable=SC2086
  $py -m lldist.surface $job ${models[$name]} --set model.checkpoint="$out/$name.pt" \
      --set "grid.x=[-1,1,201]" --set "grid.y=[-1,1,201]" --out "$out/${name}_201.h5" --progress-every 60
done
# shellcheck disable=SC2086
$py -m lldist.surface $job ${models[cnn_bn]} --set model.checkpoint="$out/cnn_bn.pt" \
    --set "grid.x=[-1,1,501]" --set "grid.y=[-1,1,501]" --set "grid.adaptive={}" --out "$out/cnn_bn_501_adaptive.h5"
set +f
$py -m lldist.bench adaptive --full "$out"/*_101.h5 "$out"/*_201.h5 --timing "$out/cnn_bn.pt" --ranks 4 \
    --json "$out/bench.json" | tee "$out/table.md"
$py -m lldist.info "$out/cnn_bn_501_adaptive.h5" | tee -a "$out/table.md"
for name in cnn_bn_101 cnn_deep_plain_101 mlp_deep_101 cnn_bn_201; do
  $py tools/adaptive_study.py --replay-picture "$out/$name.h5" --png "docs/adaptive/$name.png"
done
$py tools/adaptive_study.py --budget-curve "$out/cnn_bn_101.h5" "$out/cnn_deep_plain_101.h5" \
    --png docs/adaptive/budget.png | tee -a "$out/table.md"
