#!/bin/bash
# Pretrained MobileNetV2 on ImageNet validation images, across N nodes x 8 GPUs:
#     sbatch --nodes=4 slurm/mobilenet.sh
# Change for your cluster: partition/account, LLDIST_ENV or LLDIST_SIF, and the job file
# (LLDIST_JOB) whose data.root must point at the ImageNet val folder on shared storage.
#SBATCH --job-name=lldist-mobilenet
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --signal=B:TERM@120
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail
LLDIST_JOB=${LLDIST_JOB:-jobs/mobilenet_imagenet.yaml}
# sbatch runs a copy of this script from its spool folder: find surface.sh from the submit dir
exec bash "${SLURM_SUBMIT_DIR:-$PWD}/slurm/surface.sh" "$LLDIST_JOB" "$@"
