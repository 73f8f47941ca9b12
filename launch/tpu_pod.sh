#!/usr/bin/env bash
# Launch a config on every host of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [extra flags...]
#   e.g. launch/tpu_pod.sh my-v4-64 us-central2-b configs/coatnet0.py gs://bucket/runs/coatnet0
#
# Every host clones nothing: it expects this repository at ~/hybrid_attn (copy it with
# `gcloud compute tpus tpu-vm scp --recurse --worker=all . TPU_NAME:~/hybrid_attn`).
# The same command runs on all hosts; JAX's multi-host runtime assembles the global mesh,
# each host reads its own part of the data (tfds.split_for_jax_process), and rerunning
# the same command after a preemption resumes from the newest checkpoint in WORKDIR.
# Set TFDS_DATA_DIR to a bucket holding the prepared imagenet2012.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  sed -n '2,12p' "$0"; exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
extra=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  set -e
  cd ~/hybrid_attn
  pip install -q -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
  ${TFDS_DATA_DIR:+export TFDS_DATA_DIR=$TFDS_DATA_DIR}
  python -m hybrid_attn.main --jax_distributed --config=$config --workdir=$workdir $extra
"
