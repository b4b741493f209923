#!/bin/bash
# Compute a loss surface on a Slurm allocation, one MPI rank per GPU:
#     sbatch slurm/surface.sh jobs/cifar10_cnn_skip.yaml
# Change for your cluster: --partition/--account below (or pass them to sbatch), and
# LLDIST_ENV (a venv to activate) or LLDIST_SIF (an Apptainer image, see docker/README.md).
#SBATCH --job-name=lldist-surface
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=B:TERM@120
#SBATCH --requeue
#SBATCH --output=%x-%j.out
# --signal=B:TERM@120: two minutes before the time limit Slurm sends SIGTERM; lldist's
# coordinator stops handing out work, closes the file and exits. Every finished chunk is
# already on disk, so a requeued or resubmitted job resumes with the same command.
set -euo pipefail
JOB=${1:?usage: sbatch slurm/surface.sh JOB.yaml [--set key=value ...]}
shift
LLDIST_ENV=${LLDIST_ENV:-$PWD/.venv}
LLDIST_MPI_PLUGIN=${LLDIST_MPI_PLUGIN:-pmix}   # pmix, or pmi2 where Slurm lacks PMIx
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1} PYTHONUNBUFFERED=1
if [[ -n "${LLDIST_SIF:-}" ]]; then
    RUN=(apptainer exec --nv "$LLDIST_SIF" python -m lldist.surface)
else
    # shellcheck disable=SC1091
    source "$LLDIST_ENV/bin/activate"
    RUN=(python -m lldist.surface)
fi
# srun forwards the batch script's SIGTERM to the tasks; exec so the signal reaches srun
exec srun --mpi="$LLDIST_MPI_PLUGIN" --kill-on-bad-exit=1 "${RUN[@]}" "$JOB" "$@"
