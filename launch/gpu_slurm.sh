#!/usr/bin/env bash
# Train a config on a SLURM GPU cluster: one process per node, all its GPUs each.
#
#   launch/gpu_slurm.sh [--dry-run] [--nodes=4] [--gpus=8] [--time=24:00:00] \
#       CONFIG WORKDIR [extra flags for hybrid_attn.main...]
#
# Outside a job it submits itself with sbatch (SIGTERM 120 s before the time limit, and
# --requeue: a preempted or timed-out job saves, exits and is requeued, and the rerun
# resumes from the newest checkpoint in WORKDIR). Inside the job it runs one task per
# node with explicit distributed flags: process 0's node as the coordinator, the SLURM
# task rank as the process id. --dry-run prints the commands instead of running them.
set -euo pipefail
dry_run=0 nodes=4 gpus=8 time=24:00:00 port=12355
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --dry-run) dry_run=1 ;;
    --nodes=*) nodes=${1#*=} ;;
    --gpus=*) gpus=${1#*=} ;;
    --time=*) time=${1#*=} ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [[ $# -lt 2 ]]; then
  sed -n '2,11p' "$0"; exit 2
fi
config=$1 workdir=$2
shift 2

run() {  # prints the command; runs it unless --dry-run
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ $dry_run == 0 ]]; then "$@"; fi
}

if [[ -z ${SLURM_JOB_ID:-} ]]; then
  opts=()
  [[ $dry_run == 1 ]] && opts+=(--dry-run)
  run sbatch --nodes="$nodes" --ntasks-per-node=1 --gpus-per-node="$gpus" --time="$time" \
    --signal=TERM@120 --requeue --job-name=hybrid_attn --output="%x-%j.log" \
    "$0" "${opts[@]}" "$config" "$workdir" "$@"
  exit 0
fi
# Inside the job: this batch step runs on the first node, where task 0 runs too.
coordinator="$(hostname):$port"
run srun --ntasks="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c \
  "exec python -m hybrid_attn.main --jax_distributed --coordinator_address=$coordinator \
--num_processes=$SLURM_NNODES --process_id=\$SLURM_PROCID --config=$config --workdir=$workdir$(printf ' %q' "$@")"
