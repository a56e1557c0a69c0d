"""Shared test set-up: CPU only, deterministic, and quiet."""
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
# Most of the suite's time is XLA compiling small programs once; its CPU backend's
# cheap passes halve that (tests/test_hypernet.py's 4 `heads` tests: 110 s -> 54 s) and
# no test times anything. Subprocesses inherit it; a caller's XLA_FLAGS wins.
os.environ.setdefault('XLA_FLAGS', '--xla_backend_optimization_level=0 '
                      '--xla_llvm_disable_expensive_passes=true')

# The suite is a program of its own: grain's worker processes (data.num_workers) read
# absl flags, which an absl app would have parsed.
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.FLAGS.mark_as_parsed()
