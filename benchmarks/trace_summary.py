r"""Where the device time of a jax.profiler trace goes, as a table.

Reads the perfetto trace that `jax.profiler.trace(..., create_perfetto_trace=True)`
writes (`gpu_benchmark.py --profile_dir` does) and sums the GPU's time by kind of
work (convolution, matmul, attention, fused elementwise/reduction, copies) and by
XLA op, so that "where the time goes" is a number, not a guess:

  python benchmarks/trace_summary.py /tmp/prof/lora_b16 [--top=25] [--steps=2]

Ops come from the trace's "XLA Ops" line (one event per HLO instruction run, with
its HLO text in `long_name`); where a trace has no such line, from the kernels on
the device's stream lines. Times are per step when `--steps` says how many steps
the trace holds.
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re

# First match wins; matched against the op name, its HLO text and kernel names.
CATEGORIES = (
    ('attention', re.compile(r'fmha|flash|attention|softmax', re.I)),
    ('convolution', re.compile(r'cudnn\$conv|convolution|conv_|xmma|fprop|dgrad|wgrad',
                               re.I)),
    ('matmul', re.compile(r'gemm|nvjet|cublas|\bdot\b|dot\.|dot_general|matmul', re.I)),
    ('copy/transpose', re.compile(r'copy|transpose|memcpy|memset', re.I)),
    ('reduction fusion', re.compile(r'kind=kInput|reduce|reduction', re.I)),
    ('elementwise fusion', re.compile(r'fusion|kind=kLoop|loop_', re.I)),
)


def category(*texts: str) -> str:
  text = ' '.join(t for t in texts if t)
  return next((name for name, pattern in CATEGORIES if pattern.search(text)), 'other')


def find_traces(path: str):
  if os.path.isfile(path):
    return [path]
  found = sorted(glob.glob(os.path.join(path, '**', '*perfetto_trace.json.gz'),
                           recursive=True))
  if not found:
    raise FileNotFoundError(f'no *perfetto_trace.json.gz under {path}: profile with '
                            'jax.profiler.trace(..., create_perfetto_trace=True)')
  return found


def load(path: str):
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rt') as f:
    data = json.load(f)
  return data['traceEvents'] if isinstance(data, dict) else data


def device_ops(events):
  """[(op name, HLO text, microseconds)] of the device's XLA Ops line (or kernels)."""
  procs = {e['pid']: e['args']['name'] for e in events
           if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  threads = {(e['pid'], e['tid']): e['args']['name'] for e in events
             if e.get('ph') == 'M' and e.get('name') == 'thread_name'}
  devices = {pid for pid, name in procs.items() if name.startswith('/device:')}
  if not devices:
    raise ValueError(f'no device in the trace (processes: {sorted(procs.values())})')
  spans = [e for e in events if e.get('ph') == 'X' and e.get('pid') in devices]
  lines = collections.defaultdict(list)
  for e in spans:
    lines[threads.get((e['pid'], e['tid']), '')].append(e)
  ops = [v for k, v in lines.items() if k == 'XLA Ops']
  chosen = ops[0] if ops else [e for k, v in lines.items() if k.startswith('Stream')
                               for e in v]
  return [(e['name'], e.get('args', {}).get('long_name', ''), float(e.get('dur', 0)))
          for e in chosen]


def summarize(ops, steps: int = 1, top: int = 25) -> str:
  """Markdown tables: time by category, then the `top` op names by time."""
  total = sum(d for _, _, d in ops) or 1.0
  by_cat, by_op, texts = collections.Counter(), collections.Counter(), {}
  for name, text, dur in ops:
    by_cat[category(name, text)] += dur
    by_op[name] += dur
    texts.setdefault(name, text)
  ms = lambda us: f'{us / steps / 1e3:.2f} ms'
  out = [f'Device time per step: {ms(total)} in {len(ops) // steps} ops.', '',
         '| kind | time per step | share |', '|---|---|---|']
  out += [f'| {c} | {ms(d)} | {100 * d / total:.1f}% |' for c, d in by_cat.most_common()]
  out += ['', '| op | kind | time per step | share | HLO |', '|---|---|---|---|---|']
  for name, d in by_op.most_common(top):
    hlo = ' '.join(texts[name].split())[:90].replace('|', '/')
    out.append(f'| {name} | {category(name, texts[name])} | {ms(d)} | '
               f'{100 * d / total:.1f}% | {hlo} |')
  return '\n'.join(out) + '\n'


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('path', help='a perfetto_trace.json.gz or a folder holding some')
  p.add_argument('--steps', type=int, default=1, help='steps the trace holds')
  p.add_argument('--top', type=int, default=25)
  args = p.parse_args(argv)
  for path in find_traces(args.path):
    print(f'## {path}\n')
    print(summarize(device_ops(load(path)), args.steps, args.top))


if __name__ == '__main__':
  main()
