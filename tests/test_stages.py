"""The quickstart's path at the smallest size: base model -> pipeline folder -> single
LoRA and hypernetwork on it -> report with table, grid and an exported LoRA."""
import importlib
import json
import logging
import os
import signal

import ml_collections
import pytest

from configs import quickstart, tiny_test
from hyperlora_jax import defaults, evaluate, main, objectives, runs, stages, train
from hyperlora_jax.convert import lora_files, pipeline
from hyperlora_jax.data import pipeline as data_pipeline
from hyperlora_jax.data import synthetic


def _tiny_stages():
  c = ml_collections.ConfigDict()
  c.stages = ml_collections.ConfigDict()
  for name, objective in (('base', 'unet_full'), ('single_lora', 'unet_lora'),
                          ('hyperlora_heads', 'hyperlora')):
    stage = tiny_test.get_config(objective)
    stage.train.update(num_steps=2, checkpoint_every=2)
    stage.data.prompt = 'full' if objective == 'unet_full' else 'scene'
    if objective == 'unet_full':
      stage.model.scheduler = dict(prediction_type='v_prediction')
    else:
      stage.model.pretrained = 'stage:base'
    stage.eval = dict(num_examples=0)
    c.stages[name] = stage
  c.stage_order = ('base', 'single_lora', 'hyperlora_heads')
  c.report = dict(num_examples=2, num_steps=2, guidance=2.0, seeds=(0,))
  return c


class _Preempting:
  """The training data of a stage whose process gets SIGTERM at its first batch."""

  def __init__(self, *args):
    self.it = data_pipeline.for_training(*args)

  def __next__(self):
    os.kill(os.getpid(), signal.SIGTERM)
    return next(self.it)

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)


def _train(config, workdir, data=data_pipeline.for_training, **kwargs):
  return train.train_and_evaluate(defaults.fill(config), workdir,
                                  build_objective=objectives.build, create_dataset=data,
                                  evaluate_fn=evaluate.evaluate_fn, **kwargs)


def _record(path):
  with open(path) as f:
    return json.load(f)


@pytest.mark.slow
def test_stages_run_end_to_end_and_are_reused(tmp_path, monkeypatch, caplog):
  caplog.set_level(logging.INFO)
  monkeypatch.chdir(tmp_path)  # a relative workdir, as in the README's command
  # Pre-empted in the base stage: it saves, and the run stops before anything uses it.
  with pytest.raises(train.Preempted, match='saved step 1'):
    stages.run(_tiny_stages(), 'run', lambda c, d: _train(c, d, _Preempting))
  assert os.listdir('run') == ['base'] and not os.path.exists('run/base/pipeline')
  main.train_and_evaluate(_tiny_stages(), 'run')  # Resumes the base, then the rest.
  workdir = str(tmp_path / 'run')
  assert _record(os.path.join(workdir, 'base', 'pipeline_export.json'))['step'] == 2
  assert 'Stage 3/3' in caplog.text and 'ETA of the remaining stages' in caplog.text
  # The base model is an ordinary diffusers folder the later stages loaded.
  base = pipeline.load_pipeline(os.path.join(workdir, 'base', 'pipeline'))
  assert base.unet_config['in_channels'] == 3
  # Its prediction type travels in its scheduler folder: the hypernetwork trained (and is
  # sampled) with the base's v-prediction though its own config says epsilon.
  heads = runs.restore(os.path.join(workdir, 'hyperlora_heads'))
  assert heads.config.model.scheduler.prediction_type == 'epsilon'
  assert heads.objective.models.schedule.prediction_type == 'v_prediction'
  report = os.path.join(workdir, 'report')
  with open(os.path.join(report, 'results.md')) as f:
    table = f.read()
  for row in ('no LoRA (S* prompt)', 'single_lora', 'hyperlora_heads', 'oracle (full prompt)'):
    assert row in table
  assert os.path.getsize(os.path.join(report, 'grid.png')) > 0
  lora = lora_files.load_lora_file(os.path.join(report, 'predicted_lora.safetensors'))
  assert lora and all('attn2' in path for path in lora)
  # A second call finds every stage finished and only reports again.
  mtime = os.path.getmtime(os.path.join(workdir, 'base', 'pipeline', 'unet', 'config.json'))
  main.train_and_evaluate(_tiny_stages(), 'run')
  assert os.path.getmtime(
      os.path.join(workdir, 'base', 'pipeline', 'unet', 'config.json')) == mtime
  # The base trains on: its export is redone, and the stages trained on the old one are
  # trained again (the old runs kept beside them).
  longer = _tiny_stages()
  longer.stages.base.train.num_steps = 3
  stages.run(longer, 'run', lambda c, d: _train(c, d, allow_config_changes=True))
  base = _record(os.path.join(workdir, 'base', 'pipeline_export.json'))
  assert base['step'] == 3
  for name in ('single_lora', 'hyperlora_heads'):
    assert _record(os.path.join(workdir, name, 'base_export.json')) == base
    assert os.path.isdir(os.path.join(workdir, f'{name}.stale-0', 'checkpoints'))


def test_stages_train_only_the_named_ones_without_a_report(tmp_path):
  run = str(tmp_path / 'run')
  with pytest.raises(ValueError, match='No stage nope in this config; its stages: base'):
    main.train_and_evaluate(_tiny_stages(), run, only=('nope',))
  with pytest.raises(ValueError, match='--stages=base: this config has no stages'):
    main.train_and_evaluate(tiny_test.get_config('unet_lora'), run, only=('base',))
  with pytest.raises(ValueError, match='single_lora uses stage base, which is not finished'):
    main.train_and_evaluate(_tiny_stages(), run, only=('single_lora',))
  main.train_and_evaluate(_tiny_stages(), run, only=('base',))
  assert os.listdir(run) == ['base']  # Exported, nothing else trained, no report.
  assert _record(os.path.join(run, 'base', 'pipeline_export.json'))['step'] == 2
  # A launch of another stage reuses the finished base as it is.
  mtime = os.path.getmtime(os.path.join(run, 'base', 'pipeline_export.json'))
  main.train_and_evaluate(_tiny_stages(), run, only=('hyperlora_heads',))
  assert sorted(os.listdir(run)) == ['base', 'hyperlora_heads']
  assert os.path.getmtime(os.path.join(run, 'base', 'pipeline_export.json')) == mtime
  assert stages._finished(os.path.join(run, 'hyperlora_heads'), 2)


def test_a_misspelled_key_fails_before_any_stage_trains(tmp_path):
  """ConfigDict.update adds an unknown key silently (a sweep row's typo would train the
  row unchanged): stages.run refuses it, naming the key, before the first stage."""
  c = _tiny_stages()
  c.stages.hyperlora_heads.update(dict(hypernet=dict(decoder=dict(pol='attention'))))
  with pytest.raises(ValueError, match=r'Stage hyperlora_heads: Unknown config keys .*'
                     r'hypernet\.decoder\.pol \(did you mean hypernet\.decoder\.pool\?\)'):
    main.train_and_evaluate(c, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()
  single = tiny_test.get_config('unet_lora')
  single.train.update(dict(num_stepz=3))
  with pytest.raises(ValueError, match=r'train\.num_stepz \(did you mean train\.num_steps\?\)'):
    main.train_one(single, str(tmp_path / 'one'))


def _config_args():
  """(config module, get_config argument) for every size or part the configs name."""
  sized = ('quickstart', 'quickstart_basis', 'quickstart_hdb', 'quickstart_lorarar', 'table1')
  return ([(m, size) for m in sized for size in importlib.import_module(f'configs.{m}').SIZES]
          + [('sd15_basis', 'stages'), ('sdxl_basis', 'stages'), ('sd15_recontext', 'heads'),
             ('sd15_recontext', 'transformer'), ('sd15_hyperdreambooth', 'hypernet'),
             ('sd15_hyperdreambooth', 'targets'), ('sdxl_lorarar', 'merger'),
             ('sdxl_lorarar', 'content')])


@pytest.mark.parametrize('module,arg', _config_args())
def test_every_config_names_only_known_keys(module, arg):
  c = importlib.import_module(f'configs.{module}').get_config(arg)
  for stage in (c.stages.values() if 'stages' in c else [c]):
    defaults.check_keys(stage)


@pytest.mark.parametrize('size', ['cpu', 'gpu'])
def test_quickstart_config_is_complete(size):
  c = quickstart.get_config(size)
  assert c.stage_order[0] == 'base' and c.stages.base.objective == 'unet_full'
  for name in c.stage_order[1:]:
    assert c.stages[name].model.pretrained == 'stage:base'
    assert c.stages[name].data.prompt == 'scene'
    # Every stage trains and is scored on the same images as the base model.
    for key in ('resolution', 'item_frac', 'num_train', 'seed'):
      assert c.stages[name].data[key] == c.stages.base.data[key], key
  if size == 'gpu':  # The published GPU results' data: the default item size.
    assert c.stages.base.data.item_frac == synthetic.ITEM_FRAC
    assert c.stages.base.data.resolution == 64


def test_quickstart_size_with_some_of_its_seeds():
  """'gpu:seeds=2' is one launch of the gpu table: the stages of seed 2, named as in the
  full size (so its report merges with the other seeds'), and a report of that seed."""
  whole, part = quickstart.get_config('gpu'), quickstart.get_config('gpu:seeds=2')
  assert part.stage_order == ('base',) + tuple(n for n in whole.stage_order
                                               if n.endswith('_seed2'))
  for name in part.stage_order:
    assert part.stages[name].to_dict() == whole.stages[name].to_dict(), name
  assert tuple(part.report.seeds) == (2,)
  assert part.report.runs['hyperlora_heads'] == ['hyperlora_heads_seed2']
  # Launches sharing a workdir keep their own reports.
  assert stages.report_dir(part.report, 'w') == os.path.join('w', 'report_seeds_2')
  assert stages.report_dir(whole.report, 'w') == os.path.join('w', 'report')
  for bad, message in (('gpu:steps=2', "give NAME or NAME:seeds=A,B"),
                       ('gpu:seeds=', 'give NAME'), ('big', "No size 'big'")):
    with pytest.raises(ValueError, match=message):
      quickstart.get_config(bad)
