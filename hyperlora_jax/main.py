r"""Trains a config: the same command on a laptop, a GPU node or every TPU host.

  python -m hyperlora_jax.main --config=configs/tiny_test.py --workdir=/tmp/r \
      --config.train.batch_size=8

A config with ``stages`` runs them one by one (`stages.run`; --stages: some of them,
--side_by_side: several at once in processes of their own); any other config is one
run of the training loop, handed its parts here: the objective builder, the data
pipeline and the evaluation hook (`train_and_evaluate`). A run of a per-subject
objective (``lora_bank``: pre-optimization, one LoRA per identity of the train split)
is fitted by `preoptimize` instead and writes a target-weights dataset to --workdir.

Overrides are checked against the config file: an unknown key or a value of
the wrong type stops the run before anything is built. Multi-host runs add
--distributed; jax.distributed.initialize then finds the coordinator from the
cluster (TPU pod, SLURM, ...) or from --coordinator_address/--num_processes/
--process_id (or the JAX_COORDINATOR_ADDRESS and JAX_LOCAL_DEVICE_IDS
environment variables).
"""
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from hyperlora_jax import checkpoint
from hyperlora_jax import cli
from hyperlora_jax import defaults
from hyperlora_jax import evaluate
from hyperlora_jax import objectives
from hyperlora_jax import preoptimize
from hyperlora_jax import side_by_side
from hyperlora_jax import stages
from hyperlora_jax import train
from hyperlora_jax.data import pipeline

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (configs/*.py[:arg]).',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Checkpoints, TensorBoard logs and the resolved config; '
    'a local or gs:// path. A run resumes from the checkpoints found here.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() (multi-host).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0; default: detected '
    'from the cluster environment.')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Process count; default: detected.')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'This process; default: detected.')
_CACHE = cli.define_compilation_cache_flag()
_ALLOW_CHANGES = flags.DEFINE_bool(
    'allow_config_changes', False, 'Resume although the config differs from the '
    "checkpoint's in keys that are safe to change (train.SAFE_TO_CHANGE: num_steps, "
    'log/eval/checkpoint intervals, eval, data_dir); other changes are refused but the '
    'layout (mesh, data reading: train.LAYOUT), which may always change.')
_STAGES = flags.DEFINE_list(
    'stages', [], 'A multi-stage config: train only these stages (in its stage_order) and '
    'skip the report; the stages they use must be finished. Launches with disjoint lists '
    'can run side by side (one per GPU, or several small ones on one); a launch without '
    'the list then reports.')
_SIDE_BY_SIDE = flags.DEFINE_integer(
    'side_by_side', 0, 'A multi-stage config: train up to N stages at once, each in a '
    'process of its own, on its own 1/N of the host\'s GPUs when there are at least N '
    '(else sharing them: on one H200 no faster, BENCHMARKS.md), then report (with '
    '--stages: those stages, no report). 0: one by one, in this process.',
    lower_bound=0)
flags.mark_flags_as_required(['config', 'workdir'])


def parse_flags(argv):
  """absl's parsing, plus a one-line error for an unknown config key."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    # config_flags raises these when an override names a missing key.
    overrides = [a for a in argv[1:] if a.startswith('--config.')]
    while e.args and isinstance(e.args[0], Exception):  # Wrapped KeyError.
      e = e.args[0]
    sys.stderr.write(f'FATAL Flags parsing error: unknown config key in '
                     f'{" ".join(overrides)}: {e.args[0] if e.args else e}\n')
    sys.exit(1)


def train_one(config, workdir: str):
  """One training run with the project's objectives, data pipeline and eval hook (a
  per-subject objective's: `preoptimize.run`). Raises train.Preempted after a preemption
  save."""
  defaults.check_keys(config)  # Before filling: the config as the user wrote it.
  config = defaults.fill(config)
  if objectives.spec(config.objective).per_subject:
    return preoptimize.run(config, workdir)
  return train.train_and_evaluate(
      config, workdir, build_objective=objectives.build,
      create_dataset=pipeline.for_training, evaluate_fn=evaluate.evaluate_fn,
      allow_config_changes=_ALLOW_CHANGES.value)


def train_and_evaluate(config, workdir: str, only=()):
  """Trains a config: its stages one by one (``only``: those, `stages.run`), or one
  run. Returns the final train state of a single run (None for stages)."""
  if 'stages' in config:
    return stages.run(config, workdir, train_one, only)
  if only:
    raise ValueError(f'--stages={",".join(only)}: this config has no stages.')
  return train_one(config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.use_compilation_cache(_CACHE.value)
  if _SIDE_BY_SIDE.value:  # A scheduler only: its children take the devices.
    if _DISTRIBUTED.value or 'stages' not in _CONFIG.value:
      raise app.UsageError('--side_by_side schedules the stages of a multi-stage config, '
                           'on one host.')
    side_by_side.run(_CONFIG.value, _WORKDIR.value, sys.argv, _SIDE_BY_SIDE.value,
                     _STAGES.value)
    return
  if _DISTRIBUTED.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                               _PROCESS_ID.value)
  logging.info('Process %d of %d, %d local / %d global devices (%s).',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.default_backend())
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value, _STAGES.value)
  except train.Preempted as e:  # Not done: no success status, and say so.
    logging.warning('%s', e)
    print(e, file=sys.stderr)
    sys.exit(cli.PREEMPTED_EXIT)


def run():
  """The console script (`hyperlora-train`)."""
  cli.run(__name__, cli.main_with_errors(
      main, errors=(checkpoint.SaveError, side_by_side.StageFailed)),
          flags_parser=parse_flags)


if __name__ == '__main__':
  run()
