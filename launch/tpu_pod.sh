#!/usr/bin/env bash
# Runs hyperlora_jax.main on every worker of a TPU VM pod (one process per
# host; jax.distributed finds the other workers through the TPU metadata).
#
#   launch/tpu_pod.sh --tpu=NAME --zone=ZONE --config=configs/x.py \
#       --workdir=gs://BUCKET/run [--project=P] [--setup] [--dry-run] \
#       [-- --config.train.batch_size=256 ...]
#
# --setup first copies this repository's committed HEAD to every worker and
# installs its requirements with jax[tpu]. The workdir must be a gs:// path:
# the workers share no disk, and Orbax writes every host's shards there.
# Re-running the same command resumes from the workdir's last checkpoint.
# --dry-run prints the exact commands instead of running them.
set -euo pipefail

usage() { sed -n '2,14s/^# \{0,1\}//p' "$0"; exit "${1:-0}"; }

tpu='' zone='' project='' config='' workdir='' setup=0 dry_run=0
remote_dir='hyperlora_jax' python='python3'
extra=()
while (($#)); do
  case "$1" in
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --remote-dir=*) remote_dir="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --setup) setup=1 ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "unknown argument: $1" >&2; usage 2 ;;
  esac
  shift
done
for required in tpu zone config workdir; do
  [[ -n "${!required}" ]] || { echo "--${required}= is required" >&2; usage 2; }
done
[[ "$workdir" == gs://* ]] || {
  echo "--workdir must be a gs:// path shared by all workers" >&2; exit 2; }

# Prints a command as a shell would re-read it: plain words bare, others
# single-quoted.
show() {
  local words=() arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then words+=("$arg")
    else words+=("${arg@Q}"); fi
  done
  echo "${words[*]}"
}
run() { if ((dry_run)); then show "$@"; else "$@"; fi; }

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
$python -m pip install -q -r $dir_q/requirements.txt 'jax[tpu]'"
fi

main=$(show "$python" -m hyperlora_jax.main "--config=$config" \
  "--workdir=$workdir" --distributed "${extra[@]}")
ssh_all "cd $dir_q && $main"
