#!/usr/bin/env bash
# Multi-node GPU training under SLURM with jax.distributed.
#
#   launch/slurm_gpu.sh --config=configs/x.py --workdir=/shared/run \
#       [--nodes=2] [--gpus-per-node=8] [--per=gpu|host] [--time=24:00:00] \
#       [--partition=P] [--dry-run] [-- --config.train.batch_size=64 ...]
#
# Outside an allocation it submits itself with sbatch; inside one (as the
# batch script) it starts the processes with srun:
#   --per=gpu   one process per GPU; jax.distributed gives each its GPU
#               (SLURM_LOCALID), all GPUs stay visible to every process.
#   --per=host  one process per node driving all of its GPUs.
# SLURM sends SIGTERM two minutes before the time limit: every process saves
# the same step and exits; submitting again resumes from the workdir, which
# must be on a file system all nodes share.
# --dry-run prints the exact commands instead of running them.
set -euo pipefail
# SLURM runs its copy of this script from a spool directory, in the repository
# (--chdir below), where launch/_common.sh is found instead.
common="$(dirname "$0")/_common.sh"
[[ -f "$common" ]] || common=launch/_common.sh
# shellcheck source=_common.sh
source "$common"

config='' workdir='' nodes=1 gpus=8 per='gpu' time_limit='24:00:00'
partition='' python="${PYTHON:-python3}"
parse_args config= workdir= nodes= gpus-per-node=gpus per= time=time_limit \
  partition= -- "$@"
require config workdir
case "$per" in
  gpu) tasks_per_node="$gpus" ;;
  host) tasks_per_node=1 ;;
  *) echo "--per must be gpu or host" >&2; exit 2 ;;
esac

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  repo=$(cd "$(dirname "$0")/.." && pwd)
  sbatch_flags=(--job-name=hyperlora --nodes="$nodes"
    --gpus-per-node="$gpus" --ntasks-per-node="$tasks_per_node"
    --time="$time_limit" --signal=TERM@120 --chdir="$repo"
    --output="slurm-%j.out")
  [[ -z "$partition" ]] || sbatch_flags+=(--partition="$partition")
  # The batch copy of this script runs from SLURM's spool directory, so it
  # is given the repository's path through --chdir and called by name.
  run sbatch "${sbatch_flags[@]}" "$repo/launch/slurm_gpu.sh" \
    --config="$config" --workdir="$workdir" --gpus-per-node="$gpus" \
    --per="$per" -- "${extra[@]}"
  exit 0
fi

with_env=()
if [[ "$per" == host ]]; then
  # jax would otherwise give the single local process only GPU 0.
  with_env=(env "JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))")
fi
run "${with_env[@]}" srun --kill-on-bad-exit=1 \
  --ntasks-per-node="$tasks_per_node" \
  --nodes="${SLURM_JOB_NUM_NODES:-$nodes}" \
  "$python" -m hyperlora_jax.main --config="$config" --workdir="$workdir" \
  --distributed "${extra[@]}"
