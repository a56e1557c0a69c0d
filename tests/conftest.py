"""Shared test set-up: CPU only, deterministic, and quiet; one XLA cache for the session;
the slowest work units scheduled first."""
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

from hyperlora_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

# Most of the suite's time is XLA compiling small programs once; its CPU backend's
# cheapest settings more than halve that (tests/test_hypernet.py's 4 `heads` tests:
# 110 s -> 54 s with the first two flags) and no test times anything. Subprocesses
# inherit it; a caller's XLA_FLAGS wins.
os.environ.setdefault('XLA_FLAGS', cli.FAST_COMPILE_XLA_FLAGS)

# The suite is a program of its own: grain's worker processes (data.num_workers) read
# absl flags, which an absl app would have parsed.
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope='session', autouse=True)
def compilation_cache(tmp_path_factory):
  """A persistent XLA cache for the whole session, shared by both pytest-xdist workers
  and every subprocess (the CLIs and benchmarks read JAX_COMPILATION_CACHE_DIR).

  Objectives, restores, stages, report rows and CLIs each build their own closures, so
  the same tiny program is traced again under a new function, in this process, in the
  other worker or in a subprocess; its compile (~30 s on a busy 2-core CPU) is then
  read from the cache. A new session starts empty, as CI does. No size limit: with one,
  JAX lists and reads the whole folder on every write (thousands of entries here).
  """
  base = tmp_path_factory.getbasetemp()
  # Under xdist each worker's basetemp is <session>/popen-gwN: share <session>.
  root = base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base
  folder = str(root / 'jax_cache')
  settings = {'jax_compilation_cache_dir': folder,
              'jax_persistent_cache_min_compile_time_secs': 0}
  for name, value in settings.items():
    jax.config.update(name, value)
    os.environ[name.upper()] = str(value)
  return folder


def pytest_collection_modifyitems(items):
  """Work units with a test marked slow (a whole xdist_group when one of its tests is)
  go first: the two workers then end together on the many short tests, instead of one
  of them starting a two-minute test last (pytest.ini: --no-loadscope-reorder keeps this
  order). Every worker sorts its collection alike, as xdist requires."""
  def group(item):
    mark = item.get_closest_marker('xdist_group')
    return (mark.args[0] if mark.args else mark.kwargs['name']) if mark else item.nodeid

  slow = {group(item) for item in items if item.get_closest_marker('slow')}
  items.sort(key=lambda item: group(item) not in slow)  # stable: collection order kept
