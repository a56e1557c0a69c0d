r"""Stages one after another in one process against side by side (main --side_by_side).

  python benchmarks/side_by_side.py --out=side_by_side.md         # one GPU (H200)
  python benchmarks/side_by_side.py --tiny --out=/tmp/sbs.md      # CPU smoke run (tests)

Trains a config's base model briefly (--base_steps; its quality does not matter here),
copies it into a second workdir, then trains the same rows (--rows, each --steps) on it
twice: in one process one after another (main --stages=<rows>, as a plain launch trains
them), and side by side (main --stages=<rows> --side_by_side=N), each launch with a
compilation cache of its own, so both compile everything. Prints the wall time of each
and their ratio: the gain of sharing one device between small runs.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from hyperlora_jax import files  # pylint: disable=g-import-not-at-top,wrong-import-position


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--tiny', action='store_true', help='The smoke quickstart on CPU (tests).')
  p.add_argument('--config', default=None,
                 help='A multi-stage config (configs/quickstart.py:gpu_sweep_levers; tiny: '
                      ':smoke).')
  p.add_argument('--rows', default=None, help='Its stages to train, comma-separated (three '
                 'hypernetworks of gpu_sweep_levers; tiny: single_lora,hyperlora_heads).')
  p.add_argument('--base_steps', type=int, default=None, help='Base model steps (100; tiny 2).')
  p.add_argument('--steps', type=int, default=None, help='Steps of each row (500; tiny 2).')
  p.add_argument('--processes', type=int, default=None, help='Side by side (3; tiny 2).')
  p.add_argument('--workdir', default=None, help='Where both runs train (default: a '
                 'temporary folder).')
  p.add_argument('--out', default=None, help='Write the table (markdown) here.')
  p.add_argument('--json', default=None, help='Write the rows as JSON here.')
  args = p.parse_args(argv)
  tiny = dict(config='configs/quickstart.py:smoke', rows='single_lora,hyperlora_heads',
              base_steps=2, steps=2, processes=2)
  full = dict(config='configs/quickstart.py:gpu_sweep_levers',
              rows='hyperlora_perceiver,hyperlora_heads_attention_hidden256,'
                   'hyperlora_heads_attention_fast_lr', base_steps=100, steps=500,
              processes=3)
  for key, value in (tiny if args.tiny else full).items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  return args


def _main(args, workdir, *flags):
  """One launch of main.py (from the repository root); its wall seconds."""
  rows = args.rows.split(',')
  overrides = [f'--config.stages.base.train.num_steps={args.base_steps}'] + [
      f'--config.stages.{r}.train.num_steps={args.steps}' for r in rows]
  command = [sys.executable, '-m', 'hyperlora_jax.main', f'--config={args.config}',
             f'--workdir={workdir}', *overrides, *flags]
  print('$', ' '.join(command[1:]), flush=True)
  started = time.time()
  subprocess.run(command, cwd=ROOT, check=True)
  took = time.time() - started
  print(f'[{took:.1f} s] {" ".join(flags)}', flush=True)
  return took


def main(argv=None):
  args = parse_args(argv)
  root = args.workdir or tempfile.mkdtemp(prefix='side_by_side_')
  one, side = os.path.join(root, 'one_process'), os.path.join(root, 'side_by_side')
  cache = lambda name: f'--compilation_cache={os.path.join(root, "cache_" + name)}'
  base_s = _main(args, one, '--stages=base', cache('base'))
  if not os.path.exists(os.path.join(side, 'base')):
    shutil.copytree(os.path.join(one, 'base'), os.path.join(side, 'base'))
  rows = args.rows.split(',')
  one_s = _main(args, one, f'--stages={args.rows}', cache('one'))
  side_s = _main(args, side, f'--stages={args.rows}', f'--side_by_side={args.processes}',
                 cache('side'))
  results = [dict(how='one after another, one process', seconds=one_s),
             dict(how=f'side by side, {args.processes} processes', seconds=side_s)]
  lines = [f'{len(rows)} stages of {args.config}, {args.steps} steps each (the base: '
           f'{args.base_steps} steps, {base_s:.0f} s, once):', '',
           '| how | wall (s) | per stage (s) | speedup |', '|---|---|---|---|']
  for r in results:
    lines.append(f'| {r["how"]} | {r["seconds"]:.1f} | {r["seconds"] / len(rows):.1f} | '
                 f'{one_s / r["seconds"]:.2f}x |')
  table = '\n'.join(lines) + '\n'
  files.print_and_write(table, args.out, args.json, dict(
      rows=rows, steps=args.steps, base_seconds=base_s, results=results))


if __name__ == '__main__':
  main()
