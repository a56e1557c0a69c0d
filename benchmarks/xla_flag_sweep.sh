#!/usr/bin/env bash
# Our LoRA training step (no diffusers rows) under several XLA_FLAGS sets, one process
# each (XLA reads its flags once per process), and with a warm compilation cache; writes
# the best set (within 1% of the fastest, the quickest to compile) to $BEST for later
# runs (--xla_flags="$(cat $BEST)").
#
#   OUT=/tmp/sweep BEST=workdirs/bench/flags.txt bash benchmarks/xla_flag_sweep.sh
#
# The first set runs with --profile_dir ($OUT/prof, summarized by trace_summary.py).
set -u
out=${OUT:?set OUT to a folder for the logs and JSON}
best=${BEST:-$out/best_flags.txt}
batch=${BATCH:-16}
limit=${LIMIT:-170}  # seconds per process
read -ra extra <<< "${EXTRA:-}"  # more gpu_benchmark.py arguments (--tiny on CPU)
mkdir -p "$out" "$(dirname "$best")"
sets=(''
      '--xla_gpu_enable_triton_gemm=false'
      '--xla_gpu_enable_triton_gemm=false --xla_gpu_autotune_level=0')
bench() {  # name, flags, extra arguments
  local name=$1 flags=$2; shift 2
  timeout -s TERM "$limit" python3 benchmarks/gpu_benchmark.py --skip_torch --only=lora \
      --batch_sizes="$batch" --xla_flags="$flags" --json="$out/$name.json" "${extra[@]}" "$@" \
      > "$out/$name.log" 2>&1
  echo "$name ($flags): exit $? $(grep -h 'lora_b' "$out/$name.log" | tail -1)"
}
cache=$(mktemp -d)
for i in "${!sets[@]}"; do
  if [[ $i == 0 ]]; then  # Also fills the cache that the last run reads.
    JAX_COMPILATION_CACHE_DIR=$cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
        bench set0 "${sets[0]}" --profile_dir="$out/prof"
  else
    bench "set$i" "${sets[$i]}"
  fi
done
JAX_COMPILATION_CACHE_DIR=$cache bench cached "${sets[0]}"
python3 benchmarks/trace_summary.py "$out/prof" --steps=2 > "$out/profile.md" 2>&1
python3 - "$out" "$best" "${sets[@]}" <<'PY'
import json, os, sys
out, best, sets = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = []
for i, flags in enumerate(sets):
  path = os.path.join(out, f'set{i}.json')
  row = json.load(open(path))['rows'][0] if os.path.exists(path) else {}
  rows.append((row.get('value') or 0, -(row.get('compile_s') or 1e9), flags))
  print(f"{flags or '(none)'}: {row.get('value')} img/s, compile {row.get('compile_s')} s")
# Within 1% of the fastest (run-to-run noise), the quickest to compile.
top = max(v for v, _, _ in rows)
value, _, flags = max((r for r in rows if r[0] >= 0.99 * top and r[0] > 0),
                      key=lambda r: r[1])  # r[1] = -compile seconds
print(f'best: {flags or "(none)"} ({value} img/s)')
open(best, 'w').write(flags)
PY
