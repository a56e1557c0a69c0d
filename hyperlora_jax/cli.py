"""What the command-line tools share: one-line errors, flag checks, quiet libraries."""
import logging
import os
import sys

from absl import app
from absl import flags

# Exit status of a run stopped by a preemption notice, as of a process ended by SIGTERM
# (128 + 15): schedulers that requeue on it do, and nothing takes it for success.
PREEMPTED_EXIT = 143
# Libraries whose INFO lines (and some warnings) a user cannot act on: TFDS preparing
# a locally generated dataset, Orbax at every save, grain, optax, JAX looking for a TPU.
_NOISY = ('/orbax/', '/tensorflow_datasets/', '/grain/', '/etils/', '/optax/')
_NOISY_LOGGERS = ('jax._src.xla_bridge', 'orbax', 'tensorflow_datasets', 'grain', 'absl')


# XLA's CPU compile at its cheapest, for programs whose speed nobody measures (the test
# suite, the benchmarks' --tiny runs): no LLVM optimization and none of its expensive
# passes, and XLA's loop emitters instead of its fusion emitters. A tiny UNet train
# step compiled in 2.8 s -> 1.4 s with the last flag, at the same run time; the LoRA.rar
# quickstart's smoke run took 125 s -> 91 s.
FAST_COMPILE_XLA_FLAGS = ('--xla_backend_optimization_level=0 '
                          '--xla_llvm_disable_expensive_passes=true '
                          '--xla_cpu_use_fusion_emitters=false')


# Our GPU defaults, which every tool started through `run` sets (a user's own setting of
# a flag in XLA_FLAGS wins). Triton's GEMM autotuning nearly doubles the compile of the
# SD1.5 LoRA step on an H100 (81 s -> 45 s without it) for no speed: cuBLAS wins those
# GEMMs (BENCHMARKS.md; its XLA-flag section has what else was tried).
GPU_XLA_FLAGS = {'xla_gpu_enable_triton_gemm': 'false'}


def default_xla_flags(xla_flags: str) -> str:
  """``xla_flags`` (an XLA_FLAGS value) plus each of GPU_XLA_FLAGS it does not set."""
  added = [f'--{name}={value}' for name, value in GPU_XLA_FLAGS.items()
           if f'--{name}' not in xla_flags]  # also the bare '--name' form (true)
  return ' '.join([xla_flags.strip()] + added).strip()


def set_default_xla_flags(extra: str = '') -> None:
  """XLA_FLAGS = default_xla_flags(XLA_FLAGS + extra), before JAX starts its backend,
  which reads XLA_FLAGS once (a later change would be silently ignored)."""
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    raise RuntimeError('set_default_xla_flags after JAX started its backend: its '
                       'XLA_FLAGS would be ignored')
  os.environ['XLA_FLAGS'] = default_xla_flags(f'{os.environ.get("XLA_FLAGS", "")} {extra}')


class _DropNoise(logging.Filter):
  def filter(self, record):
    return record.levelno >= logging.ERROR or not any(
        n in record.pathname for n in _NOISY)


def quiet_libraries() -> None:
  """Hides the libraries' routine log lines unless the command line gives --verbosity
  (absl's flag; any value brings them back). Our own progress lines stay."""
  if 'verbosity' in flags.FLAGS and flags.FLAGS['verbosity'].present:
    return
  os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')  # "PyTorch was not found"
  if 'transformers' in sys.modules:
    sys.modules['transformers'].logging.set_verbosity_error()
  logging.getLogger('jax._src.xla_bridge').setLevel(logging.ERROR)
  noise = _DropNoise()
  for name in _NOISY_LOGGERS:  # Orbax and TFDS log through absl's logger.
    logger = logging.getLogger(name)
    if noise not in logger.filters:
      logger.addFilter(noise)


# JAX's persistent compilation cache (main's and sample's --compilation_cache): JAX's own
# JAX_COMPILATION_CACHE_DIR when set (as the Colab notebook reads it), which the flag's
# default would otherwise override.
COMPILATION_CACHE = (os.environ.get('JAX_COMPILATION_CACHE_DIR') or
                     os.path.expanduser('~/.cache/hyperlora_jax/xla'))


def define_compilation_cache_flag():
  return flags.DEFINE_string(
      'compilation_cache', COMPILATION_CACHE,
      'JAX persistent compilation cache: a rerun, a resumed run or another stage of the '
      'same shapes loads its compiled programs instead of compiling again. Default: '
      '$JAX_COMPILATION_CACHE_DIR if set, else ~/.cache/hyperlora_jax/xla. Empty: off.')


def use_compilation_cache(folder: str) -> None:
  if folder:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update('jax_compilation_cache_dir', folder)


def check_flags(*, positive=(), non_negative=()) -> None:
  """Stops on an integer flag out of range, naming it and what is expected."""
  f = flags.FLAGS
  for name in positive:
    if f[name].value is not None and f[name].value < 1:
      raise ValueError(f'--{name}={f[name].value}: must be >= 1.')
  for name in non_negative:
    if f[name].value is not None and f[name].value < 0:
      raise ValueError(f'--{name}={f[name].value}: must be >= 0.')


def _is_run(folder: str) -> bool:
  return os.path.exists(os.path.join(folder, 'config.json')) and os.path.isdir(
      os.path.join(folder, 'checkpoints'))


def check_output(out: str, flag: str = 'out') -> None:
  """Refuses an output path that is a training run's folder or inside its own files
  (config.json, checkpoints/, tensorboard/): no tool writes into a run."""
  path = os.path.abspath(out)
  if _is_run(path):
    raise ValueError(f'--{flag}={out} is a training run\'s folder: give a new file or '
                     'folder for the output.')
  folder = path
  while os.path.dirname(folder) != folder:
    parent = os.path.dirname(folder)
    if _is_run(parent) and os.path.basename(folder) in (
        'config.json', 'checkpoints', 'tensorboard'):
      raise ValueError(f'--{flag}={out} is inside the files of the training run '
                       f'{parent}: give a path outside its config.json, checkpoints/ '
                       'and tensorboard/.')
    folder = parent


def main_with_errors(main, errors=()):
  """Runs a CLI main quietly (`quiet_libraries`); a user error (missing file, bad
  value, damaged checkpoint, and the given `errors` types) ends the program with its
  one-line message instead of a traceback (which --verbosity shows)."""
  errors = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            ValueError) + tuple(errors)

  def wrapped(argv):
    quiet_libraries()
    try:
      main(argv)
    except errors as e:
      if flags.FLAGS['verbosity'].present:  # --verbosity: the whole traceback.
        raise
      sys.exit(f'Error: {e}')
  return wrapped


def run(module_name: str, main, **kwargs) -> None:
  """`app.run(main)` for a tool started as `python -m <module>` or as its console
  script, with our GPU XLA flags: either way --help shows the module's docstring and
  its own flags (absl shows those of __main__, which for a console script is the
  pip-generated stub)."""
  set_default_xla_flags()
  module = sys.modules[module_name]
  stub = sys.modules['__main__']
  if stub is not module:
    stub.__doc__ = module.__doc__
    for flag in flags.FLAGS.get_key_flags_for_module(module_name):
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  app.run(main, **kwargs)
