"""Mesh shapes, partition rules, and host <-> global arrays on 8 CPU devices."""
import os
import subprocess
import sys

import pytest
from jax.sharding import PartitionSpec as P

from hyperlora_jax import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Subprocesses import the package from this checkout, and what else the
# environment already adds.
PYTHONPATH = os.pathsep.join(
    filter(None, [ROOT, os.environ.get('PYTHONPATH')]))


def test_mesh_shape_fills_minus_one():
  assert sharding.mesh_shape(-1, 1, 8) == (8, 1)
  assert sharding.mesh_shape(2, -1, 8) == (2, 4)
  assert sharding.mesh_shape(4, 2, 8) == (4, 2)
  for bad in ((-1, -1), (3, -1), (2, 2)):
    with pytest.raises(ValueError, match='mesh'):
      sharding.mesh_shape(*bad, 8)


def test_spec_for_size_rule_and_regex_rules():
  spec = sharding.spec_for
  assert spec('unet/kernel', (320, 1280), fsdp=4, min_size=1000) == P(
      None, 'fsdp')
  assert spec('unet/kernel', (3, 3, 640, 320), 4, min_size=1000) == P(
      None, None, 'fsdp', None)
  assert spec('small/bias', (320,), 4, min_size=1000) == P()  # Too small.
  assert spec('odd/kernel', (999, 7), 4, min_size=10) == P()  # Indivisible.
  assert spec('unet/kernel', (320, 1280), 1, min_size=10) == P()  # No fsdp.
  rules = (('embedding', (None, 'fsdp')), ('gamma', ()))
  assert spec('enc/embedding', (1000, 64), 4, rules, 10**9) == P(None, 'fsdp')
  assert spec('hyper/gamma', (1024, 1024), 4, rules, 10) == P()
  # Adam moments live under longer paths and match the same rules.
  assert spec('opt_state/0/mu/enc/embedding', (1000, 64), 4, rules,
              10**9) == P(None, 'fsdp')


def test_path_str():
  import jax  # pylint: disable=g-import-not-at-top
  tree = {'a': [{'b': 1}], 'c': 2}
  paths = [sharding.path_str(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(tree)[0]]
  assert paths == ['a/0/b', 'c']


SCRIPT = r"""
import jax, numpy as np
from hyperlora_jax import sharding
mesh = sharding.make_mesh(2, -1)
assert dict(mesh.shape) == {'data': 2, 'fsdp': 4}, mesh.shape
batch = {'x': np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
g = sharding.host_to_global(batch, mesh)['x']
assert g.shape == (16, 3)
assert {s.data.shape for s in g.addressable_shards} == {(2, 3)}
np.testing.assert_array_equal(np.asarray(g), batch['x'])
tree = {'big': np.ones((64, 32), np.float32), 'small': np.ones((3,))}
sh = sharding.tree_shardings(tree, mesh, min_size=100)
placed = sharding.place(tree, sh)
assert {s.data.shape for s in placed['big'].addressable_shards} == {(16, 32)}
assert placed['small'].sharding.is_fully_replicated
print('OK')
"""


def test_global_arrays_on_8_devices():
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=PYTHONPATH,
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  out = subprocess.run([sys.executable, '-c', SCRIPT], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=120,
                       check=False)
  assert out.stdout.strip() == 'OK', out.stderr[-3000:]
