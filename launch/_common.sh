# shellcheck shell=bash
# What the launchers share; sourced by launch/tpu_pod.sh and launch/slurm_gpu.sh.
# Sets dry_run (--dry-run) and extra (the words after --) as it parses.

dry_run=0
extra=()

# The calling script's header comment (from line 2 to the first line that is not
# a comment), without the leading '# ', then exit with status $1 (0 by default).
usage() { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit "${1:-0}"; }

# parse_args SPEC... -- ARG...: each SPEC is `name=` (--name=VALUE sets the
# variable name, with - read as _), `name=var` (--name=VALUE sets var) or `name`
# (the flag --name sets name to 1). --dry-run, -h/--help and -- are every
# launcher's; any other argument prints the usage and exits with status 2.
# (Its locals start with _ so that they hide no launcher variable.)
# shellcheck disable=SC2034  # extra is read by the launchers
parse_args() {
  local _specs=() _spec _opt _var _found
  while [[ "$1" != -- ]]; do _specs+=("$1"); shift; done
  shift
  while (($#)); do
    case "$1" in
      --dry-run) dry_run=1 ;;
      -h|--help) usage 0 ;;
      --) shift; extra=("$@"); break ;;
      *)
        _found=0
        for _spec in "${_specs[@]}"; do
          _opt="${_spec%%=*}"
          if [[ "$_spec" == *=* && "$1" == "--$_opt="* ]]; then
            _var="${_spec#*=}"
            printf -v "${_var:-${_opt//-/_}}" '%s' "${1#*=}"
          elif [[ "$_spec" != *=* && "$1" == "--$_opt" ]]; then
            printf -v "${_opt//-/_}" '%s' 1
          else
            continue
          fi
          _found=1
          break
        done
        ((_found)) || { echo "unknown argument: $1" >&2; usage 2; } ;;
    esac
    shift
  done
}

# require NAME...: each variable must be set (by --NAME=).
require() {
  local name
  for name in "$@"; do
    [[ -n "${!name}" ]] || { echo "--${name}= is required" >&2; usage 2; }
  done
}

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

# Runs a command, or with --dry-run prints it (see show).
run() { if ((dry_run)); then show "$@"; else "$@"; fi; }
