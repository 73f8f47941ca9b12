#!/usr/bin/env bash
# Train a config on every host of a Cloud TPU VM pod slice, from this checkout.
#
#   launch/tpu_pod.sh [--dry-run] [--keep] [--type=v4-64] [--version=tpu-ubuntu2204-base] \
#       TPU_NAME ZONE CONFIG WORKDIR [extra flags for hybrid_attn.main...]
#   e.g. launch/tpu_pod.sh my-v4-64 us-central2-b configs/coatnet0.py gs://bucket/runs/c0
#
# Steps: create the TPU VM (or reuse it if it exists), copy the code to ~/hybrid_attn on
# every worker, install it with jax[tpu], start the same command on every worker (JAX
# detects the pod; each process reads its slice of the data), tail the logs of worker 0
# until the run ends, then delete the VM (--keep leaves it). Rerunning after a preemption
# resumes from the newest checkpoint in WORKDIR (use a gs:// WORKDIR). --dry-run prints
# every command instead of running it. Set TFDS_DATA_DIR to a bucket with imagenet2012.
set -euo pipefail
dry_run=0 keep=0 type=v4-64 version=tpu-ubuntu2204-base
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --dry-run) dry_run=1 ;;
    --keep) keep=1 ;;
    --type=*) type=${1#*=} ;;
    --version=*) version=${1#*=} ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [[ $# -lt 4 ]]; then
  sed -n '2,14p' "$0"; exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
repo=$(cd "$(dirname "$0")/.." && pwd)
extra=$(printf ' %q' "$@")
log='~/hybrid_attn.log'

run() {  # prints the command; runs it unless --dry-run
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ $dry_run == 0 ]]; then "$@"; fi
}
tpu_vm=(gcloud compute tpus tpu-vm)

if [[ $dry_run == 0 ]] && "${tpu_vm[@]}" describe "$tpu" --zone "$zone" >/dev/null 2>&1; then
  echo "reusing TPU VM $tpu"
else
  [[ $dry_run == 1 ]] && echo "# if '${tpu_vm[*]} describe $tpu --zone $zone' fails:"
  run "${tpu_vm[@]}" create "$tpu" --zone "$zone" --accelerator-type "$type" --version "$version"
fi
run "${tpu_vm[@]}" ssh "$tpu" --zone "$zone" --worker=all --command "mkdir -p ~/hybrid_attn"
run "${tpu_vm[@]}" scp --recurse --zone "$zone" --worker=all \
  "$repo/pyproject.toml" "$repo/README.md" "$repo/hybrid_attn" "$repo/configs" "$tpu:~/hybrid_attn/"
run "${tpu_vm[@]}" ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/hybrid_attn && pip install -q -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
run "${tpu_vm[@]}" ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/hybrid_attn && ${TFDS_DATA_DIR:+TFDS_DATA_DIR=$TFDS_DATA_DIR }nohup python -m hybrid_attn.main --jax_distributed --config=$config --workdir=$workdir$extra > $log 2>&1 &"
run "${tpu_vm[@]}" ssh "$tpu" --zone "$zone" --worker=0 --command \
  "tail -n +1 -F $log --pid=\$(pgrep -f hybrid_attn.main | head -n1)"
if [[ $keep == 0 ]]; then
  run "${tpu_vm[@]}" delete "$tpu" --zone "$zone" --quiet
fi
