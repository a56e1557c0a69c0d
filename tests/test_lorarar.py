"""LoRA.rar end to end on tiny from-scratch models (configs/quickstart_lorarar.py:smoke,
through the stages): a LoRA zoo fitted through the lora_bank path (content LoRAs per
item, style LoRAs per style, written as standard LoRA files), the lorarar objective
trained on its pairs, restored, sampled, used by the merge CLI on the zoo's own files,
and the report's table and grid."""
import json
import os

import numpy as np
import pytest

from configs import quickstart_lorarar
from hyperlora_jax import main, merge, merging, preoptimize, runs, sample
from hyperlora_jax.convert import lora_files
from hyperlora_jax.data import synthetic
from hyperlora_jax.objectives import lorarar
from tests.test_sample import run_cli, shared_dirs

# One worker builds its fixtures; slow: scheduled first (tests/conftest.py).
pytestmark = [pytest.mark.xdist_group('lorarar'), pytest.mark.slow]


@pytest.fixture(scope='module')
def rar(tmp_path_factory):
  dirs = shared_dirs(tmp_path_factory)
  config = quickstart_lorarar.get_config('smoke')
  for name in config.stage_order:
    config.stages[name].data.data_dir = dirs['data']
  workdir = str(tmp_path_factory.mktemp('rar'))
  main.train_and_evaluate(config, workdir)
  return dict(dirs=dirs, config=config, workdir=workdir,
              run=runs.restore(os.path.join(workdir, 'merger')))


def test_zoo_writes_one_standard_file_per_content_item_and_style(rar):
  run = rar['run']
  styles = lorarar.zoo_keys(os.path.join(rar['workdir'], 'style'))
  assert styles == tuple(sorted(synthetic.STYLES[1:]))
  for side in ('content', 'style'):
    folder = os.path.join(rar['workdir'], side)
    keys = lorarar.zoo_keys(folder)
    assert run.objective.frozen[side][0].shape[0] == len(keys) > 1
    other = 'style' if side == 'content' else 'content'
    for i, key in enumerate(keys):
      tree = lora_files.load_lora_file(preoptimize.lora_file(folder, key))
      assert set(tree) == {t.path for t in run.objective.models.targets}
      # The merger's zoo row i is this file's LoRA: the merged up factors hold it as
      # they are (the coefficients scale the down factors).
      merged = runs.lora(run, {side: np.array([i]), other: np.array([0])})
      half = slice(0, 2) if side == 'content' else slice(2, 4)
      for p, f in tree.items():
        assert f['down'].shape[0] == 2
        np.testing.assert_allclose(np.asarray(merged[p]['up'][0][:, half]),
                                   f['up'] * f['scale'], rtol=1e-5, atol=1e-7)
  # Held-out content LoRAs are the test split's items, none a training item.
  test_items = lorarar.zoo_keys(os.path.join(rar['workdir'], 'content_test'))
  assert test_items and not set(test_items) & set(
      lorarar.zoo_keys(os.path.join(rar['workdir'], 'content')))


def _delta(f):
  f = {k: np.asarray(v, np.float64) for k, v in f.items()}
  return f.get('scale', 1.0) * f['up'] @ f['down']


def test_merger_restores_samples_and_merges_the_zoos_files(rar, tmp_path):
  run = rar['run']
  assert run.spec.name == 'lorarar' and run.step == 2
  pair = {'content': np.array([1, 0]), 'style': np.array([2, 1])}
  tree = runs.lora(run, pair)
  images = sample.generate(run, None, ['a figure wearing S*'] * 2, inputs=pair,
                           num_steps=2, seed=0)
  assert images.shape == (2, 16, 16, 3) and np.isfinite(np.asarray(images)).all()
  # The CLI on the zoo's own files, with the trained run, writes the run's merge.
  content_dir, style_dir = (os.path.join(rar['workdir'], s) for s in ('content', 'style'))
  content = preoptimize.lora_file(content_dir, lorarar.zoo_keys(content_dir)[1])
  style = preoptimize.lora_file(style_dir, lorarar.zoo_keys(style_dir)[2])
  out = str(tmp_path / 'merged.safetensors')
  merged = merge.merge_files(content, style, 'lorarar', out, 'kohya', log=lambda _: None,
                             merger=os.path.join(rar['workdir'], 'merger'))
  for p, f in tree.items():
    np.testing.assert_allclose(_delta(merged[p]), _delta({k: v[0] for k, v in f.items()}),
                               rtol=1e-4, atol=1e-6)
  assert {f['down'].shape[0] for f in lora_files.load_lora_file(out).values()} == {4}
  # A merger refuses LoRAs without its layers; a run that is no merger is refused.
  trained = merge.trained_merger(run)
  some = {p: f for p, f in lora_files.load_lora_file(content).items()
          if p != trained.module.paths[0]}
  with pytest.raises(ValueError, match='trained for other layers'):
    merging.merge(some, some, 'lorarar', merger=trained)
  result = run_cli('merge', rar['dirs'], f'--content={content}', f'--style={style}',
                   '--method=lorarar', f'--merger={os.path.join(rar["workdir"], "base")}',
                   f'--out={tmp_path / "x.safetensors"}')
  assert result.returncode == 1 and 'not a trained merger' in result.stderr, result.stderr


def test_report_has_every_row_and_column_and_a_grid(rar):
  report = os.path.join(rar['workdir'], 'report')
  with open(os.path.join(report, 'results.json')) as f:
    results = json.load(f)
  assert list(results['rows']) == ['content LoRA alone', 'style LoRA alone', 'direct sum',
                                   'ZipLoRA (2 steps)', 'LoRA.rar']
  for name, row in results['rows'].items():
    assert set(row) == {'content_acc', 'style_acc', 'both_acc', 'seconds'}
    assert all(0 <= row[k]['mean'] <= 1 for k in ('content_acc', 'style_acc', 'both_acc'))
    assert row['seconds']['mean'] > 0 or name.endswith('alone')
  table = open(os.path.join(report, 'results.md')).read()
  assert '| LoRA.rar |' in table and 'merge s / pair' in table
  assert os.path.getsize(os.path.join(report, 'grid.png')) > 0


def test_cpu_and_gpu_sizes_build():
  for size in ('cpu', 'gpu', 'gpu64'):
    c = quickstart_lorarar.get_config(size)
    assert c.stages.merger.merger.content == 'stage:content' and c.report.kind == 'merging'
    assert c.stages.style.bank.group == 'style' and c.stages.content_test.bank.split == 'test'
  assert quickstart_lorarar.get_config('gpu').report.merger == ['merger', 'merger_seed1',
                                                                 'merger_seed2']
