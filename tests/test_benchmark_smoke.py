"""benchmarks/gpu_benchmark.py runs end to end in its tiny CPU mode."""
import importlib.util
import os
import re
import subprocess
import sys

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
