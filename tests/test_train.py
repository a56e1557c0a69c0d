"""The training loop on a toy objective with the Objective interface.

The toy is a frozen random projection followed by a trainable MLP regressing
a fixed function; its data is a pure function of the example index, and the
dataset logs the ids it yields so tests can check which examples a run saw.

Runs that need other device or process counts re-run this file as a script
(XLA flags and jax.distributed must be set before JAX starts).
"""
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboardX.proto import event_pb2

from hyperlora_jax import defaults, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Subprocesses import the package from this checkout, and what else the
# environment already adds.
PYTHONPATH = os.pathsep.join(
    filter(None, [ROOT, os.environ.get('PYTHONPATH')]))
DIM, HIDDEN = 6, 32


class Objective(NamedTuple):
  trainable: Any
  frozen: Any
  loss_fn: Callable
  prepare: Callable


def toy_config(**train_overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = dict(noise=0.0, nan_at_step=-1)
  defaults.fill(config)
  config.train.update(num_steps=8, batch_size=8, log_every=2, eval_every=1,
                      checkpoint_every=4, compute_dtype='float32')
  config.train.update(train_overrides)
  config.optim.update(lr=3e-2, warmup_steps=2)
  # Small threshold so the toy's kernels really are split over 'fsdp'.
  config.mesh.shard_min_size = 64
  return config


def build_toy(config, rng):
  # numpy init: a jitted random op per array costs compile time in tests.
  r = np.random.default_rng(np.asarray(jax.random.key_data(rng)))
  normal = lambda *shape: r.normal(size=shape).astype(np.float32)
  frozen = {'proj': normal(DIM, HIDDEN) / np.sqrt(DIM)}
  trainable = {'mlp': {'kernel': normal(HIDDEN, HIDDEN) * 0.2,
                       'bias': np.zeros((HIDDEN,), np.float32)},
               'out': {'kernel': normal(HIDDEN, 1) * 0.2}}
  noise = config.data.noise

  def loss_fn(params, frozen, batch, rng):
    h = jnp.tanh(batch['x'] @ frozen['proj'])
    h = jnp.tanh(h @ params['mlp']['kernel'] + params['mlp']['bias'])
    pred = (h @ params['out']['kernel'])[:, 0]
    # Per-example noise from the step rng: the same values on any mesh only
    # if the loop hands the same key to every layout.
    pred = pred + noise * jax.random.normal(rng, pred.shape)
    loss = jnp.mean((pred - batch['y']) ** 2)
    return loss, {'pred_mean': jnp.mean(pred)}

  def prepare(batch):  # Host side: drops what is not an array, like text.
    return {k: v for k, v in batch.items() if k != 'name'}

  return Objective(trainable, frozen, loss_fn, prepare)


def example(i):
  r = np.random.default_rng(i)
  x = r.normal(size=DIM).astype(np.float32)
  return x, np.float32(np.tanh(x[0] - x[1] + 0.5 * x[2]))


class ToyData:
  """Per-host batches of examples step*B + [p*b, (p+1)*b); state = step."""
  seen = []  # ids yielded in this process, across runs; tests clear it.
  # > 0: this process gets SIGTERM before that step; < 0: process 1 alone, before step
  # -sigterm_at. Not in the config: the resume that follows has the same config.
  sigterm_at = 0

  def __init__(self, config, split, process_index, process_count):
    del split
    self.data = config.data
    self.batch = config.train.batch_size
    self.local = self.batch // process_count
    self.offset = process_index * self.local
    self.step = 0

  def __iter__(self):
    return self

  def __next__(self):
    ids = self.step * self.batch + self.offset + np.arange(self.local)
    x, y = map(np.stack, zip(*map(example, ids)))
    self.step += 1
    if self.step == self.data.nan_at_step:
      x[0, 0] = np.nan
    at = ToyData.sigterm_at
    if at == self.step:
      os.kill(os.getpid(), signal.SIGTERM)  # A preemption notice mid-run.
    elif at < 0 and jax.process_index() == 1 and self.step >= -at:
      if self.step == -at:  # Host 1 alone is preempted.
        os.kill(os.getpid(), signal.SIGTERM)
      # The hosts agree on a save step in the background: slow steps give
      # that protocol time before the run ends.
      time.sleep(0.5)
    ToyData.seen.extend(ids.tolist())
    return {'x': x, 'y': y, 'id': ids, 'name': np.array(['s'] * self.local)}

  def get_state(self):
    return {'step': self.step}

  def set_state(self, state):
    self.step = state['step']


EVAL_BATCH = dict(zip(('x', 'y'), map(np.stack, zip(
    *map(example, range(10**6, 10**6 + 64))))))


def run(config, workdir):
  """Trains the toy; returns (final state, eval loss after every step)."""
  curve = {}

  def evaluate(config, objective, params, step, writer):
    loss, _ = jax.jit(objective.loss_fn)(params, objective.frozen,
                                         EVAL_BATCH, jax.random.key(0))
    curve[step] = float(loss)
    if step == config.train.num_steps:  # A sample grid, as a real eval would.
      writer.write_images(step, {'samples': np.zeros((4, 8, 8, 3))})
    return {'eval_loss': float(loss)}

  state = train.train_and_evaluate(config, str(workdir),
                                   build_objective=build_toy,
                                   create_dataset=ToyData,
                                   evaluate_fn=evaluate)
  return state, np.array([curve[k] for k in sorted(curve)])


def flat_params(state):
  return np.concatenate([np.ravel(jax.device_get(x))
                         for x in jax.tree.leaves(state['params'])])


def run_script(*args, devices=1, env=None, wait=True):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=PYTHONPATH,
             **(env or {}),
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  cmd = [sys.executable, os.path.abspath(__file__), *map(str, args)]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  if not wait:
    return proc
  out, _ = proc.communicate(timeout=240)
  assert proc.returncode == 0, out[-4000:]
  return out


def load(path):
  with open(path) as f:
    return {k: np.array(v) for k, v in json.load(f).items()}


def test_loss_goes_down_with_ema_and_accumulation(tmp_path):
  config = toy_config(num_steps=30, ema_decay=0.9, grad_accum_steps=2,
                      checkpoint_every=100)
  state, curve = run(config, tmp_path)
  assert curve[-1] < 0.3 * curve[0], curve
  assert int(state['step']) == 30
  assert set(state) == {'step', 'params', 'opt_state', 'ema'}
  assert json.loads((tmp_path / 'config.json').read_text())['train'][
      'num_steps'] == 30
  (events,) = (tmp_path / 'tensorboard').glob('events.out.tfevents.*')
  assert {'loss', 'lr', 'grad_norm', 'steps_per_sec', 'images_per_sec',
          'eval_loss', 'samples'} <= set(tensorboard_events(events))


def tensorboard_events(path):
  """{tag: [(step, scalar or None)]} of an event file, read without TF."""
  data, events, i = path.read_bytes(), {}, 0
  while i < len(data):  # TFRecords: length, its crc, payload, its crc.
    (n,) = struct.unpack('<Q', data[i:i + 8])
    event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
    for v in event.summary.value:
      value = v.simple_value if v.HasField('simple_value') else None
      events.setdefault(v.tag, []).append((event.step, value))
    i += 12 + n + 4
  return events


def test_grad_accumulation_and_remat_match_plain_step(tmp_path):
  one, curve_one = run(toy_config(num_steps=3), tmp_path / 'one')
  two, curve_two = run(toy_config(num_steps=3, grad_accum_steps=4,
                                  remat='dots_saveable'), tmp_path / 'two')
  np.testing.assert_allclose(curve_one, curve_two, rtol=1e-5)
  np.testing.assert_allclose(flat_params(one), flat_params(two), atol=1e-6)


def test_nan_stop_names_step_and_keeps_checkpoints_clean(tmp_path):
  config = toy_config(checkpoint_every=2)
  config.data.nan_at_step = 5
  with pytest.raises(FloatingPointError, match='step 5'):
    run(config, tmp_path)
  steps = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir()
                 if p.name.isdigit())
  assert steps == [2, 4]


def test_nan_skip_drops_only_that_update(tmp_path):
  config = toy_config(nan_policy='skip', checkpoint_every=2)
  config.data.nan_at_step = 5
  state, curve = run(config, tmp_path)
  assert int(state['step']) == 8 and np.isfinite(flat_params(state)).all()
  assert curve[4] == curve[3]  # Step 5 changed nothing.
  assert curve[5] != curve[4]


def test_sigterm_then_resume_on_8_devices_equals_uninterrupted(tmp_path):
  """Kill at step k on 1 device, resume on 8 (data=2 x fsdp=4) to step 2k."""
  config = toy_config(num_steps=8, checkpoint_every=4)
  config.data.noise = 0.1
  ToyData.seen = []
  full, full_curve = run(config, tmp_path / 'full')
  full_seen = ToyData.seen

  ToyData.seen, ToyData.sigterm_at = [], 4
  with pytest.raises(train.Preempted, match='saved step 4 .* run the same command again') as e:
    run(config, tmp_path / 'resumed')
  ToyData.sigterm_at = 0
  stopped = e.value.state
  first_seen = ToyData.seen
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
  # The uninterrupted run saved step 4 asynchronously while its next steps
  # donated the state's buffers: the file still holds step 4's params.
  saved = ocp.StandardCheckpointer().restore(
      tmp_path / 'full' / 'checkpoints' / '4' / 'state')
  np.testing.assert_array_equal(flat_params(saved), flat_params(stopped))

  # One 8-device process: a fresh run (the curve must match 1 device) and
  # the resume of the 1-device checkpoint onto the new mesh.
  out = tmp_path / 'out8.json'
  run_script('resume8', tmp_path / 'fresh8', tmp_path / 'resumed', out,
             devices=8)
  r = load(out)
  np.testing.assert_allclose(r['fresh_curve'], full_curve, rtol=1e-5)
  np.testing.assert_allclose(r['fresh_params'], flat_params(full), atol=1e-6)
  assert r['sharded_leaves'] > 0  # fsdp really split something.
  np.testing.assert_allclose(r['resumed_params'], flat_params(full),
                             atol=1e-6)
  np.testing.assert_allclose(r['resumed_curve'], full_curve[4:], rtol=1e-5)
  assert first_seen + r['resumed_seen'].tolist() == full_seen


def test_real_pipeline_preempted_and_resumed(tmp_path):
  """The grain pipeline's state goes through the checkpoint and back."""
  from hyperlora_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = toy_config(num_steps=6, checkpoint_every=100)
  config.data = defaults.get_config().data
  config.data.update(data_dir=str(tmp_path / 'tfds'), num_train=24,
                     num_test=4, resolution=8, num_threads=1, prefetch=1)
  seen = []

  def build_colors(config, rng):
    """Predicts the target's mean color from the context's (text dropped)."""
    del config
    trainable = {'kernel': jax.random.normal(rng, (3, 3)) * 0.1}

    def loss_fn(params, frozen, batch, rng):
      del frozen, rng
      x = batch['context'].mean((1, 2))
      y = batch['target'].mean((1, 2))
      return jnp.mean((x @ params['kernel'] - y) ** 2), {}

    def prepare(batch):
      seen.extend(batch['index'].tolist())
      return {k: batch[k] for k in ('context', 'target')}

    return Objective(trainable, {}, loss_fn, prepare)

  preempt_at = []

  def preempt(config, objective, params, step, writer):
    del config, objective, params, writer
    if step in preempt_at:
      os.kill(os.getpid(), signal.SIGTERM)

  def run_colors(workdir):
    return train.train_and_evaluate(config, str(workdir),
                                    build_objective=build_colors,
                                    create_dataset=pipeline.for_training,
                                    evaluate_fn=preempt)

  full = run_colors(tmp_path / 'full')
  full_seen, seen[:] = list(seen), []
  preempt_at.append(3)
  with pytest.raises(train.Preempted) as e:
    run_colors(tmp_path / 'resumed')
  assert int(e.value.state['step']) == e.value.step == 4  # Noticed at the next step.
  resumed = run_colors(tmp_path / 'resumed')
  assert int(resumed['step']) == 6
  np.testing.assert_allclose(flat_params(resumed), flat_params(full),
                             atol=1e-6)
  assert seen == full_seen and len(set(full_seen)) == 24  # One epoch.


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_preempted_resumed_equal_one(tmp_path):
  """Two jax.distributed processes; host 1 alone gets SIGTERM at step 2.

  Both must save the same step and exit cleanly; restarted, they finish the
  run with the params of a one-process run, each host reading its half.
  """
  def launch(sigterm_at):
    port = free_port()
    procs = [run_script('dist', tmp_path / 'work', tmp_path / f'out{i}.json',
                        i, port, sigterm_at, wait=False) for i in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outs):
      assert p.returncode == 0, out[-4000:]
    return [load(tmp_path / f'out{i}.json') for i in range(2)]

  stopped = launch(-2)
  finished = launch(0)
  single, curve = run(toy_config(), tmp_path / 'single')
  step = int(stopped[0]['step'])
  assert 2 < step < 8 and int(stopped[1]['step']) == step
  for r in finished:
    assert int(r['step']) == 8
    np.testing.assert_allclose(r['params'], flat_params(single), atol=1e-6)
    np.testing.assert_allclose(r['curve'], curve[step:], rtol=1e-5)
  seen = [a['seen'].tolist() + b['seen'].tolist()
          for a, b in zip(stopped, finished)]
  assert sorted(seen[0] + seen[1]) == list(range(8 * 8))
  assert set(seen[0]).isdisjoint(seen[1])
  for s in (step, 8):
    step_dir = tmp_path / 'work' / 'checkpoints' / str(s)
    assert sorted(p.name for p in (step_dir / 'data').glob('*.json')) == [
        'process_0-of-2.json', 'process_1-of-2.json']
  # Only process 0 writes TensorBoard files: one per launch.
  assert len(list((tmp_path / 'work' / 'tensorboard').iterdir())) == 2


def _script(argv):
  """Entry point of the subprocess runs (see the tests above)."""
  mode = argv[0]
  if mode == 'dist':
    workdir, out, pid, port, sigterm_at = argv[1:]
    jax.distributed.initialize(f'127.0.0.1:{port}', 2, int(pid))
    config = toy_config()
    ToyData.sigterm_at = int(sigterm_at)
    try:
      state, curve = run(config, workdir)
    except train.Preempted as e:  # Every host stops at the same saved step.
      state, curve = e.state, []
    result = dict(curve=curve, params=flat_params(state), seen=ToyData.seen,
                  step=int(state['step']))
  else:  # resume8
    fresh_dir, resume_dir, out = argv[1:]
    config = toy_config(num_steps=8, checkpoint_every=4)
    config.data.noise = 0.1
    config.mesh.update(data=2, fsdp=4)
    fresh, fresh_curve = run(config, fresh_dir)
    sharded = sum(not s.sharding.is_fully_replicated
                  for s in jax.tree.leaves(fresh['params']))
    ToyData.seen = []
    resumed, resumed_curve = run(config, resume_dir)
    result = dict(fresh_curve=fresh_curve, fresh_params=flat_params(fresh),
                  sharded_leaves=sharded, resumed_curve=resumed_curve,
                  resumed_params=flat_params(resumed),
                  resumed_seen=ToyData.seen)
  with open(out, 'w') as f:
    json.dump({k: np.asarray(v).tolist() for k, v in result.items()}, f)


if __name__ == '__main__':
  # tensorboardX imports torch when it can: seconds per process, unused here.
  sys.modules['torch'] = None
  _script(sys.argv[1:])
