"""benchmarks/: the tiny CPU modes run end to end; trace_summary.py sums a made-up trace."""
import gzip
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'benchmarks', 'gpu_benchmark.py')
PYTHONPATH = os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH')]))
HAS_TORCH = all(importlib.util.find_spec(m) for m in ('torch', 'diffusers', 'peft'))


def _run(*flags):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=PYTHONPATH)
  result = subprocess.run([sys.executable, SCRIPT, *flags], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result


def _table(text):
  """{(config, implementation): [throughput, vs compiled, vs eager, MFU, peak, compile]}."""
  rows = {}
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip().strip('|').split('|')]
    if len(cells) == 8 and cells[0] not in ('config', '---'):
      rows[(cells[0], cells[1])] = cells[2:]
  return rows


def _number(cell):
  match = re.match(r'([0-9][0-9.e+-]*)', cell)
  assert match, cell
  return float(match.group(1))


def test_tiny_run_prints_every_row_with_positive_numbers(tmp_path):
  out, js = tmp_path / 'table.md', tmp_path / 'rows.json'
  _run('--tiny', f'--out={out}', f'--json={js}')
  rows = _table(out.read_text())
  configs = ['LoRA train, batch 2', 'LoRA train, batch 4', 'DDIM-3 + CFG, 2 images']
  expected = {(c, 'ours (jax.jit)') for c in configs[:2]}
  expected |= {('HyperLoRA train, batch 2', 'ours (jax.jit)'),
               ('DDIM-3 + CFG, 2 images', 'ours (per-sample LoRAs)')}
  if HAS_TORCH:
    expected |= {(c, f'diffusers+peft {m}') for c in configs for m in ('eager', 'compiled')}
  assert expected <= set(rows), sorted(set(expected) - set(rows))

  for (config, impl), cells in rows.items():
    throughput, _, vs_eager, mfu, _, compile_s = cells
    if impl == 'diffusers+peft compiled':
      assert throughput == 'skipped (CPU)', (config, cells)
      continue
    assert _number(throughput) > 0 and _number(mfu) > 0, (config, impl, cells)
    assert throughput.endswith('evals/s' if 'DDIM' in config else 'img/s')
    if impl.startswith('ours'):
      assert _number(compile_s) > 0, (config, cells)
      if HAS_TORCH:
        assert _number(vs_eager) > 0, (config, cells)

  # Runs split with --only merge back into the same table (no JAX work: in process).
  spec = importlib.util.spec_from_file_location('gpu_benchmark', SCRIPT)
  benchmark = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(benchmark)
  benchmark.main([f'--merge={js}', f'--out={tmp_path / "merged.md"}'])
  assert (tmp_path / 'merged.md').read_text() == out.read_text()


def test_memory_plan_prints_xla_plans_of_the_tiny_steps():
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=PYTHONPATH,
             XLA_FLAGS='--xla_backend_optimization_level=0 '
                       '--xla_llvm_disable_expensive_passes=true')
  script = os.path.join(ROOT, 'benchmarks', 'memory_plan.py')
  result = subprocess.run(
      [sys.executable, script, '--tiny', '--batch=2', '--steps=lora,hyper',
       '--set=hypernet.encoder.remat=full'],
      env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  temps = re.findall(r'^(lora|hyper) batch 2 .*temp ([0-9.]+)', result.stdout, re.M)
  assert [s for s, _ in temps] == ['lora', 'hyper'], result.stdout


def _trace_summary():
  spec = importlib.util.spec_from_file_location(
      'trace_summary', os.path.join(ROOT, 'benchmarks', 'trace_summary.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _perfetto(path, device_lines):
  """A perfetto JSON like jax.profiler's: a host process and a GPU with these lines."""
  events = [{'ph': 'M', 'name': 'process_name', 'pid': 1, 'args': {'name': '/host:CPU'}},
            {'ph': 'M', 'name': 'process_name', 'pid': 2, 'args': {'name': '/device:GPU:0'}},
            {'ph': 'X', 'pid': 1, 'tid': 1, 'name': 'convolution.9', 'dur': 1e6}]
  for tid, (line, ops) in enumerate(device_lines.items()):
    events.append({'ph': 'M', 'name': 'thread_name', 'pid': 2, 'tid': tid,
                   'args': {'name': line}})
    events += [{'ph': 'X', 'pid': 2, 'tid': tid, 'name': name, 'dur': dur,
                'args': {'long_name': text}} for name, text, dur in ops]
  with gzip.open(path, 'wt') as f:
    json.dump({'traceEvents': events}, f)
  return path


def test_trace_summary_sums_device_ops_by_kind_per_step(tmp_path):
  ts = _trace_summary()
  xla_ops = [('custom-call.1', 'custom_call_target="__cudnn$convForward"', 300.0),
             ('custom-call.2', 'custom_call_target="__cudnn$fmhaSoftmax"', 200.0),
             ('fusion.3', 'fusion(...), kind=kLoop', 60.0),
             ('fusion.4', 'fusion(...), kind=kInput, calls=%region_reduce', 40.0),
             ('custom-call.1', 'custom_call_target="__cudnn$convForward"', 300.0)]
  kernels = [('sm90_xmma_fprop_kernel', '', 999.0)]  # the same work, seen as kernels
  path = _perfetto(tmp_path / 'a.perfetto_trace.json.gz',
                   {'XLA Ops': xla_ops, 'Stream #7(compute)': kernels})
  ops = ts.device_ops(ts.load(str(path)))
  assert sorted(d for _, _, d in ops) == [40.0, 60.0, 200.0, 300.0, 300.0]  # no host op
  text = ts.summarize(ops, steps=2)
  assert 'Device time per step: 0.45 ms in 2 ops.' in text
  shares = dict(re.findall(r'\| (\w[\w /]+) \| [0-9.]+ ms \| ([0-9.]+)% \|', text))
  assert shares == {'convolution': '66.7', 'attention': '22.2',
                    'elementwise fusion': '6.7', 'reduction fusion': '4.4'}
  assert text.index('| custom-call.1 | convolution | 0.30 ms |') < text.index('fusion.3')

  # Without an XLA Ops line, the kernels on the stream lines are the ops.
  path = _perfetto(tmp_path / 'b.perfetto_trace.json.gz', {'Stream #7(compute)': kernels})
  assert ts.summarize(ts.device_ops(ts.load(str(path)))).count('convolution') == 2

  with pytest.raises(ValueError, match='no device in the trace'):
    ts.device_ops([e for e in ts.load(str(path)) if e.get('pid') == 1])
  with pytest.raises(FileNotFoundError, match='create_perfetto_trace=True'):
    ts.find_traces(str(tmp_path / 'nothing_here'))


def test_hdb_benchmark_tiny_prints_every_target_row(tmp_path):
  """benchmarks/hdb_benchmark.py --tiny: every speed and memory row of issue 16, each
  with its number (through finetune.personalize and the lora_bank fit)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=PYTHONPATH)
  out = tmp_path / 'hdb.md'
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'benchmarks', 'hdb_benchmark.py'), '--tiny',
       f'--out={out}', f'--folder={tmp_path / "weights"}',
       f'--compilation_cache={tmp_path / "cache"}'],
      env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  rows = {}
  for line in out.read_text().splitlines()[2:]:
    if line.startswith('| '):
      name, value, _ = (c.strip() for c in line.strip('|').split('|'))
      rows[name] = value
  assert not [v for v in rows.values() if v.startswith('failed')], rows
  assert _number(rows['one subject: context -> LoRA file, after compilation']) > 0
  cold, warm = re.findall(r'([0-9.]+) s (?:cold|warm)',
                          rows['one subject: compile of the fine-tuning loop'])
  assert float(cold) > 0 and float(warm) > 0
  assert rows['2 subjects fine-tuned together'].endswith('subjects/s')
  for name in ('pre-optimization, 2 identities per step',
               'pre-optimization, one identity at a time'):
    assert _number(rows[name]) > 0 and rows[name].endswith('identities/s')
  assert 'peak memory, pre-optimization at 2 identities per step' in rows


def test_merge_benchmark_tiny_prints_every_row():
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=PYTHONPATH)
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'benchmarks', 'merge_benchmark.py'), '--tiny',
       '--steps=3', '--repeats=1', '--rank=2'],
      env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  rows = {}
  for line in result.stdout.splitlines():
    cells = [c.strip() for c in line.strip().strip('|').split('|')]
    if len(cells) == 3 and cells[0] not in ('row', '---'):
      rows[cells[0]] = cells[1]
  assert len(rows) == 6, result.stdout
  for name, cell in rows.items():
    assert _number(cell) > 0, (name, cell)
  assert any(name.startswith('merge CLI end to end') for name in rows)
