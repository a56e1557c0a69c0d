"""LoRA.rar end to end on tiny from-scratch models: a LoRA zoo fitted through the
lora_bank path (content LoRAs per item, style LoRAs per style, written as standard LoRA
files), the lorarar objective trained on its pairs, restored, sampled, and used by the
merge CLI on the zoo's own files."""
import numpy as np
import pytest

from hyperlora_jax import main, merge, merging, preoptimize, runs, sample
from hyperlora_jax.convert import lora_files
from hyperlora_jax.data import pipeline as data_pipeline
from hyperlora_jax.data import synthetic
from tests.test_sample import run_cli, shared_dirs, tiny_config

ZOO = {'data.styles': True, 'data.resolution': 16, 'bank.param.kind': 'plain',
       'bank.param.rank': 2}


def _delta(f):
  f = {k: np.asarray(v, np.float64) for k, v in f.items()}
  return f.get('scale', 1.0) * f['up'] @ f['down']


@pytest.fixture(scope='module')
def zoo(tmp_path_factory):
  dirs = shared_dirs(tmp_path_factory)
  out = {'dirs': dirs}
  for side, fmt in (('content', 'diffusers'), ('style', 'kohya')):
    config = tiny_config(dirs, 'lora_bank', **ZOO, **{
        'bank.group': side, 'bank.lora_format': fmt})
    workdir = str(tmp_path_factory.mktemp(side))
    main.train_one(config, workdir)
    out[side] = dict(config=config, workdir=workdir, keys=tuple(
        data_pipeline.subject_records(config.data, 'train', side)))
  config = tiny_config(dirs, 'lorarar', **ZOO, **{
      'merger.content': out['content']['workdir'], 'merger.style': out['style']['workdir'],
      'merger.hidden': 8, 'eval.num_examples': 0})
  workdir = str(tmp_path_factory.mktemp('merger'))
  main.train_one(config, workdir)
  out['merger'] = dict(config=config, workdir=workdir, run=runs.restore(workdir))
  return out


def test_zoo_writes_one_standard_file_per_content_item_and_style(zoo):
  assert zoo['style']['keys'] == tuple(sorted(synthetic.STYLES[1:]))
  for side in ('content', 'style'):
    keys = zoo[side]['keys']
    run = zoo['merger']['run']
    assert run.objective.frozen[side][0].shape[0] == len(keys) > 1
    for i, key in enumerate(keys):
      tree = lora_files.load_lora_file(preoptimize.lora_file(zoo[side]['workdir'], key))
      assert set(tree) == {t.path for t in run.objective.models.targets}
      # The merger's zoo row i is this file's LoRA: the merged up factors hold it as
      # they are (the coefficients scale the down factors).
      merged = runs.lora(run, {side: np.array([i]),
                               'style' if side == 'content' else 'content': np.array([0])})
      half = slice(0, 2) if side == 'content' else slice(2, 4)
      for p, f in tree.items():
        assert f['down'].shape[0] == 2
        np.testing.assert_allclose(np.asarray(merged[p]['up'][0][:, half]),
                                   f['up'] * f['scale'], rtol=1e-5, atol=1e-7)


def test_merger_trains_restores_samples_and_merges_the_zoos_files(zoo, tmp_path):
  run = zoo['merger']['run']
  assert run.spec.name == 'lorarar' and run.step == 2
  pair = {'content': np.array([1, 0]), 'style': np.array([2, 1])}
  tree = runs.lora(run, pair)
  images = sample.generate(run, None, ['a figure wearing S*'] * 2, inputs=pair,
                           num_steps=2, seed=0)
  assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
  # The CLI on the zoo's own files, with the trained run, writes the run's merge.
  content = preoptimize.lora_file(zoo['content']['workdir'], zoo['content']['keys'][1])
  style = preoptimize.lora_file(zoo['style']['workdir'], zoo['style']['keys'][2])
  out = str(tmp_path / 'merged.safetensors')
  merged = merge.merge_files(content, style, 'lorarar', out, merger=zoo['merger']['workdir'],
                             log=lambda _: None)
  expected = {p: {k: np.asarray(v[0]) for k, v in f.items()} for p, f in tree.items()}
  for p in expected:
    np.testing.assert_allclose(_delta(merged[p]), _delta(expected[p]), rtol=1e-4, atol=1e-6)
  assert {f['down'].shape[0] for f in lora_files.load_lora_file(out).values()} == {4}
  # A merger trained for these layers refuses LoRAs of others (here: one layer less).
  trained = merge.trained_merger(run)
  some = {p: f for p, f in lora_files.load_lora_file(content).items()
          if p != trained.module.paths[0]}
  with pytest.raises(ValueError, match='trained for other layers'):
    merging.merge(some, some, 'lorarar', merger=trained)
  result = run_cli('merge', zoo['dirs'], f'--content={content}', f'--style={style}', '--method=lorarar',
                   f'--merger={zoo["content"]["workdir"]}', f'--out={tmp_path / "x.st"}')
  assert result.returncode == 1 and 'Error:' in result.stderr
