#!/bin/bash
# Train a job's model on one GPU:   sbatch slurm/train.sh jobs/cifar10_cnn_skip.yaml
#SBATCH --job-name=lldist-train
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
JOB=${1:?usage: sbatch slurm/train.sh JOB.yaml}
shift
LLDIST_ENV=${LLDIST_ENV:-$PWD/.venv}
export PYTHONUNBUFFERED=1
if [[ -n "${LLDIST_SIF:-}" ]]; then
    exec apptainer exec --nv "$LLDIST_SIF" python -m lldist.train "$JOB" "$@"
fi
# shellcheck disable=SC1091
source "$LLDIST_ENV/bin/activate"
exec python -m lldist.train "$JOB" "$@"
