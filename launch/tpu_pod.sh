#!/usr/bin/env bash
# Runs hyperlora_jax.main on every worker of a TPU VM pod (one process per
# host; jax.distributed finds the other workers through the TPU metadata).
#
#   launch/tpu_pod.sh --tpu=NAME --zone=ZONE --config=configs/x.py \
#       --workdir=gs://BUCKET/run [--project=P] [--setup] [--dry-run] \
#       [-- --config.train.batch_size=256 ...]
#
# --setup first copies this repository's committed HEAD to every worker and
# installs it (pip install -e) with jax[tpu]. The workdir must be a gs:// path:
# the workers share no disk, and Orbax writes every host's shards there.
# Re-running the same command resumes from the workdir's last checkpoint.
# --dry-run prints the exact commands instead of running them.
set -euo pipefail
# shellcheck source=_common.sh
source "$(dirname "$0")/_common.sh"

tpu='' zone='' project='' config='' workdir='' setup=0
remote_dir='hyperlora_jax' python='python3'
parse_args tpu= zone= project= config= workdir= remote-dir= python= setup -- "$@"
require tpu zone config workdir
[[ "$workdir" == gs://* ]] || {
  echo "--workdir must be a gs:// path shared by all workers" >&2; exit 2; }

gcloud_flags=(--zone="$zone")
[[ -z "$project" ]] || gcloud_flags+=(--project="$project")
ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_flags[@]}" \
    --worker=all --command="$1"
}

dir_q=$(show "$remote_dir")
if ((setup)); then
  repo=$(cd "$(dirname "$0")/.." && pwd)
  archive=/tmp/hyperlora_jax_src.tar.gz
  run git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
  run gcloud compute tpus tpu-vm scp "$archive" "$tpu:hyperlora_jax_src.tar.gz" \
    "${gcloud_flags[@]}" --worker=all
  ssh_all "mkdir -p $dir_q && tar xzf hyperlora_jax_src.tar.gz -C $dir_q && \
$python -m pip install -q -e $dir_q 'jax[tpu]'"
fi

main=$(show "$python" -m hyperlora_jax.main "--config=$config" \
  "--workdir=$workdir" --distributed "${extra[@]}")
ssh_all "cd $dir_q && $main"
