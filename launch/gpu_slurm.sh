#!/usr/bin/env bash
# Launch a config on a SLURM GPU cluster: one process per node, all local GPUs each.
#
#   sbatch --nodes=4 --gpus-per-node=8 launch/gpu_slurm.sh CONFIG WORKDIR [extra flags...]
#
# jax.distributed.initialize() picks up the SLURM environment (coordinator, process id
# and count). Resubmitting the same job resumes from the newest checkpoint in WORKDIR;
# SIGTERM (sent by SLURM before a time limit with --signal=TERM@120) saves and exits.
#SBATCH --ntasks-per-node=1
#SBATCH --signal=TERM@120
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,9p' "$0"; exit 2
fi
config=$1 workdir=$2
shift 2
srun python -m hybrid_attn.main --jax_distributed --config="$config" --workdir="$workdir" "$@"
