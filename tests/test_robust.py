"""Nothing silently wrong, nothing lost (issue 15): atomic writes, bad values refused
before any work, damaged checkpoints skipped, failed saves stopping the run, resumes
with another config refused. The training runs are test_train's toy."""
import errno
import glob
import json
import logging
import os
import shutil
import subprocess

import numpy as np
import orbax.checkpoint as ocp
import pytest

from hyperlora_jax import checkpoint, cli, files, train
from hyperlora_jax.convert import core, lora_files
from hyperlora_jax.data import images
import test_train

pytestmark = pytest.mark.xdist_group('robust')  # one worker builds its fixtures


# ---------------------------------------------------------------- atomic writes


def test_atomic_folder_is_whole_or_absent(tmp_path):
  out = tmp_path / 'out'
  with pytest.raises(RuntimeError, match='killed'):
    with files.atomic_folder(str(out)) as tmp:
      (tmp_path / 'out.tmp-1').write_text('')  # Left by an earlier write (pid 1 lives).
      with open(os.path.join(tmp, 'a'), 'w') as f:
        f.write('half')
      raise RuntimeError('killed')
  assert not out.exists()
  with files.atomic_folder(str(out)) as tmp:
    for name in ('a', 'b'):
      with open(os.path.join(tmp, name), 'w') as f:
        f.write('new')
  assert sorted(os.listdir(out)) == ['a', 'b']
  assert sorted(p.name for p in tmp_path.iterdir()) == ['out', 'out.tmp-1']
  # The user's umask, not tempfile's or safetensors' 0600.
  assert oct(os.stat(out / 'a').st_mode & 0o777) == oct(0o666 & ~_umask())
  assert oct(os.stat(out).st_mode & 0o777) == oct(0o777 & ~_umask())
  # A folder holding what this write would not replace (a run, a home) is refused.
  (out / 'mine').write_text('keep')
  with pytest.raises(FileExistsError, match=r'would not replace \(b, mine\)'):
    with files.atomic_folder(str(out)) as tmp:
      open(os.path.join(tmp, 'a'), 'w').close()
  assert (out / 'mine').read_text() == 'keep' and (out / 'a').read_text() == 'new'


def _umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask


def test_lora_file_and_pipeline_folder_are_never_half_written(tmp_path, monkeypatch):
  lora = {'down_blocks_1/attentions_0/transformer_blocks_0/attn2/to_q':
          {'down': np.ones((2, 8), np.float32), 'up': np.ones((8, 2), np.float32)}}
  path = str(tmp_path / 'l.safetensors')
  lora_files.save_diffusers_lora(lora, path)
  assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~_umask())  # Not 0600.
  assert os.listdir(tmp_path) == ['l.safetensors']
  # kill -9 in the middle of a pipeline export: the tokenizer copy never happens.
  from hyperlora_jax.convert import pipeline  # pylint: disable=import-outside-toplevel
  def killed(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(pipeline.shutil, 'copytree', killed)
  unet = {'conv_in': {'kernel': np.ones((3, 3, 3, 4), np.float32)}}
  with pytest.raises(KeyboardInterrupt):
    pipeline.save_pipeline(str(tmp_path / 'pipeline'), unet, {}, unet, {}, str(tmp_path), {})
  assert sorted(os.listdir(tmp_path)) == ['l.safetensors']


# ---------------------------------------------------------------- bad values


@pytest.mark.parametrize('key,value', [
    ('batch_size', 0), ('checkpoint_every', 0), ('log_every', 0), ('keep_checkpoints', 0),
    ('num_steps', -1), ('eval_every', -1)])
def test_bad_train_values_are_refused_before_any_work(tmp_path, key, value):
  with pytest.raises(ValueError, match=rf'train.{key}={value}: must be >= [01]'):
    test_train.run(test_train.toy_config(**{key: value}), tmp_path / 'work')
  assert not (tmp_path / 'work').exists()


def test_truncated_safetensors_names_the_file(tmp_path):
  path = tmp_path / 'lora.safetensors'
  lora_files.save_kohya_lora({'mid_block/attentions_0/transformer_blocks_0/attn1/to_q': {
      'down': np.ones((2, 8), np.float32), 'up': np.ones((8, 2), np.float32)}}, str(path))
  data = path.read_bytes()
  path.write_bytes(data[:len(data) - 20])
  with pytest.raises(core.CheckpointError, match=f'{path} is not a readable safetensors'):
    lora_files.load_lora_file(str(path))


def test_misfit_lora_fails_naming_the_layer_not_in_a_dot_general():
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from hyperlora_jax import lora as lora_lib  # pylint: disable=import-outside-toplevel

  class Attention(nn.Module):
    @nn.compact
    def __call__(self, x, lora=None):
      return lora_lib.Dense(4, name='to_q')(x, lora)

  net = Attention()
  params = net.init(jax.random.key(0), jnp.ones((1, 3)))
  misfit = {'to_q': {'down': jnp.ones((2, 5)), 'up': jnp.ones((4, 2))}}
  with pytest.raises(ValueError, match='LoRA at to_q is 5 -> 4, the layer 3 -> 4'):
    net.apply(params, jnp.ones((1, 3)), misfit)


# ---------------------------------------------------------------- checkpoints


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """An uninterrupted toy run of 8 steps, saved at 4 and 8."""
  workdir = tmp_path_factory.mktemp('finished')
  state, _ = test_train.run(test_train.toy_config(num_steps=8, checkpoint_every=4), workdir)
  return workdir, test_train.flat_params(state)


def _damage(step_dir, kind):
  arrays = glob.glob(str(step_dir / 'state' / '**' / 'd' / '*'), recursive=True)
  if kind == 'truncated':
    for f in arrays:
      os.truncate(f, os.path.getsize(f) // 2)
  elif kind == 'zeroed':
    for f in arrays:
      with open(f, 'r+b') as fh:
        fh.write(b'\0' * os.path.getsize(f))
  elif kind == 'no _METADATA':
    os.remove(step_dir / 'state' / '_METADATA')
  elif kind == 'no data file':
    os.remove(step_dir / 'data' / 'process_0-of-1.json')
  else:  # An empty step folder.
    shutil.rmtree(step_dir)
    step_dir.mkdir()


@pytest.mark.parametrize('kind', ['truncated', 'zeroed', 'no _METADATA', 'no data file',
                                  'empty'])
def test_damaged_newest_checkpoint_falls_back(finished, tmp_path, kind, caplog):
  workdir, expected = finished
  shutil.copytree(workdir / 'checkpoints', tmp_path / 'checkpoints')
  _damage(tmp_path / 'checkpoints' / '8', kind)
  # Sampling and export read the newest intact step, and say which one they skipped.
  step, _ = checkpoint.restore_config(tmp_path / 'checkpoints')
  assert step == 4
  assert 'Checkpoint step 8 in' in caplog.text and 'damaged, skipped' in caplog.text
  # Training resumes from step 4 and saves step 8 again: the uninterrupted run's params.
  state, _ = test_train.run(test_train.toy_config(num_steps=8, checkpoint_every=4),
                            tmp_path)
  np.testing.assert_allclose(test_train.flat_params(state), expected, atol=1e-6)
  assert os.listdir(tmp_path / 'checkpoints_damaged') == ['8']  # Kept, out of the way.


def test_no_intact_checkpoint_fails_naming_each(finished, tmp_path):
  workdir, _ = finished
  shutil.copytree(workdir / 'checkpoints', tmp_path / 'checkpoints')
  _damage(tmp_path / 'checkpoints' / '8', 'empty')
  _damage(tmp_path / 'checkpoints' / '4', 'no data file')
  with pytest.raises(checkpoint.DamagedCheckpoints,
                     match=r'(?s)No intact checkpoint.*step 8: .*step 4: .*'
                     r'process_0-of-1.json is missing'):
    test_train.run(test_train.toy_config(num_steps=8, checkpoint_every=4), tmp_path)


class _StepCount(test_train.ToyData):
  """The toy's data, counting the batches taken; at `trigger` it calls `hook`."""
  taken, hook, trigger = 0, None, None

  def __next__(self):
    _StepCount.taken += 1
    if self.step == _StepCount.trigger:
      _StepCount.hook()
    return super().__next__()


def _run_counting(config, workdir, hook, trigger):
  _StepCount.taken, _StepCount.hook, _StepCount.trigger = 0, hook, trigger
  return train.train_and_evaluate(config, str(workdir), build_objective=test_train.build_toy,
                                  create_dataset=_StepCount)


def test_full_disk_stops_the_run_at_the_first_failed_save(tmp_path, monkeypatch):
  async def no_space(self, x, directory):
    raise OSError(errno.ENOSPC, 'No space left on device', str(directory))

  def fill_disk():
    monkeypatch.setattr(ocp.JsonCheckpointHandler, '_save_fn', no_space)

  config = test_train.toy_config(num_steps=40, checkpoint_every=2)
  with pytest.raises(checkpoint.SaveError, match=(
      f'Saving checkpoint step 4 in {tmp_path}/checkpoints failed: OSError: .*No space '
      'left on device.* Training stopped; the newest saved checkpoint is step 2.')):
    _run_counting(config, tmp_path, fill_disk, 3)
  assert _StepCount.taken <= 6  # Noticed at once, not at the end of the run.


def test_read_only_workdir_stops_the_run_at_once(tmp_path):
  folder = tmp_path / 'checkpoints'

  def read_only():
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root ignores modes; an immutable folder refuses it too.
      subprocess.run(['chattr', '+i', str(folder)], check=True)

  config = test_train.toy_config(num_steps=40, checkpoint_every=2)
  try:
    with pytest.raises(checkpoint.SaveError, match=(
        f'Saving checkpoint step (2|4) in {folder} failed: PermissionError')):
      _run_counting(config, tmp_path, read_only, 2)
  finally:
    if os.geteuid() == 0:
      subprocess.run(['chattr', '-i', str(folder)], check=False)
    folder.chmod(0o755)
  assert _StepCount.taken <= 6


def test_resume_with_another_config_is_refused(finished, tmp_path):
  workdir, _ = finished
  shutil.copytree(workdir, tmp_path / 'run')
  config_json = (tmp_path / 'run' / 'config.json').read_text()
  changed = test_train.toy_config(num_steps=12, checkpoint_every=4)
  changed.optim.lr = 1e-3
  with pytest.raises(ValueError, match=(
      r'(?s)differs from the one checkpoint step 8 in .* was trained with:\n'
      r'  optim.lr: 0.03 -> 0.001\n  train.num_steps: 8 -> 12\n.*'
      r'--allow_config_changes')):
    test_train.run(changed, tmp_path / 'run')
  assert (tmp_path / 'run' / 'config.json').read_text() == config_json  # Not rewritten.
  # The flag allows the keys that are safe to change, and those only.
  with pytest.raises(ValueError, match=r'(?s)optim.lr: 0.03 -> 0.001\n[^\n]*allows only'):
    train.train_and_evaluate(changed, str(tmp_path / 'run'),
                             build_objective=test_train.build_toy,
                             create_dataset=test_train.ToyData, allow_config_changes=True)
  longer = test_train.toy_config(num_steps=12, checkpoint_every=4)
  state = train.train_and_evaluate(longer, str(tmp_path / 'run'),
                                   build_objective=test_train.build_toy,
                                   create_dataset=test_train.ToyData,
                                   allow_config_changes=True)
  assert int(state['step']) == 12
  assert json.loads((tmp_path / 'run' / 'config.json').read_text())['train'][
      'num_steps'] == 12


# ---------------------------------------------------------------- the tools


def test_no_tool_writes_into_a_run(tmp_path):
  run = tmp_path / 'run'
  (run / 'checkpoints').mkdir(parents=True)
  (run / 'config.json').write_text('{}')
  for out in (run, run / 'config.json', run / 'checkpoints' / 'x'):
    with pytest.raises(ValueError, match='--out=.* (is a training run|inside the files)'):
      cli.check_output(str(out))
  cli.check_output(str(run / 'eval'))  # Its own folder beside the run's files.
  cli.check_output(str(tmp_path / 'elsewhere.safetensors'))


def test_library_noise_is_quiet_unless_verbosity_is_given(monkeypatch):
  from absl import flags  # pylint: disable=import-outside-toplevel
  record = lambda path, level: logging.LogRecord('absl', level, path, 1, 'x', (), None)
  monkeypatch.setattr(flags.FLAGS['verbosity'], 'present', 0)
  cli.quiet_libraries()
  absl = logging.getLogger('absl')
  assert not absl.filter(record('/x/orbax/checkpoint/manager.py', logging.INFO))
  assert not absl.filter(record('/x/tensorflow_datasets/core/builder.py', logging.WARNING))
  assert absl.filter(record('/x/orbax/checkpoint/manager.py', logging.ERROR))
  assert absl.filter(record('/x/hyperlora_jax/train.py', logging.INFO))  # Ours stay.
  assert os.environ['TRANSFORMERS_VERBOSITY'] == 'error'
  for f in list(absl.filters):  # As --verbosity leaves them.
    absl.removeFilter(f)


def test_grid_labels_that_share_a_beginning_differ():
  cells = np.zeros((1, 2, 16, 16, 3), np.uint8)
  labels = ['a figure on the left, pink background, wearing S*',
            'a figure on the right, pink background, wearing S*']
  picture = np.asarray(images.grid(cells, labels).convert('L'))
  top = picture.shape[0] - 100  # Above the row of 96-pixel cells and its padding.
  strips = [picture[:top, 2 + j * 98:2 + j * 98 + 96] for j in range(2)]
  assert (strips[0] < 128).any()  # Text was drawn.
  assert not np.array_equal(strips[0], strips[1])


def test_from_scratch_build_leaves_no_temporary_folder(tmp_path, monkeypatch):
  import tempfile  # pylint: disable=import-outside-toplevel
  from configs import tiny_test  # pylint: disable=import-outside-toplevel
  from hyperlora_jax.objectives import base  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  (tmp_path / 'tmp').mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path / 'tmp'))  # Ours alone.
  import jax  # pylint: disable=import-outside-toplevel
  for _ in range(2):
    _, (folder,) = base.load_base(tiny_test.get_config('unet_full'), jax.random.key(0))
  assert not os.listdir(tmp_path / 'tmp')
  assert folder.startswith(str(tmp_path / 'cache' / 'hyperlora_jax' / 'tokenizers'))
  assert len(os.listdir(os.path.dirname(folder))) == 1  # One folder per vocabulary.
