r"""A from-scratch UNet's init, each way in a fresh process with no compilation cache.

  python benchmarks/init_benchmark.py --out=init.md              # one GPU (H200)
  python benchmarks/init_benchmark.py --tiny --out=/tmp/init.md  # CPU smoke run (tests)

A launch that trains a base model from scratch first draws its params: on one H200 the
GPU quickstart spent 78 s building its objective (its 4,000 training steps took 200 s),
54 s of it compiling jit(unet.init)'s random draws. Each way's params are compared with the first
way's (the same threefry bits give the same params):

  xla     jit(unet.init): threefry lowered to XLA ops, its rounds unrolled for every draw
  kernel  models.init_variables (what the objectives use): threefry as one GPU kernel
  cpu     jit(unet.init) on the host's CPU, then the params copied to the device
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from hyperlora_jax import files  # pylint: disable=g-import-not-at-top,wrong-import-position

WAYS = ('xla', 'kernel', 'cpu')


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--tiny', action='store_true', help='The smoke quickstart on CPU (tests).')
  p.add_argument('--size', default=None, help="configs/quickstart.py's size (gpu; tiny: smoke).")
  p.add_argument('--ways', default=','.join(WAYS), help=f'Comma-separated, of {WAYS}.')
  p.add_argument('--out', default=None, help='Write the table (markdown) here.')
  p.add_argument('--json', default=None, help='Write the rows as JSON here.')
  p.add_argument('--child', default=None, help=argparse.SUPPRESS)  # WAY,params.npz
  args = p.parse_args(argv)
  args.size = args.size or ('smoke' if args.tiny else 'gpu')
  unknown = set(args.ways.split(',')) - set(WAYS)
  if unknown:
    p.error(f'unknown --ways {sorted(unknown)}; known: {WAYS}')
  return args


def _child(size, way, npz):
  """Draws the size's UNet params the given way; writes them and the seconds taken."""
  import jax  # pylint: disable=g-import-not-at-top
  from configs import quickstart  # pylint: disable=g-import-not-at-top
  from hyperlora_jax.models import init_variables, unet  # pylint: disable=g-import-not-at-top
  from hyperlora_jax.objectives import base  # pylint: disable=g-import-not-at-top
  config = quickstart.get_config(size).stages['base']
  module = unet.from_config(config.model.unet.to_dict(), base.compute_dtype(config))
  inputs = module.dummy_inputs()
  rng = jax.random.key(0)
  jax.block_until_ready(jax.numpy.zeros(()) + 1)  # The backend starts: not timed.
  started = time.time()
  if way == 'kernel':
    params = init_variables(module, rng, *inputs)
  elif way == 'cpu':
    with jax.default_device(jax.devices('cpu')[0]):
      params = jax.jit(module.init)(jax.device_put(rng), *inputs)
    params = jax.device_put(params, jax.devices()[0])
  else:
    params = jax.jit(module.init)(rng, *inputs)
  params = jax.block_until_ready(params['params'])
  seconds = time.time() - started
  leaves = jax.tree_util.tree_leaves_with_path(params)
  np.savez(npz, **{jax.tree_util.keystr(k): np.asarray(v, np.float32) for k, v in leaves})
  print(json.dumps(dict(way=way, seconds=seconds, device=jax.devices()[0].device_kind)))


def _run(size, way, npz):
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  out = subprocess.run([sys.executable, os.path.abspath(__file__), f'--size={size}',
                        f'--child={way},{npz}'], cwd=ROOT, env=env, check=True,
                       capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def _max_diff(a, b):
  with np.load(a) as x, np.load(b) as y:
    if sorted(x.files) != sorted(y.files):
      return float('inf')
    return max(float(np.max(np.abs(x[k] - y[k]), initial=0.0)) for k in x.files)


def main(argv=None):
  args = parse_args(argv)
  if args.child:
    way, npz = args.child.split(',', 1)
    return _child(args.size, way, npz)
  ways = args.ways.split(',')
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for way in ways:
      row = _run(args.size, way, os.path.join(tmp, f'{way}.npz'))
      row['max_abs_diff'] = _max_diff(os.path.join(tmp, f'{ways[0]}.npz'),
                                      os.path.join(tmp, f'{way}.npz'))
      print(row, flush=True)
      rows.append(row)
  lines = [f"UNet init of configs/quickstart.py:{args.size} on {rows[0]['device']}, "
           'a fresh process each, no compilation cache:', '',
           f'| way | seconds | vs {ways[0]} | params: max abs diff to {ways[0]} |',
           '|---|---|---|---|']
  for r in rows:
    lines.append(f"| {r['way']} | {r['seconds']:.1f} | {rows[0]['seconds'] / r['seconds']:.2f}x"
                 f" | {r['max_abs_diff']:.3g} |")
  table = '\n'.join(lines) + '\n'
  files.print_and_write(table, args.out, args.json, dict(size=args.size, rows=rows))


if __name__ == '__main__':
  main()
