"""traced.lower: a program traced once is read back from disk by a fresh function."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperlora_jax import traced


@pytest.fixture
def cache(tmp_path):
  before = jax.config.jax_compilation_cache_dir
  jax.config.update('jax_compilation_cache_dir', str(tmp_path))
  yield tmp_path
  jax.config.update('jax_compilation_cache_dir', before)


def _program(scale):
  def fn(params, x, rng):
    noise = jax.random.normal(rng, x.shape)
    return {'y': jnp.tanh(x @ params['w']) * scale + noise, 'n': params['w'].sum()}
  return fn


def _untraceable(*args):
  raise AssertionError('traced again instead of read from disk')


def _args(n=3):
  return ({'w': np.arange(n * n, dtype=np.float32).reshape(n, n) / 10},
          np.ones((2, n), np.float32), jax.random.key(0))


def _saved(cache):
  return sorted(os.listdir(cache / 'traced')) if (cache / 'traced').exists() else []


def test_a_traced_program_is_read_back_and_keyed_by_what_it_is_made_of(cache):
  args = _args()
  want = jax.jit(_program(2.0))(*args)
  got = traced.lower(_program(2.0), args, 'scale 2').compile()(*args)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert len(_saved(cache)) == 1 and _saved(cache)[0].endswith(traced.SUFFIX)
  # A function that cannot be traced: the program comes from the file.
  again = traced.lower(_untraceable, args, 'scale 2').compile()(*args)
  jax.tree.map(np.testing.assert_array_equal, again, want)
  # Another description, or other shapes, is another program.
  with pytest.raises(AssertionError, match='traced again'):
    traced.lower(_untraceable, args, 'scale 3')
  with pytest.raises(AssertionError, match='traced again'):
    traced.lower(_untraceable, _args(4), 'scale 2')
  assert len(_saved(cache)) == 1


def test_a_broken_file_is_traced_again_and_rewritten(cache):
  args = _args()
  traced.lower(_program(2.0), args, 'x')
  [name] = _saved(cache)
  (cache / 'traced' / name).write_bytes(b'not an exported program')
  got = traced.lower(_program(2.0), args, 'x').compile()(*args)
  jax.tree.map(np.testing.assert_array_equal, got, jax.jit(_program(2.0))(*args))
  assert traced.lower(_untraceable, args, 'x') is not None  # the rewritten file reads


def test_a_program_with_a_host_callback_is_not_kept(cache):
  seen = []

  def fn(x):
    jax.debug.callback(lambda v: seen.append(float(v)), x.sum())
    return x * 2

  x = np.ones(3, np.float32)
  np.testing.assert_array_equal(traced.lower(fn, (x,), 'cb').compile()(x), 2 * x)
  assert seen == [3.0] and _saved(cache) == []


def test_without_a_compilation_cache_nothing_is_written(tmp_path):
  before = jax.config.jax_compilation_cache_dir
  jax.config.update('jax_compilation_cache_dir', None)
  try:
    assert traced.folder() is None
    args = _args()
    got = traced.lower(_program(1.0), args, 'x').compile()(*args)
    jax.tree.map(np.testing.assert_array_equal, got, jax.jit(_program(1.0))(*args))
  finally:
    jax.config.update('jax_compilation_cache_dir', before)
