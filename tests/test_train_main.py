"""main.py: overrides fail before any work; the tiny config learns end to end."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from hyperlora_jax import cli
import test_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Subprocesses import the package from this checkout, and what else the
# environment already adds.
PYTHONPATH = os.pathsep.join(
    filter(None, [ROOT, os.environ.get('PYTHONPATH')]))
CONFIG = """
import ml_collections
from hyperlora_jax import defaults


def get_config():
  config = ml_collections.ConfigDict()
  config.data = dict(name='synthetic')
  return defaults.fill(config)
"""


def main(tmp_path, *overrides):
  config = tmp_path / 'config.py'
  config.write_text(CONFIG)
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=PYTHONPATH)
  return subprocess.run(
      [sys.executable, '-m', 'hyperlora_jax.main', f'--config={config}',
       f'--workdir={tmp_path / "work"}', *overrides], env=env, cwd=ROOT,
      capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize('override,message', [
    ('--config.train.bogus=1', 'unknown config key in --config.train.'
     "grad_accum_steps=8 --config.train.bogus=1: 'bogus'"),
    ('--config.trian.batch_size=3', 'Did you mean "train"'),
    ('--config.train.batch_size=abc', "invalid literal for int() with base "
     "10: 'abc'"),
    ('--config.train.nan_policy=maybe', "train.nan_policy must be 'stop' or "
     "'skip', not 'maybe'"),
    ('--config.train.batch_size=12', 'train.batch_size=12 must be a multiple'
     ' of devices (1) x grad_accum_steps (8)'),
])
def test_bad_overrides_fail_fast(tmp_path, override, message):
  result = main(tmp_path, '--config.train.grad_accum_steps=8', override)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr[-2000:]
  assert not (tmp_path / 'work').exists()  # Nothing was built or written.


@pytest.mark.slow
def test_tiny_config_learns_through_main(tmp_path):
  """configs/tiny_test.py end to end: real data, models and objective."""
  workdir = tmp_path / 'work'
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=PYTHONPATH)
  result = subprocess.run(
      [sys.executable, '-m', 'hyperlora_jax.main',
       '--config=configs/tiny_test.py:unet_full', f'--workdir={workdir}',
       f'--config.data.data_dir={tmp_path / "tfds"}',
       '--config.train.num_steps=12', '--config.train.log_every=1',
       '--config.train.checkpoint_every=100', '--config.optim.lr=3e-3',
       '--config.model.prompt_dropout=0.0'], env=env, cwd=ROOT,
      capture_output=True, text=True, timeout=400, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  (events,) = (workdir / 'tensorboard').glob('events.out.tfevents.*')
  losses = [v for _, v in sorted(test_train.tensorboard_events(events)['loss'])]
  assert len(losses) == 12
  assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:2]), losses
  config = json.loads((workdir / 'config.json').read_text())
  assert config['objective'] == 'unet_full'
  assert config['train']['num_steps'] == 12
  assert (workdir / 'checkpoints' / '12' / 'data' /
          'process_0-of-1.json').exists()


def test_every_tool_sets_our_gpu_xla_flags_unless_the_user_sets_them():
  """cli.run (every CLI's entry) adds cli.GPU_XLA_FLAGS to XLA_FLAGS before JAX starts
  its backend (the imports of main start none: set_default_xla_flags would refuse)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=PYTHONPATH,
             XLA_FLAGS='--xla_dump_to=/tmp/d --xla_gpu_graph_min_graph_size=5')
  code = ('import os, sys; from hyperlora_jax import cli, main; '
          'sys.argv[1:] = ["--config=configs/tiny_test.py", "--workdir=unused"]; '
          'cli.run("hyperlora_jax.main", lambda argv: print(os.environ["XLA_FLAGS"]))')
  result = subprocess.run([sys.executable, '-c', code], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=True)
  assert result.stdout.split() == [
      '--xla_dump_to=/tmp/d', '--xla_gpu_graph_min_graph_size=5',
      '--xla_gpu_enable_triton_gemm=false'], result.stdout
  mine = '--xla_gpu_enable_triton_gemm=true'
  assert cli.default_xla_flags(mine) == mine
  jax.numpy.zeros(1).block_until_ready()  # this process' backend is running
  with pytest.raises(RuntimeError, match='after JAX started its backend'):
    cli.set_default_xla_flags()


def test_preempted_run_exits_143_saying_it_will_resume(monkeypatch, capsys):
  from hyperlora_jax import main as main_lib, train  # pylint: disable=import-outside-toplevel

  def preempted(config, workdir, only=()):
    raise train.Preempted(7, '/runs/x')
  monkeypatch.setattr(main_lib, 'train_and_evaluate', preempted)
  monkeypatch.setattr(main_lib.jax.config, 'update', lambda *args: None)
  with pytest.raises(SystemExit) as e:
    main_lib.main(['main'])
  assert e.value.code == 143  # As a SIGTERM'd process: schedulers requeue, none succeeds.
  assert 'saved step 7 in /runs/x; run the same command again to resume' in (
      capsys.readouterr().err)
