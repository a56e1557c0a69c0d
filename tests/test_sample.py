"""Sampling from a run trained by the real loop: restore, determinism,
per-sample LoRAs, lora_scale, a diffusers base folder, and the CLI.

The helpers here (shared folders, tiny configs, a run without training) are
shared by test_evaluate.py and test_export.py.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import tiny_test
from hyperlora_jax import checkpoint, defaults, evaluate, objectives, runs, sample, train
from hyperlora_jax.convert import lora_files, pipeline
from hyperlora_jax.data import images, synthetic
from hyperlora_jax.data import pipeline as data_pipeline

pytestmark = pytest.mark.xdist_group('sample')  # one worker builds its fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHONPATH = os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH')]))


def shared_dirs(factory) -> dict:
  """Session-wide folders: this worker's synthetic data and the session's persistent
  XLA cache (tests/conftest.py's, which the CLIs read too).

  Building a tiny objective compiles for ~30 s on a busy 2-core CPU; every
  later build (restore_run, the CLIs) reads the cache instead.
  """
  return {'data': str(factory.getbasetemp() / 'tfds'),
          'cache': jax.config.jax_compilation_cache_dir}


def tiny_config(dirs, objective='hyperlora', **overrides):
  config = tiny_test.get_config(objective)
  config.data.data_dir = dirs['data']
  config.train.update(num_steps=2, checkpoint_every=2)
  config.eval = dict(num_examples=4, num_steps=2)
  for key, value in overrides.items():  # 'hypernet.param.kind' -> value
    *parents, leaf = key.split('.')
    section = config
    for p in parents:
      section = section[p]
    section[leaf] = value
  return defaults.fill(config)


def make_run(workdir, dirs, objective='hyperlora', gamma=0.5, **overrides):
  """A workdir as training leaves it (config.json, one checkpoint), without
  training: the initial params, with gamma (hyperlora) or the LoRA's up
  factors (unet_lora) moved off zero so the LoRA changes the output."""
  config = tiny_config(dirs, objective, **overrides)
  init_rng, _ = jax.random.split(jax.random.key(config.seed))
  params = objectives.build(config, init_rng).trainable
  if objective == 'hyperlora':
    params = dict(params, gamma=np.float32(gamma))
  elif objective == 'unet_lora':
    rng = np.random.RandomState(0)
    params = {p: dict(f, up=rng.randn(*f['up'].shape).astype(np.float32) * 0.3)
              for p, f in params.items()}
  config_dict = json.loads(config.to_json_best_effort())
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(config_dict, f)
  manager = checkpoint.make_manager(os.path.join(workdir, 'checkpoints'), 1)
  checkpoint.save(manager, 1, {'step': np.int32(1), 'params': params}, {},
                  config_dict)
  manager.wait_until_finished()
  manager.close()
  return str(workdir)


def run_cli(module, dirs, *args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=PYTHONPATH,
             JAX_COMPILATION_CACHE_DIR=dirs['cache'],
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  return subprocess.run([sys.executable, '-m', f'hyperlora_jax.{module}', *args],
                        env=env, cwd=ROOT, capture_output=True, text=True,
                        timeout=300, check=False)


def loss_and_grads(objective, batch, seed: int):
  """(loss, grads of the trainable params) of one objective step, jitted. The frozen
  params and the batch are arguments: closed over, they were constants of the program,
  which for the SDXL basis config made a 1 GB HLO text that the compilation cache
  hashed and stored (the test's compile 62 s -> 22 s)."""
  fn = jax.value_and_grad(lambda tr, fr, b: objective.loss_fn(tr, fr, b,
                                                               jax.random.key(seed))[0])
  return jax.jit(fn)(objective.trainable, objective.frozen, batch)


def examples(n, resolution=32):
  """(contexts, scene prompts) of the first n held-out synthetic examples."""
  g = synthetic.generate(n, 'test', resolution=resolution)
  return g['context'].astype(np.float32) / 127.5 - 1, list(g['prompt_scene'])


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A hyperlora run trained by train_and_evaluate, the objective it built,
  its final state and what its eval hook returned."""
  dirs = shared_dirs(tmp_path_factory)
  workdir = str(tmp_path_factory.mktemp('sample_run'))
  built, evals = [], []

  def build(config, rng):
    built.append(objectives.build(config, rng))
    return built[-1]

  def evaluate_fn(*args):
    evals.append(evaluate.evaluate_fn(*args))
    return evals[-1]

  state = train.train_and_evaluate(tiny_config(dirs), workdir, build_objective=build,
                                   create_dataset=data_pipeline.for_training,
                                   evaluate_fn=evaluate_fn)
  restored = runs.restore(workdir)
  return dict(dirs=dirs, workdir=workdir, built=built[0], state=state,
              evals=evals, run=restored, config=restored.config,
              objective=restored.objective, params=restored.params,
              boosted=restored._replace(params=dict(restored.params, gamma=np.float32(0.5))))


def test_restore_run_is_the_trained_run(run):
  trained = jax.device_get(run['state']['params'])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(run['params']), trained)
  assert float(trained['gamma']) != 0.0  # It did train.
  jax.tree.map(np.testing.assert_array_equal, run['objective'].frozen['unet'],
               jax.device_get(run['built'].frozen['unet']))
  # The default eval hook ran at the end, on the test split.
  (scalars,) = run['evals']
  assert set(scalars) == {f'eval/hyperlora/{k}' for k in ('color_acc', 'pattern_acc',
                                                           'background_acc', 'position_acc')}
  assert all(0.0 <= v <= 1.0 for v in scalars.values())


def test_restore_run_checkpoints(run, tmp_path):
  with pytest.raises(FileNotFoundError, match='No training run at .*no checkpoints/'):
    runs.restore(str(tmp_path / 'missing'))
  config_json = open(os.path.join(run['workdir'], 'config.json')).read()
  (tmp_path / 'config.json').write_text(config_json)
  (tmp_path / 'checkpoints').mkdir()
  with pytest.raises(FileNotFoundError, match='No checkpoint in'):
    runs.restore(str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r'step 3 .* steps \[2\]'):
    runs.restore(run['workdir'], step=3)
  # A run that keeps an EMA is evaluated with it, at the step asked for.
  params = jax.device_get(run['params'])
  ema = jax.tree.map(lambda x: x + 1, params)
  manager = checkpoint.make_manager(tmp_path / 'checkpoints', 3)
  for step in (1, 2):
    checkpoint.save(manager, step, {'step': np.int32(step), 'params': params,
                                    'ema': jax.tree.map(lambda x: x * step, ema)},
                    {}, json.loads(config_json))
  manager.wait_until_finished()
  manager.close()
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(runs.restore(str(tmp_path), step=1).params), ema)
  # The config is the one saved with the checkpoint: an overwritten config.json (an
  # export aimed at it, a rerun with another shape) does not lose the run.
  (tmp_path / 'config.json').write_text('{"objective": "unet_full"}')
  assert runs.restore(str(tmp_path)).config.objective == 'hyperlora'


def _generate(run, context, prompts, **kwargs):
  kwargs = dict(dict(num_steps=2, guidance=3.0), **kwargs)
  return np.asarray(sample.generate(run['boosted'], context, prompts, **kwargs))


# Batches of 4 share their compiled sampler with the training run's eval hook.
def test_deterministic_for_a_seed(run):
  context, prompts = examples(4)
  a = _generate(run, context, prompts, seed=0)
  assert a.shape == (4, 32, 32, 3) and a.min() >= -1 and a.max() <= 1
  np.testing.assert_array_equal(a, _generate(run, context, prompts, seed=0))
  assert np.abs(a - _generate(run, context, prompts, seed=1)).mean() > 0.05


def test_each_image_gets_its_own_lora(run):
  context, prompts = examples(4)
  batch = _generate(run, context, prompts, seed=4)
  for i in range(4):
    alone = _generate(run, context[i:i + 1], prompts[i:i + 1], seed=4,
                      image_ids=[i])
    np.testing.assert_allclose(alone[0], batch[i], atol=1e-4)
  # Another context for image 0 (same prompt and noise) changes image 0 only.
  swapped = _generate(run, context[[1, 1, 2, 3]], prompts, seed=4)
  assert np.abs(swapped[0] - batch[0]).max() > 1e-2
  np.testing.assert_allclose(swapped[1:], batch[1:], atol=1e-4)


def test_lora_scale(run):
  context, prompts = examples(4)
  base = _generate(run, context, prompts, use_lora=False)
  np.testing.assert_array_equal(_generate(run, context, prompts, lora_scale=0.0),
                                base)
  assert np.abs(_generate(run, context, prompts) - base).max() > 1e-2


def test_diffusers_folder_is_the_base_model(run, tmp_path):
  models, frozen = run['objective'].models, run['objective'].frozen
  folder = str(tmp_path / 'pipe')
  pipeline.save_pipeline(folder, frozen['unet'], models.unet_config, frozen['text'],
                         models.text_config, models.tokenizer_folder,
                         models.scheduler_config)
  base = runs.from_pretrained(folder, 32)
  _, prompts = examples(4)
  ours = sample.generate(base, None, prompts, num_steps=2)
  np.testing.assert_allclose(
      ours, _generate(run, None, prompts, use_lora=False), atol=1e-5)
  with pytest.raises(ValueError, match='sets no sample_size: give --resolution'):
    runs.from_pretrained(folder)


def test_cli(run, tmp_path):
  context, prompts = examples(2)
  folder = tmp_path / 'contexts'
  folder.mkdir()
  for i, c in enumerate(images.to_uint8(context)):
    Image.fromarray(c).save(folder / f'item{i}.png')
  out = tmp_path / 'out'
  result = run_cli('sample', run['dirs'], f'--workdir={run["workdir"]}',
                   f'--context={folder}', f'--prompt={prompts[0]}',
                   f'--prompt={prompts[1]}', '--num_steps=2', '--seed=3',
                   '--save_lora', f'--out={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  files = sorted(os.listdir(out))
  assert files == ['grid.png', 'item0_0_' + sample._slug(prompts[0]) + '.png',
                   'item0_1_' + sample._slug(prompts[1]) + '.png',
                   'item1_0_' + sample._slug(prompts[0]) + '.png',
                   'item1_1_' + sample._slug(prompts[1]) + '.png',
                   'lora_item0.safetensors', 'lora_item1.safetensors']
  # The PNGs are generate()'s images: pair (context 1, prompt 0) is image 2.
  expected = sample.generate(run['run'], context[[1]], prompts[:1], num_steps=2, seed=3,
                             image_ids=[2])
  png = np.asarray(Image.open(out / files[3]), np.int32)
  assert np.abs(png - images.to_uint8(expected)[0]).max() <= 1
  lora = lora_files.load_lora_file(str(out / 'lora_item1.safetensors'))
  assert set(lora) == {t.path for t in run['objective'].models.targets}


@pytest.mark.parametrize('args,message', [
    (['--workdir=/nonexistent/run'], 'Error: No training run at /nonexistent/run'),
    (['--workdir=RUN', '--context=BAD'], 'Error: Cannot read the image'),
    (['--workdir=RUN', '--context=/nonexistent.png'],
     'Error: No such context image or folder: /nonexistent.png'),
    (['--pretrained=RUN', '--context=BAD'], 'Error: A --pretrained base model has no LoRA'),
    (['--workdir=RUN', '--pretrained=RUN'], 'Error: Give exactly one of --workdir'),
])
def test_cli_errors(run, tmp_path, args, message):
  bad = tmp_path / 'bad.png'
  bad.write_text('not an image')
  args = [a.replace('RUN', run['workdir']).replace('BAD', str(bad)) for a in args]
  result = run_cli('sample', run['dirs'], *args, '--prompt=x', f'--out={tmp_path}')
  assert result.returncode == 1
  assert message in result.stderr.splitlines()[-1], result.stderr[-2000:]


@pytest.mark.parametrize('tool,args,message', [
    ('sample', ['--num_steps=-3', '--prompt=x', '--out=OUT'],
     'Error: --num_steps=-3: must be >= 1.'),
    ('sample', ['--num_steps=0', '--prompt=x', '--out=OUT'],
     'Error: --num_steps=0: must be >= 1.'),
    ('evaluate', ['--num_steps=-2', '--out=OUT'], 'Error: --num_steps=-2: must be >= 1.'),
    ('evaluate', ['--num_examples=-1', '--out=OUT'],
     'Error: --num_examples=-1: must be >= 0.'),
    ('export', ['--format=merged-unet', '--out=RUN'], "is a training run's folder"),
    ('export', ['--format=kohya', '--out=RUN/config.json'], 'inside the files of'),
])
def test_cli_refuses_bad_values_and_outputs_in_a_run(run, tmp_path, tool, args, message):
  args = [a.replace('RUN', run['workdir']).replace('OUT', str(tmp_path / 'o'))
          for a in args]
  config_json = open(os.path.join(run['workdir'], 'config.json')).read()
  result = run_cli(tool, run['dirs'], f'--workdir={run["workdir"]}', *args)
  assert result.returncode == 1
  assert message in result.stderr.splitlines()[-1], result.stderr[-2000:]
  assert not (tmp_path / 'o').exists()
  assert open(os.path.join(run['workdir'], 'config.json')).read() == config_json


def test_cli_takes_a_relative_workdir(run, tmp_path):
  """The README's quickstart uses relative paths: sample from a relative --workdir,
  quietly (no Orbax/TFDS INFO lines)."""
  context, prompts = examples(1)
  Image.fromarray(images.to_uint8(context)[0]).save(tmp_path / 'item.png')
  relative = os.path.relpath(run['workdir'], ROOT)
  result = run_cli('sample', run['dirs'], f'--workdir={relative}',
                   f'--context={os.path.relpath(tmp_path / "item.png", ROOT)}',
                   f'--prompt={prompts[0]}', '--num_steps=2',
                   f'--out={os.path.relpath(tmp_path / "out", ROOT)}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'grid.png' in os.listdir(tmp_path / 'out')
  assert 'orbax' not in result.stderr.lower(), result.stderr[-3000:]
