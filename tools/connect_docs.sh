#!/bin/bash
# docs/CONNECT.md's numbers and pictures: two digits MLPs and two digits CNNs with skips, each
# pair trained from seeds 0 and 1; between each pair the straight line, the line after weight
# matching, a trained Bezier curve (to b, and to the aligned b) and the plane of the curve's
# control points; the CNN again at width 32. Run from the repository root:
#   bash tools/connect_docs.sh > runs/connect_docs.log 2>&1
# About 15 minutes on 2 cores; a killed run resumes (trained checkpoints and bends are kept).
set -euo pipefail
ROOT=$(pwd)
PY=${PY:-$ROOT/.venv/bin/python}
MPIEXEC=${MPIEXEC:-$ROOT/.venv/bin/mpiexec}
export OMP_NUM_THREADS=1
OUT=runs/connect_digits
mkdir -p docs/connect
# name, job, extra settings: the CNN also at width 32 (weight matching needs width: Ainsworth et al.)
while read -r m job extra <&3; do
  set -- $extra
  for s in 0 1; do
    [ -f $OUT/${m}_s$s.pt ] || "$PY" -m lldist.train $job --set model.seed=$s --set train.seed=$s \
      --set model.checkpoint=$OUT/${m}_s$s.pt "$@"
  done
  "$MPIEXEC" -n 2 "$PY" -m lldist.connect $OUT/${m}_s0.pt $OUT/${m}_s1.pt $job --out $OUT/$m --progress-every 60 "$@"
  "$MPIEXEC" -n 2 "$PY" -m lldist.connect $OUT/${m}_s0.pt $OUT/${m}_s1.pt $job --out $OUT/${m}_aligned \
    --set connect.align=weights --progress-every 60 "$@"
  "$PY" -m lldist.plot $OUT/$m/line.h5 $OUT/${m}_aligned/line_aligned.h5 $OUT/$m/curve.h5 \
    $OUT/${m}_aligned/curve.h5 --compare --out $OUT/${m}_compare --dpi 80
  "$PY" -m lldist.plot $OUT/$m/plane.h5 --out $OUT/${m}_plane --dpi 80
  cp $OUT/${m}_compare/compare_train_loss.png docs/connect/${m}_paths_train_loss.png
  cp $OUT/${m}_compare/compare_test_acc.png docs/connect/${m}_paths_test_acc.png
  cp $OUT/${m}_plane/plane_train_loss_contour.png docs/connect/${m}_plane_train_loss.png
done 3<<'MODELS'
mlp jobs/connect_digits_mlp.yaml
cnn_skip jobs/connect_digits_cnn_skip.yaml
cnn_skip32 jobs/connect_digits_cnn_skip.yaml --set model.args.width=32 --set train.epochs=20
MODELS
"$PY" tools/connect_table.py $OUT > docs/connect/table.md
cat docs/connect/table.md
