#!/bin/bash
# Compute a loss surface on a Slurm allocation, one MPI rank per GPU:
#     sbatch slurm/surface.sh jobs/cifar10_cnn_skip.yaml
# Change for your cluster: add #SBATCH --partition=... and --account=... (or pass them to
# sbatch), load your modules here if lldist's venv needs them, and set LLDIST_ENV (a venv to
# activate) or LLDIST_SIF (an Apptainer image, see docker/README.md). More nodes:
#     sbatch --nodes=4 slurm/surface.sh JOB.yaml
# Requeued (--requeue, preemption) or resubmitted, the job resumes from its HDF5 file.
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
LLDIST_ENV=${LLDIST_ENV:-$PWD/.venv}              # a venv with lldist installed (ignored with LLDIST_SIF)
LLDIST_LAUNCH=${LLDIST_LAUNCH:-srun}              # srun, or mpirun (the MPI's own launcher inside the allocation)
LLDIST_MPI_PLUGIN=${LLDIST_MPI_PLUGIN:-auto}      # srun's PMI: auto (PMIx if it loads, else PMI2), pmix, pmi2
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1} PYTHONUNBUFFERED=1
if [[ -n "${LLDIST_SIF:-}" ]]; then
    PY=(apptainer exec --nv "$LLDIST_SIF" python)
else
    # shellcheck disable=SC1091
    source "$LLDIST_ENV/bin/activate"
    PY=(python)
fi
echo "lldist: job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-?}: ${SLURM_NTASKS:-1} ranks, launcher $LLDIST_LAUNCH, $(date -Is)"
if [[ "$LLDIST_LAUNCH" == mpirun ]]; then
    # the MPI's own launcher; it finds the allocation from Slurm's environment
    exec mpirun -n "${SLURM_NTASKS:-1}" "${PY[@]}" -m lldist.surface "$JOB" "$@"
fi
if [[ "$LLDIST_MPI_PLUGIN" == auto ]]; then
    # PMIx where this Slurm can load it, else PMI2 (which MPICH and Open MPI both speak)
    if srun --mpi=pmix --ntasks=1 --nodes=1 true >/dev/null 2>&1; then
        LLDIST_MPI_PLUGIN=pmix
    else
        LLDIST_MPI_PLUGIN=pmi2
    fi
fi
# exec: the batch shell becomes srun, which forwards Slurm's SIGTERM to every task; rank 0
# then stops handing out work and closes the file (each finished chunk is already flushed)
exec srun --mpi="$LLDIST_MPI_PLUGIN" --kill-on-bad-exit=1 "${PY[@]}" -m lldist.surface "$JOB" "$@"
