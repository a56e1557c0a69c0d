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

What can still go wrong is handled here, never silently:
  a damaged step (truncated or zeroed array files, a missing data-iterator file, an
    empty step folder): restoring falls back to the newest intact step, logging which
    step was skipped and why; training moves the damaged ones to <checkpoints>_damaged/
    so that it can save those steps again. Only when no step is intact does it fail.
  a failed save (full disk, read-only folder): the background error is picked up at
    the next step boundary (`check_saves`, which does not wait) and stops the run with
    one `SaveError` naming the step, the path and the cause.
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
      if not found:
        raise ValueError(f'The data-iterator state {path} is missing.')
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


class SaveError(RuntimeError):
  """A checkpoint could not be written: names the step, the folder and the cause."""


class DamagedCheckpoints(ValueError):
  """No step of a checkpoint folder can be restored: names each and why."""


def _save_error(manager, step, error) -> SaveError:
  newest = manager.latest_step()
  return SaveError(
      f'Saving checkpoint step {step} in {manager.directory} failed: '
      f'{type(error).__name__}: {error}. Training stopped; the newest saved checkpoint is '
      + (f'step {newest}.' if newest is not None else 'none.'))


def saved_config(manager: ocp.CheckpointManager) -> Optional[tuple]:
  """(step, config dict) of the newest intact checkpoint, or None without one."""
  restored = _restore_newest(manager, ocp.args.Composite(config=ocp.args.JsonRestore()))
  return restored and (restored[0], restored[1]['config'])


def check_saves(manager: ocp.CheckpointManager, step: Optional[int],
                wait: bool = False) -> None:
  """Raises SaveError if the async save of `step` (None: none pending) failed. Without
  `wait` it only looks at a save that has finished, so the step loop never waits."""
  if step is None or (not wait and manager.is_saving_in_progress()):
    return
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise _save_error(manager, step, e) from e


def save(manager: ocp.CheckpointManager, step: int, state, data_state,
         config_dict: dict) -> None:
  try:
    manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state),
        data=DataStateSave(data_state),
        config=ocp.args.JsonSave(config_dict)))
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise _save_error(manager, step, e) from e


def _damage(manager: ocp.CheckpointManager, step: int) -> Optional[str]:
  """Why step `step` cannot be restored, from its metadata (cheap: no array is
  read); None when it looks whole."""
  try:
    metadata = manager.item_metadata(step)
  except Exception as e:  # pylint: disable=broad-exception-caught
    return f'{type(e).__name__}: {e}'
  if metadata.get('state') is None:
    return 'the train state has no metadata (state/_METADATA)'
  step_dir = epath.Path(manager.directory) / str(step)
  if not (step_dir / 'config' / 'metadata').exists():
    return f'{step_dir / "config" / "metadata"} is missing'
  try:
    DataStateHandler().restore(step_dir / 'data')
  except (ValueError, OSError) as e:
    return str(e)
  return None


def _restore_newest(manager, restore_args, steps=None, set_aside=False):
  """(step, restored items) of the newest of `steps` (default: all) that restores,
  or None when there is no step. Damaged steps are logged and skipped (moved to
  <directory>_damaged/ with `set_aside`); DamagedCheckpoints when none restores."""
  steps = sorted(manager.all_steps() if steps is None else steps, reverse=True)
  skipped = []
  for step in steps:
    why = _damage(manager, step)
    if why is None:
      try:
        return step, manager.restore(step, args=restore_args)
      except Exception as e:  # pylint: disable=broad-exception-caught
        why = f'{type(e).__name__}: {e}'
    why = ' '.join(why.split())[:500]
    logging.warning('Checkpoint step %d in %s is damaged, skipped: %s', step,
                    manager.directory, why)
    skipped.append(f'step {step}: {why}')
  if skipped:
    raise DamagedCheckpoints(f'No intact checkpoint in {manager.directory}:\n  '
                             + '\n  '.join(skipped))
  return None


def _set_aside(manager: ocp.CheckpointManager, newer_than: int) -> None:
  """Moves the steps after `newer_than` (damaged) out of the way of new saves."""
  directory = epath.Path(manager.directory)
  aside = directory.parent / f'{directory.name}_damaged'
  newer = [s for s in manager.all_steps() if s > newer_than]
  for step in newer:
    aside.mkdir(parents=True, exist_ok=True)
    target = aside / str(step)
    while target.exists():
      target = aside / f'{target.name}_'
    (directory / str(step)).rename(target)
    logging.warning('Moved damaged checkpoint step %d to %s.', step, target)
  if newer:
    manager.reload()


def restore_latest(manager: ocp.CheckpointManager, abstract_state):
  """(step, state, data_state, config) of the newest intact checkpoint, or None.

  `abstract_state` holds jax.ShapeDtypeStructs with the shardings of the
  current mesh, so a checkpoint written on another device count is
  resharded while it is read. Damaged newer steps are set aside (training
  saves those steps again).
  """
  if not manager.all_steps():
    return None
  step, items = _restore_newest(manager, ocp.args.Composite(
      state=_restore_args(abstract_state), data=DataStateRestore(),
      config=ocp.args.JsonRestore()))
  if jax.process_index() == 0:
    _set_aside(manager, step)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('checkpoint set aside')
    manager.reload()
  return step, items['state'], items['data'], items['config']


def _restore_args(abstract, partial=False):
  return ocp.args.PyTreeRestore(
      abstract, ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=partial)


def _read_only(directory) -> ocp.CheckpointManager:
  directory = epath.Path(directory)
  if not directory.exists() or not make_manager(directory).all_steps():
    raise FileNotFoundError(f'No checkpoint in {directory}: the run has not '
                            'saved one yet.')
  return make_manager(directory)


def _steps(manager, step: Optional[int]):
  """[step] if given (it must exist), else every step, newest first."""
  steps = manager.all_steps()
  if step is None:
    return steps
  if step not in steps:
    raise FileNotFoundError(f'No checkpoint for step {step} in {manager.directory}; '
                            f'it has steps {sorted(steps)}.')
  return [step]


def restore_config(directory: epath.PathLike, step: Optional[int] = None):
  """(step, config dict) saved with checkpoint `step` (default: the newest intact)."""
  manager = _read_only(directory)
  try:
    step, items = _restore_newest(manager, ocp.args.Composite(
        config=ocp.args.JsonRestore()), _steps(manager, step))
  finally:
    manager.close()
  return step, items['config']


def newest_intact_step(directory: epath.PathLike) -> Optional[int]:
  """The newest step whose metadata is whole (no array is read), or None."""
  directory = epath.Path(directory)
  if not directory.exists():
    return None
  manager = make_manager(directory)
  try:
    return next((s for s in sorted(manager.all_steps(), reverse=True)
                 if _damage(manager, s) is None), None)
  finally:
    manager.close()


def restore_params(directory: epath.PathLike, abstract_params,
                   step: Optional[int] = None):
  """(step, params) of checkpoint `step` (default: the newest intact one) in
  `directory`: only the trained params (their EMA when the run kept one), never the
  optimizer state. `abstract_params` gives their shapes and shardings."""
  manager = _read_only(directory)
  try:
    steps = _steps(manager, step)
    intact = [s for s in steps if _damage(manager, s) is None]
    name = ('ema' if intact and 'ema' in manager.item_metadata(intact[0])['state']
            else 'params')
    step, restored = _restore_newest(manager, ocp.args.Composite(
        state=_restore_args({name: abstract_params}, partial=True)), steps)
  finally:
    manager.close()
  return step, restored['state'][name]


def param_shapes(directory: epath.PathLike, step: int) -> dict:
  """{'/'-joined path: shape} of the trained params saved at `step` in `directory`,
  read from the checkpoint's metadata (no array is read)."""
  manager = _read_only(directory)
  try:
    saved = manager.item_metadata(step)['state']['params']
  finally:
    manager.close()
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(saved)[0]}


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
