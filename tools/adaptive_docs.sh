#!/usr/bin/env bash
# The evidence of docs/ADAPTIVE.md, from scratch: seven digits models trained and their full
# 101 x 101 grids (two also at 201 x 201) computed in full, then the adaptive schedule replayed
# on every full grid (exactly what an adaptive run computes: it decides from the values of the
# cells it asked for) and compared at the figures' default, linear and geometric levels; the
# pictures of four of them. About 20 minutes on 2 cores. (Options are dotted keys or flow mappings
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
)
set -f  # the options hold brackets: no globbing while they are split into words
for name in cnn_bn cnn_plain cnn_skip mlp cnn_deep_plain mlp_deep cnn_skip_wide_bn; do
  # shellcheck disable=SC2086  # the options are words on purpose
  $py -m lldist.surface $job ${models[$name]} --set model.checkpoint="$out/$name.pt" \
      --set "grid.x=[-1,1,101]" --set "grid.y=[-1,1,101]" --out "$out/${name}_101.h5" --progress-every 60
done
for name in cnn_bn cnn_plain; do
  # shellcheck disable=SC2086
  $py -m lldist.surface $job ${models[$name]} --set model.checkpoint="$out/$name.pt" \
      --set "grid.x=[-1,1,201]" --set "grid.y=[-1,1,201]" --out "$out/${name}_201.h5" --progress-every 60
done
set +f
$py tools/adaptive_study.py "$out"/*_101.h5 "$out"/*_201.h5 | tee "$out/table.md"
for name in cnn_bn_101 cnn_plain_101 cnn_deep_plain_101 cnn_bn_201; do
  $py tools/adaptive_study.py --replay-picture "$out/$name.h5" --png "docs/adaptive/$name.png"
done
