#!/bin/bash
# docs/ERRORBARS.md's numbers: the digits batch-size study over 5 training seeds with 3
# direction planes per surface, the Hessian (with its jackknife) and the sharpness measures at
# every variant's theta* (jobs/study_digits_seeds.yaml), over two MPI ranks; its report is
# copied to docs/study_digits_seeds/. Run from the repository root:
#   bash tools/errorbars_docs.sh > runs/errorbars_docs.log 2>&1
# About 25 minutes on 2 cores; a killed run resumes where it stopped.
set -euo pipefail
ROOT=$(pwd)
PY=${PY:-$ROOT/.venv/bin/python}
MPIEXEC=${MPIEXEC:-$ROOT/.venv/bin/mpiexec}
export OMP_NUM_THREADS=1
"$MPIEXEC" -n 2 "$PY" -m lldist.study jobs/study_digits_seeds.yaml --progress-every 60
mkdir -p docs/study_digits_seeds
# the comparison figures stay in runs/ (30 variants in 4 large PNGs): the report's line says where
sed 's|^Figures: .*|Figures: made beside the report in runs/study_digits_seeds/figures/ by the command above (not kept in docs/: 30 variants).|' \
  runs/study_digits_seeds/report.md > docs/study_digits_seeds/report.md
"$PY" -m lldist.plot runs/study_digits_seeds/cnn_skip_b64_s0/surface.h5 --dpi 80
cp runs/study_digits_seeds/cnn_skip_b64_s0/surface_train_loss_planes.png \
  docs/study_digits_seeds/cnn_skip_b64_s0_train_loss_planes.png
"$PY" tools/errorbars_draws.py  # the seeds-against-draws table
