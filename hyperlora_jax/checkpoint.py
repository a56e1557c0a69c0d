"""Orbax checkpoints (train state, data-iterator state, config); preemption.

One checkpoint step holds three items:
  state   the train state pytree (sharded arrays; every host writes its shards)
  data    each host's data-iterator state, one JSON file per process, so a
          resumed run reads exactly the examples an uninterrupted one would
  config  the resolved config (JSON, written by process 0)

Saves are asynchronous: `save` returns once the arrays are copied off the
devices and the files are finished in the background. Orbax only publishes a
step directory once every item of every host is complete, so `latest_step`
is always a whole checkpoint, whatever point a run was killed at.
"""
import contextlib
import dataclasses
import json
import os
import signal
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils


class DataStateHandler(ocp.CheckpointHandler):
  """Writes this process's data-iterator state to process_<i>-of-<n>.json.

  Every process calls save/restore with its own state (unlike JsonSave,
  which only the primary host writes), since each host reads its own shard.
  """

  def save(self, directory: epath.Path, args: 'DataStateSave'):
    directory.mkdir(parents=True, exist_ok=True)
    _process_file(directory).write_text(json.dumps(args.state))

  def restore(self, directory: epath.Path,
              args: Optional['DataStateRestore'] = None) -> Any:
    del args
    path = _process_file(directory)
    if not path.exists():
      found = sorted(p.name for p in directory.glob('process_*.json'))
      raise ValueError(
          f'No data-iterator state {path.name} in {directory} (found '
          f'{found}): the checkpoint was written by a different number of '
          'processes, so the data position of this host is unknown.')
    return json.loads(path.read_text())

  def metadata(self, directory: epath.Path) -> None:
    del directory

  def structure(self, directory: epath.Path) -> None:
    del directory


def _process_file(directory: epath.Path) -> epath.Path:
  return directory / (f'process_{jax.process_index()}-of-'
                      f'{jax.process_count()}.json')


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: Any  # JSON-serializable.


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


def make_manager(directory: epath.PathLike, keep: Optional[int] = None
                 ) -> ocp.CheckpointManager:
  """An async manager keeping the newest `keep` steps; `keep` None opens the
  directory read-only (sampling, evaluation, export), creating nothing.

  The caller decides when to save (every N steps, at the end, on
  preemption); the manager does not filter steps by interval so a forced
  save at an odd step is never silently dropped.
  """
  directory = str(directory)
  if '://' not in directory:  # Orbax wants absolute paths; buckets already are.
    directory = os.path.abspath(directory)
  if keep is None:
    options = ocp.CheckpointManagerOptions(create=False, read_only=True)
  else:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=True,
        cleanup_tmp_directories=True)
  # PyTreeCheckpointHandler restores a part of the state (the params alone).
  return ocp.CheckpointManager(
      epath.Path(directory), options=options,
      item_handlers={'state': ocp.PyTreeCheckpointHandler(),
                     'data': DataStateHandler(),
                     'config': ocp.JsonCheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, state, data_state,
         config_dict: dict) -> None:
  manager.save(step, force=True, args=ocp.args.Composite(
      state=ocp.args.PyTreeSave(state),
      data=DataStateSave(data_state),
      config=ocp.args.JsonSave(config_dict)))


def restore_latest(manager: ocp.CheckpointManager, abstract_state):
  """(step, state, data_state) of the newest complete checkpoint, or None.

  `abstract_state` holds jax.ShapeDtypeStructs with the shardings of the
  current mesh, so a checkpoint written on another device count is
  resharded while it is read.
  """
  step = manager.latest_step()
  if step is None:
    return None
  restored = manager.restore(step, args=ocp.args.Composite(
      state=_restore_args(abstract_state), data=DataStateRestore()))
  return step, restored['state'], restored['data']


def _restore_args(abstract, partial=False):
  return ocp.args.PyTreeRestore(
      abstract, ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=partial)


def restore_params(directory: epath.PathLike, abstract_params,
                   step: Optional[int] = None):
  """(step, params) of checkpoint `step` (default: the newest) in `directory`:
  only the trained params (their EMA when the run kept one), never the
  optimizer state. `abstract_params` gives their shapes and shardings."""
  directory = epath.Path(directory)
  if not directory.exists():
    raise FileNotFoundError(f'No checkpoint in {directory}: the run has not '
                            'saved one yet.')
  manager = make_manager(directory)
  try:
    steps = manager.all_steps()
    if not steps:
      raise FileNotFoundError(f'No checkpoint in {directory}: the run has not '
                              'saved one yet.')
    step = max(steps) if step is None else step
    if step not in steps:
      raise FileNotFoundError(f'No checkpoint for step {step} in {directory}; '
                              f'it has steps {sorted(steps)}.')
    name = 'ema' if 'ema' in manager.item_metadata(step)['state'] else 'params'
    restored = manager.restore(step, args=ocp.args.Composite(
        state=_restore_args({name: abstract_params}, partial=True)))
  finally:
    manager.close()
  return step, restored['state'][name]


@contextlib.contextmanager
def preemption_watch():
  """Yields `preempted(step) -> bool`, True once the run should save and exit.

  Multi-process: JAX's preemption service (started by
  jax.distributed.initialize) catches SIGTERM on any host and makes every
  host agree on the same step, so all of them save that step together; it
  must be asked at every step. Single process: a SIGTERM handler sets a flag.
  """
  if jax.process_count() > 1:
    yield multihost_utils.reached_preemption_sync_point
    return
  received = []

  def on_sigterm(signum, frame):
    del frame
    logging.warning('Signal %d: saving a checkpoint and exiting.', signum)
    received.append(signum)

  previous = signal.signal(signal.SIGTERM, on_sigterm)
  try:
    yield lambda step: bool(received)
  finally:
    signal.signal(signal.SIGTERM, previous)
