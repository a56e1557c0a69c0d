#!/usr/bin/env bash
# The GPU runbook's driver (benchmarks/README.md). Device calls end at 10 minutes and the
# rows of a set (or a quickstart config's stages) take longer, so `start` launches one
# detached job that runs the set's processes back to back, and every call (`start` too)
# waits up to SECONDS and brings back what is done as $OUT/results.tgz (a quickstart's
# report folder, not its checkpoints). The job runs a copy of the tree in
# $BENCH_JOB: each device call copies the working tree again, and a job importing the
# package from it can break mid-run.
#
#   bash benchmarks/device_run.sh start SETS [SECONDS]  # call 1: issue16/.../23 and/or
#                                                       # process names, comma-separated
#   bash benchmarks/device_run.sh collect [SECONDS]     # every later call (default 500)
#
# Each process writes its rows as it measures them (--json), so a job cut short keeps
# them. On one machine `start` skips the processes already done (an .rc file); on a new
# one, name the processes still to run.
set -u
JOB=${BENCH_JOB:-/tmp/bench_job}
PY=${BENCH_PYTHON:-python3}
FLAGS=${BENCH_FLAGS:-}  # appended to every process (the tests: --tiny)
WHEELS=${BENCH_WHEELS:-.whl}  # diffusers and ml_collections, which the GPU image lacks

# set|name|script and flags: one process each, in the order they run. A process holds
# the rows that are compared with each other (ratios only within one process). The
# method configs' GPU sizes first, then the benchmarks; within issue 20 new rows first:
# the b16 LoRA and sampling rows re-measure what it already has. gpu_benchmark's torch
# rows run in a child process of their own (--torch_in_child): our SDXL step measured
# 19.2 img/s after them in one process, 25.8 alone on another H200 (BENCHMARKS.md).
# Issue 19's three-seed table (~31 min of H200) does not fit one session's device time:
# one launch per training seed, each with its report, on one base model (one workdir:
# the same base stage), so a session cut short keeps the seeds it finished; seeds 0 and
# 1 in one session (~23 min), seed 2 and the sweep in the next; `hyperlora_jax.evaluate
# --merge` pools the reports. A process with its own --workdir keeps it.
ALL="issue19|qs_gpu_seed_0|-m hyperlora_jax.main --config=configs/quickstart.py:gpu:seeds=0 --workdir=$JOB/work/qs_gpu_base
issue19|qs_gpu_seed_1|-m hyperlora_jax.main --config=configs/quickstart.py:gpu:seeds=1 --workdir=$JOB/work/qs_gpu_base
issue19|qs_gpu_seed_2|-m hyperlora_jax.main --config=configs/quickstart.py:gpu:seeds=2 --workdir=$JOB/work/qs_gpu_base
issue19|qs_gpu_sweep|-m hyperlora_jax.main --config=configs/quickstart.py:gpu_sweep --workdir=$JOB/work/qs_gpu_base
issue19|qs_gpu_sweep_robust|-m hyperlora_jax.main --config=configs/quickstart.py:gpu_sweep_robust --workdir=$JOB/work/qs_gpu_base
issue19|qs_gpu|-m hyperlora_jax.main --config=configs/quickstart.py:gpu
issue19|side_by_side|benchmarks/side_by_side.py
issue19|init|benchmarks/init_benchmark.py
issue18|basis_gpu|-m hyperlora_jax.main --config=configs/quickstart_basis.py:gpu
issue18|basis_gpu_sweep|-m hyperlora_jax.main --config=configs/quickstart_basis.py:gpu_sweep
issue16|hdb_gpu|-m hyperlora_jax.main --config=configs/quickstart_hdb.py:gpu
issue16|hdb_gpu_scene|-m hyperlora_jax.main --config=configs/quickstart_hdb.py:gpu_scene
issue17|lorarar_gpu|-m hyperlora_jax.main --config=configs/quickstart_lorarar.py:gpu
issue20|lora_hyper_b32|benchmarks/gpu_benchmark.py --torch_in_child --only=lora,hyper --batch_sizes=32
issue20|latency|benchmarks/gpu_benchmark.py --torch_in_child --only=latency,latency_parts
issue20|lora_sample_b16|benchmarks/gpu_benchmark.py --torch_in_child --only=lora,sample --batch_sizes=16
issue23|sdxl_lora|benchmarks/gpu_benchmark.py --torch_in_child --only=sdxl_lora --sdxl_batch_sizes=8
issue23|sdxl_lora_after_eager|benchmarks/gpu_benchmark.py --only=sdxl_lora --sdxl_batch_sizes=8 --skip_compile_torch
issue23|sdxl_sample|benchmarks/gpu_benchmark.py --torch_in_child --only=sdxl_sample
issue23|sdxl_parity|benchmarks/sdxl_parity.py
issue16|hdb_cold|benchmarks/hdb_benchmark.py --only=one_subject,together --folder=$JOB/sd15_random --compilation_cache=$JOB/cache
issue16|hdb_warm|benchmarks/hdb_benchmark.py --only=one_subject,together --profile=$JOB/results/hdb_warm_profile --folder=$JOB/sd15_random --compilation_cache=$JOB/cache
issue16|hdb_preopt|benchmarks/hdb_benchmark.py --only=preoptimization --folder=$JOB/sd15_random --compilation_cache=$JOB/cache
issue16|hdb_jit|benchmarks/hdb_benchmark.py --only=one_subject --compilation_cache= --folder=$JOB/sd15_random
issue16|hdb_steps1|benchmarks/hdb_benchmark.py --only=one_subject --steps=1 --folder=$JOB/sd15_random --compilation_cache=$JOB/cache
issue16|hdb_steps80|benchmarks/hdb_benchmark.py --only=one_subject --steps=80 --folder=$JOB/sd15_random --compilation_cache=$JOB/cache
issue16|hdb_cmdbuf|benchmarks/hdb_benchmark.py --only=one_subject --xla_flags=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --folder=$JOB/sd15_random --compilation_cache=$JOB/cache"

commands() {  # name|command of the processes a comma list of sets and names selects
  local lines
  lines=$(echo "$ALL" | awk -F'|' -v want=",$1," \
    'index(want, "," $1 ",") || index(want, "," $2 ",") {print $2 "|" $3}')
  if [ -z "$lines" ]; then
    echo "nothing selected by '$1': sets issue20, issue23 or names of $(echo "$ALL" \
      | cut -d'|' -f2 | paste -sd,)" >&2
    return 2
  fi
  echo "$lines"
}

job() {  # the detached job: every process of the set not yet done
  cd "$JOB/tree" || exit 1
  export PYTHONPATH=/tmp/site:$JOB/tree PYTHONUNBUFFERED=1
  while IFS='|' read -r name cmd; do
    [ -e "$JOB/results/$name.rc" ] && continue
    echo "$(date +%T) $name: $cmd"
    work=$(echo "$cmd" | grep -o -- '--workdir=[^ ]*' | cut -d= -f2)
    own=()  # the process' workdir, unless its command names one
    [ -n "$work" ] || { work=$JOB/work/$name; own=(--workdir="$work"); }
    extra=()
    case $cmd in
      *gpu_benchmark.py* | *hdb_benchmark.py* | *init_benchmark.py*) extra=(--json="$JOB/results/$name.json"
                                 --out="$JOB/results/$name.md") ;;
      *side_by_side.py*) extra=(--json="$JOB/results/$name.json" --out="$JOB/results/$name.md"
                                --workdir="$JOB/work/$name") ;;
      *hyperlora_jax.main*) extra=("${own[@]}"  # kept across calls
                                   --compilation_cache="$JOB/cache") ;;
    esac
    # shellcheck disable=SC2086  # cmd and FLAGS are word lists
    $PY $cmd $FLAGS "${extra[@]}" > "$JOB/results/$name.log" 2>&1
    rc=$?
    # A quickstart's reports (report, report_seeds_0, ...; with --side_by_side its
    # stages' logs too) come back, not its checkpoints.
    for part in "$work"/report* "$work"/logs; do
      [ -d "$part" ] || continue
      rm -rf "$JOB/results/$name/${part##*/}" && mkdir -p "$JOB/results/$name" \
        && cp -r "$part" "$JOB/results/$name/${part##*/}"
    done
    echo "$rc" > "$JOB/results/$name.rc"
    echo "$(date +%T) $name: exit $rc"
  done < "$JOB/commands"
  echo "$(date +%T) done" > "$JOB/finished"
}

# Modules the package imports lazily, so a script's import does not reach them.
LAZY_IMPORTS="tensorboardX"  # train.MetricWriter: every training run

imports() {  # every script of the set's commands must import: fail now, not mid-job
  local script
  (cd "$JOB/tree" && PYTHONPATH=/tmp/site $PY -c "import $(echo $LAZY_IMPORTS | tr ' ' ,)") \
    || { echo "$LAZY_IMPORTS: not importable (a wheel missing from .whl?)" >&2; return 1; }
  cut -d'|' -f2 "$1" | awk '{print ($1 == "-m") ? $2 : $1}' | sort -u | while read -r script; do
    (cd "$JOB/tree" && PYTHONPATH=/tmp/site:$JOB/tree:$JOB/tree/benchmarks $PY -c \
      "import runpy, sys; s = sys.argv[1]; (runpy.run_path if s.endswith('.py') \
else runpy.run_module)(s, run_name='imports_only')" \
      "$script") || { echo "$script does not import (a wheel missing from .whl?)" >&2; return 1; }
  done
}

running() {
  [ -e "$JOB/pid" ] && kill -0 "$(cat "$JOB/pid")" 2>/dev/null
}

start() {
  local set=$1
  if running; then
    echo "a job is running (pid $(cat "$JOB/pid")): collect it" >&2
    return 1
  fi
  commands "$set" > /dev/null || return 2
  mkdir -p "$JOB/results" || return 1
  commands "$set" > "$JOB/commands"
  rm -f "$JOB/finished"
  if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$WHEELS"/*.whl || return 1
  fi
  rm -rf "$JOB/tree" && mkdir -p "$JOB/tree" || return 1
  cp -r hyperlora_jax benchmarks configs pyproject.toml "$JOB/tree/" || return 1
  imports "$JOB/commands" || return 1
  BENCH_JOB=$JOB BENCH_PYTHON=$PY BENCH_FLAGS=$FLAGS setsid \
    bash "$JOB/tree/benchmarks/device_run.sh" _job >> "$JOB/log" 2>&1 < /dev/null &
  echo $! > "$JOB/pid"
  echo "started set $set (pid $!): $(wc -l < "$JOB/commands") processes"
}

collect() {  # waits up to $1 s for the job, then brings back everything it wrote
  local end=$((SECONDS + $1))
  while running && [ ! -e "$JOB/finished" ] && [ $SECONDS -lt $end ]; do sleep 5; done
  cat "$JOB/log" 2>/dev/null
  for log in "$JOB"/results/*.log; do
    [ -e "$log" ] || continue
    echo "--- $(basename "$log"): last lines"
    grep -E '^\[ *[0-9.]+ s\]|^\| |Stage [0-9]|step [0-9]+/|Error|Traceback' "$log" | tail -6
  done
  if [ -e "$JOB/finished" ]; then echo 'JOB FINISHED'
  elif running; then echo 'JOB RUNNING: collect again'
  else echo 'JOB NOT RUNNING (machine replaced?): start the same set again'; fi
  if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/results.tgz" -C "$JOB" results log
  fi
}

case ${1:-} in
  start) start "${2:?start SETS [SECONDS]}" && collect "${3:-500}" ;;
  collect) collect "${2:-500}" ;;
  _job) job ;;
  *) sed -n '2,16p' "$0"; exit 2 ;;
esac
