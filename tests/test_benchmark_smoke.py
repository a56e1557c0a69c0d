"""benchmarks/: every tiny CPU mode runs end to end, the FLOP count that MFU uses equals
torch's FLOP counter, ratios stay within one process; trace_summary.py sums a made-up
trace."""
import dataclasses
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
OURS = 'ours (jax.jit)'


def _run(*flags, script=SCRIPT):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=PYTHONPATH)
  result = subprocess.run([sys.executable, script, *flags], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=400, check=False)
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


def _benchmark():
  """gpu_benchmark.py as a module (its table and FLOP code need no device)."""
  spec = importlib.util.spec_from_file_location('gpu_benchmark', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _check_rows(rows, expected, torch_impls):
  """Every expected row is there; PyTorch's compiled rows say they were skipped on CPU
  and every other row has positive numbers (ratios where PyTorch ran)."""
  if HAS_TORCH:
    expected |= {(c, impl) for c, _ in expected for impl in torch_impls}
  assert expected <= set(rows), sorted(expected - set(rows))
  for (config, impl), cells in rows.items():
    value, _, vs_eager, mfu, _, compile_s = cells
    if impl in {i for i in torch_impls if 'compiled' in i}:
      assert value == 'skipped (CPU)', (config, cells)
      continue
    assert _number(value) > 0 and _number(mfu) > 0, (config, impl, cells)
    if impl.startswith('ours'):
      assert _number(compile_s) > 0, (config, cells)
      if HAS_TORCH:
        assert _number(vs_eager) > 0, (config, cells)


# One process for every gpu_benchmark.py section the next three tests read: JAX, torch
# and each family's models start once, not once per test.
TINY_SECTIONS = 'lora,hyper,sample,latency,latency_parts,sdxl_lora,sdxl_sample'


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  """gpu_benchmark.py --tiny's table, --json file and, per section, its table rows."""
  folder = tmp_path_factory.mktemp('gpu_benchmark')
  out, js = folder / 'table.md', folder / 'rows.json'
  _run('--tiny', f'--only={TINY_SECTIONS}', '--batch_sizes=2', f'--out={out}', f'--json={js}')
  section = {r['label']: r['section'] for r in json.loads(js.read_text())['rows']}
  rows = _table(out.read_text())
  of = lambda *names: {k: v for k, v in rows.items() if section[k[0]] in names}
  return dict(out=out, json=js, of=of)


@pytest.mark.xdist_group('gpu_benchmark')
@pytest.mark.slow
def test_tiny_training_and_sampling_rows(tiny_run, tmp_path):
  out, js = tiny_run['out'], tiny_run['json']
  rows = tiny_run['of']('lora', 'hyper', 'sample')
  expected = {('LoRA train, batch 2', OURS), ('HyperLoRA train, batch 2', OURS),
              ('DDIM-3 + CFG, 2 images', 'ours (per-sample LoRAs)')}
  _check_rows({k: v for k, v in rows.items() if k[0] != 'HyperLoRA train, batch 2'},
              {e for e in expected if 'Hyper' not in e[0]},
              ('diffusers+peft eager', 'diffusers+peft compiled'))
  _check_rows({k: v for k, v in rows.items() if k[0] == 'HyperLoRA train, batch 2'},
              {('HyperLoRA train, batch 2', OURS)},
              ('PyTorch peer eager', 'PyTorch peer compiled'))
  for (config, impl), cells in rows.items():
    assert cells[1] == '-', (config, impl, cells)  # no compiled torch on CPU: no ratio
    assert cells[0] == 'skipped (CPU)' or cells[0].endswith(
        'evals/s' if 'DDIM' in config else 'img/s'), (config, impl, cells)

  # MFU's FLOPs: one count for both sides of a config; the HyperLoRA image adds three
  # hypernetwork forwards (the ViT's layers counted) to the LoRA image's two UNet ones.
  gb = _benchmark()
  flops = {(r['config'], r['impl']): r['flops_per_item']
           for r in json.loads(js.read_text())['rows']}
  unet = flops[('sample_2', 'ours (per-sample LoRAs)')]
  assert flops[('lora_2', OURS)] == 2 * unet
  hyper = (flops[('hyper_2', OURS)] - 2 * unet) / 3
  vit = gb._shapes(gb.parse_args(['--tiny'])).vit  # pylint: disable=protected-access
  patches = (vit['image_size'] // vit['patch_size']) ** 2
  assert hyper > 2 * vit['num_hidden_layers'] * (patches + 1) * 12 * vit['hidden_size'] ** 2
  if HAS_TORCH:
    assert flops[('hyper_2', 'PyTorch peer eager')] == flops[('hyper_2', OURS)]
  assert f'unet {unet / 1e12:.4g} TFLOP' in out.read_text()

  # Runs split with --only merge back into the same table (no JAX work: in process).
  gb.main([f'--merge={js}', f'--out={tmp_path / "merged.md"}'])
  assert (tmp_path / 'merged.md').read_text() == out.read_text()


@pytest.mark.xdist_group('gpu_benchmark')
def test_tiny_latency_rows_and_parts(tiny_run):
  rows = tiny_run['of']('latency', 'latency_parts')
  latency = '1 image: context -> LoRA -> DDIM-2 + CFG -> decoded'
  _check_rows({k: v for k, v in rows.items() if k[0] == latency},
              {(latency, 'ours (sample.generate)')},
              ('diffusers eager', 'diffusers compiled (reduce-overhead)'))
  parts = {impl: _number(cells[0]) for (config, impl), cells in rows.items()
           if config == 'ours at batch 1, by part'}
  assert len(parts) == 10 and min(parts.values()) > 0, parts
  assert {'hypernetwork: context -> LoRA', 'VAE decoder',
          'sampler loop, the LoRA merged into the weights'} <= set(parts)


@pytest.mark.xdist_group('gpu_benchmark')
def test_tiny_sdxl_rows(tiny_run):
  rows = tiny_run['of']('sdxl_lora', 'sdxl_sample')
  _check_rows(rows, {('SDXL LoRA train, batch 2', OURS),
                     ('SDXL DDIM-2 + CFG, 2 images', 'ours (per-sample LoRAs)')},
              ('diffusers+peft eager', 'diffusers+peft compiled'))
  assert 'pooled text 16 + 6 time ids' in tiny_run['out'].read_text()


@pytest.mark.skipif(not HAS_TORCH, reason='compares with diffusers')
def test_torch_rows_in_a_child_process_share_the_table(tmp_path):
  """--torch_in_child: the PyTorch rows come from a child process (--skip_ours) that ran
  first, ours from this one, and the ratios are between them, as in one process; the
  latency rows' random folder is written once, by the child, for both."""
  out, js = tmp_path / 'table.md', tmp_path / 'rows.json'
  result = _run('--tiny', '--only=lora,latency', '--batch_sizes=2', '--torch_in_child',
                f'--out={out}', f'--json={js}')
  rows = _table(out.read_text())
  latency = '1 image: context -> LoRA -> DDIM-2 + CFG -> decoded'
  assert set(rows) == {('LoRA train, batch 2', impl) for impl in (
      'diffusers+peft eager', 'diffusers+peft compiled', OURS)} | {(latency, impl) for impl in (
          'diffusers eager', 'diffusers compiled (reduce-overhead)',
          'ours (sample.generate)')}, sorted(rows)
  assert _number(rows[('LoRA train, batch 2', OURS)][2]) > 0  # vs the child's eager row
  assert _number(rows[(latency, 'ours (sample.generate)')][2]) > 0
  assert (result.stdout + result.stderr).count("writing the latency rows' random") == 1
  notes = json.loads(js.read_text())['notes']
  assert sum('child process of their own' in n for n in notes) == 1, notes
  assert len({n[:12] for n in notes}) == len(notes), notes  # no note twice


@pytest.mark.skipif(not HAS_TORCH, reason='compares with diffusers')
@pytest.mark.slow
def test_tiny_sdxl_parity_is_exact_in_fp32():
  result = _run('--tiny', script=os.path.join(ROOT, 'benchmarks', 'sdxl_parity.py'))
  rows = {r['dtype']: r for r in json.loads(result.stdout.strip().splitlines()[-1])}
  assert rows['float32']['max_rel'] < 1e-4 and rows['bfloat16']['max_rel'] < 5e-2, rows


@pytest.mark.skipif(not HAS_TORCH, reason="compares with torch's FLOP counter")
@pytest.mark.slow
def test_flops_equal_torch_flop_counter_at_full_size():
  """The count behind MFU, on the full SD1.5 and SDXL UNets and the ViT-L/14 (a lax.scan
  over its layers), equals torch.utils.flop_counter on diffusers' and transformers'
  models (meta tensors: nothing is allocated). The old XLA cost analysis said 0.00425
  TFLOP per SD1.5 forward on GPUs and counted one ViT layer."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top
  from hyperlora_jax.models import clip  # pylint: disable=g-import-not-at-top

  gb = _benchmark()
  args = gb.parse_args([])

  def torch_flops(model, *inputs, **kwargs):
    with FlopCounterMode(display=False) as counter:
      model(*inputs, **kwargs)
    return counter.get_total_flops()

  for family in ('sd15', 'sdxl'):
    s = gb._shapes(args, family)  # pylint: disable=protected-access
    ours = gb.model_flops(dataclasses.replace(s, text={}), _hypernet_config(gb, s, args))
    with torch.device('meta'):
      unet = diffusers.UNet2DConditionModel(**s.unet)
      added = ({'text_embeds': torch.randn(1, s.pooled_dim), 'time_ids': torch.randn(1, 6)}
               if s.pooled_dim else None)
      theirs = torch_flops(unet, torch.randn(1, 4, s.latent, s.latent), torch.tensor([1]),
                           torch.randn(1, s.text_len, s.text_dim), added_cond_kwargs=added)
    assert ours['unet'] == theirs, (family, ours, theirs)
  assert round(ours['unet'] / 1e12, 2) == 6.76  # SDXL at 1024 px

  vit = clip.vision_from_config(s.vit).clone(remat='full')  # a lax.scan over 24 layers
  params = gb.abstract_params(vit)
  ours = gb.flops(lambda p, x: vit.apply({'params': p}, x), params,
                  jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  with torch.device('meta'):
    theirs = torch_flops(transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(**s.vit)), torch.randn(1, 3, 224, 224))
  assert ours == theirs and round(ours / 1e12, 3) == 0.162


def _hypernet_config(gb, shapes, args):
  from hyperlora_jax import defaults  # pylint: disable=g-import-not-at-top
  config = defaults.get_config('hyperlora')
  gb._hypernet_config(config, shapes, args)  # pylint: disable=protected-access
  return config.hypernet


def test_ratios_only_within_one_process_and_the_hyperlora_note():
  gb = _benchmark()
  args = gb.parse_args(['--tiny'])
  row = lambda section, n, impl, value, process, baseline='': dataclasses.replace(
      gb._row(section, n, impl, args, baseline), value=value, process=process)  # pylint: disable=protected-access
  rows = [row('lora', 4, 'diffusers+peft compiled', 100.0, 'a', 'compiled'),
          row('lora', 4, OURS, 130.0, 'a'), row('lora', 4, 'ours again', 140.0, 'b'),
          row('hyper', 4, 'PyTorch peer compiled', 80.0, 'a', 'compiled'),
          row('hyper', 4, OURS, 90.0, 'a'),
          row('latency', 1, 'diffusers compiled', 400.0, 'a', 'compiled'),
          row('latency', 1, 'ours (sample.generate)', 300.0, 'a')]
  text = gb.format_table(rows, [], 1e15)
  table = _table(text)
  assert table[('LoRA train, batch 4', OURS)][1] == '1.30x'
  assert table[('LoRA train, batch 4', 'ours again')][1] == '-'  # another process
  assert table[('HyperLoRA train, batch 4', OURS)][1] == '1.12x'
  latency = next(k for k in table if k[1] == 'ours (sample.generate)')
  assert table[latency][:2] == ['300 ms', '1.33x']  # less time is faster
  assert ("HyperLoRA train, batch 4, ours (jax.jit): 0.90x diffusers+peft compiled's plain "
          'LoRA step') in text


@pytest.mark.slow
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


@pytest.mark.slow
def test_hdb_benchmark_tiny_prints_every_target_row(tmp_path):
  """benchmarks/hdb_benchmark.py --tiny: every speed and memory row of issue 16, each
  with its number (through finetune.personalize and the lora_bank fit)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=PYTHONPATH)
  out = tmp_path / 'hdb.md'
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'benchmarks', 'hdb_benchmark.py'), '--tiny',
       f'--out={out}', f'--folder={tmp_path / "weights"}',
       f'--compilation_cache={tmp_path / "cache"}', f'--profile={tmp_path / "profile"}'],
      env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  # The 1-step call's trace, in the perfetto form benchmarks/trace_summary.py reads.
  assert list((tmp_path / 'profile').rglob('*perfetto_trace.json.gz'))
  rows, notes = {}, {}
  for line in out.read_text().splitlines()[2:]:
    if line.startswith('| '):
      name, rows[name], notes[name] = (c.strip() for c in line.strip('|').split('|'))
  assert not [v for v in rows.values() if v.startswith('failed')], rows
  assert _number(rows['one subject: context -> LoRA file, after compilation']) > 0
  compile_row = 'one subject: compile of the fine-tuning loop'
  cold = _number(rows[compile_row])
  tracing, = re.findall(r'tracing ([0-9.]+) s', notes[compile_row])
  assert cold > float(tracing) > 0
  assert 'reuse the loop (0.0 s)' in notes[compile_row]  # the second subject compiles nothing
  first = _number(rows["one subject: this process' first context -> LoRA file, compiles "
                       'included'])
  assert first > float(cold)  # the loop's compile is part of it
  assert rows['2 subjects fine-tuned together'].endswith('subjects/s')
  # The loop's cost split from a 1-step call of the same program (no compile of its own).
  assert re.fullmatch(r'-?[0-9.]+ s \+ -?[0-9.]+ ms',
                      rows['one subject: the loop, fixed cost per call + per step'])
  for name in ('pre-optimization, 2 identities per step',
               'pre-optimization, one identity at a time'):
    assert _number(rows[name]) > 0 and rows[name].endswith('identities/s')
  assert 'peak memory, pre-optimization at 2 identities per step' in rows


FAKE_PYTHON = '''#!/usr/bin/env python3
"""Stands in for python3 under device_run.sh: notes its call, writes a --json file."""
import json, os, sys
if sys.argv[1] == '-c':  # start's import checks (the lazy imports, then each script):
  # BROKEN names one that fails
  with open(os.environ['CALLS'] + '.imports', 'a') as f:
    f.write(sys.argv[-1] + '\\n')
  sys.exit(1 if sys.argv[-1] == os.environ.get('BROKEN') else 0)
with open(os.environ['CALLS'], 'a') as f:
  f.write(' '.join(sys.argv[1:]) + '\\n')
for a in sys.argv[1:]:
  if a.startswith('--json='):
    with open(a[len('--json='):], 'w') as f:
      json.dump({'rows': [], 'notes': [sys.argv[1]]}, f)
  if a.startswith('--workdir='):  # a quickstart: its report and a checkpoint
    seeds = [s.split('seeds=')[1] for s in sys.argv if ':seeds=' in s]
    report = 'report_seeds_' + seeds[0] if seeds else 'report'
    for folder in (report, 'base'):
      os.makedirs(os.path.join(a[len('--workdir='):], folder), exist_ok=True)
    with open(os.path.join(a[len('--workdir='):], report, 'results.md'), 'w') as f:
      f.write('| row |')
sys.exit(3 if 'sdxl_parity' in sys.argv[1] else 0)
'''


def test_device_run_runs_a_set_detached_once_and_brings_back_its_results(tmp_path):
  """The runbook's driver: one detached job runs the set's processes in a copy of the
  tree, a collect brings back one archive with every process' files and exit code, and
  starting the set again runs only what is not done."""
  fake = tmp_path / 'python3'
  fake.write_text(FAKE_PYTHON)
  fake.chmod(0o755)
  calls, out = tmp_path / 'calls', tmp_path / 'out'
  out.mkdir()
  env = dict(os.environ, BENCH_JOB=str(tmp_path / 'job'), BENCH_PYTHON=str(fake),
             BENCH_FLAGS='--tiny', BENCH_WHEELS=str(tmp_path / 'no_wheels'),
             CALLS=str(calls), OUT=str(out))
  script = os.path.join(ROOT, 'benchmarks', 'device_run.sh')
  run = lambda *a: subprocess.run(['bash', script, *a], env=env, cwd=ROOT,
                                  capture_output=True, text=True, timeout=120, check=False)
  result = run('start', 'issue20,sdxl_parity', '60')
  assert result.returncode == 0 and 'JOB FINISHED' in result.stdout, result
  lines = calls.read_text().splitlines()
  assert [line.split()[0] for line in lines] == ['benchmarks/gpu_benchmark.py'] * 3 + [
      'benchmarks/sdxl_parity.py'], lines
  assert all(line.endswith(f'--tiny --json={tmp_path}/job/results/{name}.json '
                           f'--out={tmp_path}/job/results/{name}.md')
             for line, name in zip(lines, ('lora_hyper_b32', 'latency', 'lora_sample_b16')))
  assert '--only=lora,hyper --batch_sizes=32' in lines[0]
  assert (tmp_path / 'job' / 'tree' / 'hyperlora_jax' / 'sample.py').exists()

  subprocess.run(['tar', 'xzf', str(out / 'results.tgz'), '-C', str(out)], check=True)
  rc = {p.stem: p.read_text().strip() for p in (out / 'results').glob('*.rc')}
  assert rc == {'lora_hyper_b32': '0', 'lora_sample_b16': '0', 'latency': '0',
                'sdxl_parity': '3'}, rc
  assert json.loads((out / 'results' / 'latency.json').read_text())['rows'] == []

  assert run('start', 'issue20', '60').returncode == 0
  assert len(calls.read_text().splitlines()) == 4  # all done on this machine already

  # A quickstart config: its workdir and compilation cache stay on the machine (a later
  # start resumes the stages); only its report comes back.
  assert run('start', 'basis_gpu', '60').returncode == 0
  job = tmp_path / 'job'
  assert calls.read_text().splitlines()[-1] == (
      f'-m hyperlora_jax.main --config=configs/quickstart_basis.py:gpu --tiny '
      f'--workdir={job}/work/basis_gpu --compilation_cache={job}/cache')
  assert (job / 'tree' / 'configs' / 'quickstart_basis.py').exists()
  subprocess.run(['tar', 'xzf', str(out / 'results.tgz'), '-C', str(out)], check=True)
  assert (out / 'results' / 'basis_gpu' / 'report' / 'results.md').read_text() == '| row |'
  assert not (out / 'results' / 'basis_gpu' / 'base').exists()
  # Processes that name their workdir share it (seed 2 of a table, then a sweep on its
  # base model); each one's report comes back under its own name.
  assert run('start', 'qs_gpu_seed_2,qs_gpu_sweep', '60').returncode == 0
  assert calls.read_text().splitlines()[-2:] == [
      f'-m hyperlora_jax.main --config=configs/quickstart.py:{size} '
      f'--workdir={job}/work/qs_gpu_base --tiny --compilation_cache={job}/cache'
      for size in ('gpu:seeds=2', 'gpu_sweep')]
  subprocess.run(['tar', 'xzf', str(out / 'results.tgz'), '-C', str(out)], check=True)
  assert (out / 'results' / 'qs_gpu_seed_2' / 'report_seeds_2' / 'results.md').exists()
  assert (out / 'results' / 'qs_gpu_sweep' / 'report' / 'results.md').exists()
  result = run('start', 'issue_twenty')
  assert result.returncode == 2 and 'sdxl_parity' in result.stderr, result

  # start imports the package's lazy imports and each script of the set first: one that
  # does not import starts nothing.
  imports = (tmp_path / 'calls.imports').read_text().splitlines()
  assert imports[:3] == ['import tensorboardX', 'benchmarks/gpu_benchmark.py',
                         'benchmarks/sdxl_parity.py'], imports
  assert imports[-1] == 'hyperlora_jax.main', imports
  env['BROKEN'] = 'benchmarks/hdb_benchmark.py'
  result = run('start', 'hdb_cold,sdxl_parity', '60')
  assert result.returncode == 1 and 'hdb_benchmark.py does not import' in result.stderr
  env['BROKEN'] = 'import tensorboardX'
  result = run('start', 'basis_gpu', '60')
  assert result.returncode == 1 and 'tensorboardX: not importable' in result.stderr
  assert len(calls.read_text().splitlines()) == 7  # the four, basis_gpu, the two: nothing new


def test_tiny_controlnet_row(tmp_path):
  """benchmarks/controlnet_benchmark.py: ours (a LoRA per image + a ControlNet) beside
  diffusers' ControlNet pipeline loop, in gpu_benchmark's table."""
  out = tmp_path / 'table.md'
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=PYTHONPATH)
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'benchmarks', 'controlnet_benchmark.py'), '--tiny',
       f'--out={out}'], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
      check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  rows = _table(out.read_text())
  config = 'ControlNet + DDIM-3 + CFG, 2 images'
  ours = rows[(config, 'ours (per-sample LoRAs + ControlNet)')]
  assert _number(ours[0]) > 0 and _number(ours[3]) > 0 and _number(ours[5]) > 0, ours
  if HAS_TORCH:
    eager = rows[(config, 'diffusers+peft eager')]
    assert _number(eager[0]) > 0 and _number(ours[2]) > 0, eager
    assert rows[(config, 'diffusers+peft compiled')][0] == 'skipped (CPU)'


@pytest.mark.slow
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


@pytest.mark.slow
def test_side_by_side_benchmark_trains_the_rows_both_ways(tmp_path):
  """benchmarks/side_by_side.py --tiny: the smoke quickstart's rows on one base model, in
  one process and side by side (main --stages, --side_by_side), timed in one table."""
  _run('--tiny', f'--workdir={tmp_path}', f'--out={tmp_path / "sbs.md"}',
       script=os.path.join(ROOT, 'benchmarks', 'side_by_side.py'))
  rows = {}
  for line in (tmp_path / 'sbs.md').read_text().splitlines()[4:]:
    how, *cells = (c.strip() for c in line.strip('|').split('|'))
    rows[how] = cells
  assert set(rows) == {'one after another, one process', 'side by side, 2 processes'}
  assert all(float(wall) > 0 for wall, *_ in rows.values()), rows
  for stage in ('single_lora', 'hyperlora_heads'):
    for how in ('one_process', 'side_by_side'):
      assert os.path.isdir(tmp_path / how / stage / 'checkpoints'), (how, stage)
    assert (tmp_path / 'side_by_side' / 'logs' / f'{stage}.log').exists()
  assert not (tmp_path / 'side_by_side' / 'report').exists()  # --stages: no report


def test_init_benchmark_draws_the_same_params_each_way(tmp_path):
  """benchmarks/init_benchmark.py --tiny: the smoke UNet's init through XLA's threefry and
  through models.init_variables, each in its own process: one table, equal params."""
  _run('--tiny', '--ways=xla,kernel', f'--out={tmp_path / "init.md"}',
       f'--json={tmp_path / "init.json"}',
       script=os.path.join(ROOT, 'benchmarks', 'init_benchmark.py'))
  rows = json.loads((tmp_path / 'init.json').read_text())['rows']
  assert [r['way'] for r in rows] == ['xla', 'kernel']
  assert all(r['seconds'] > 0 and r['max_abs_diff'] == 0 for r in rows), rows
  assert '| kernel |' in (tmp_path / 'init.md').read_text()
