"""Evaluation: the synthetic scorer on ground truth, compare's table and grid,
CLIP metrics against transformers' CLIPModel, and the CLI."""
import json
import os

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from hyperlora_jax import evaluate, sample
from hyperlora_jax import runs as runs_lib
from hyperlora_jax.data import images, synthetic
from hyperlora_jax.convert import clip_folders
from hyperlora_jax.models import clip
from tests.test_sample import make_run, run_cli, shared_dirs


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """An untrained hyperlora run and a unet_lora run on the same base model."""
  dirs = shared_dirs(tmp_path_factory)
  base = tmp_path_factory.mktemp('evaluate_runs')
  return dict(dirs=dirs, hyper=make_run(base / 'hyper', dirs),
              lora=make_run(base / 'lora', dirs, 'unet_lora'))


def test_scorer_reads_ground_truth_targets(runs):
  config = runs_lib.restore(runs['hyper']).config
  found = {'color_acc': [], 'pattern_acc': []}
  wrong = []
  for batch, n in evaluate.batches(config, 'test', None, 8):
    for k, v in evaluate.score_synthetic(batch['target'], batch).items():
      found[k].append(v[:n])
    # The same items read from the wrong place: far from perfect.
    shifted = np.roll(batch['target'], 8, axis=2)
    wrong.append(evaluate.score_synthetic(shifted, batch)['pattern_acc'][:n])
  assert len(np.concatenate(found['color_acc'])) == 16  # The whole test split.
  assert np.mean(np.concatenate(found['color_acc'])) >= 0.99
  assert np.mean(np.concatenate(found['pattern_acc'])) >= 0.99
  assert np.mean(np.concatenate(wrong)) < 0.7


def test_compare_writes_table_and_grid(runs, tmp_path):
  rows = {'no-LoRA': (runs['hyper'], 'no_lora'),
          'single LoRA': (runs['lora'], 'single_lora'),
          'HyperLoRA': (runs['hyper'], 'hyperlora'),
          'oracle': (runs['hyper'], 'oracle')}
  results = evaluate.compare(rows, str(tmp_path), num_examples=6, num_steps=2,
                             seeds=(0, 1), batch_size=4, grid_examples=3)
  assert json.loads((tmp_path / 'results.json').read_text()) == results
  for name, row in results['rows'].items():
    assert row['mode'] == rows[name][1]
    for k in evaluate.SYNTHETIC:
      assert set(row['metrics'][k]) == {'mean', 'std', 'se', 'seed_std'}
    assert row['metrics']['num_examples'] == 6
  table = (tmp_path / 'results.md').read_text().splitlines()
  assert table[0].startswith('| Row | Mode | color acc (%) | pattern acc (%) | '
                             'color gap recovered')
  assert [line.split(' | ')[0] for line in table[2:6]] == [f'| {r}' for r in rows]
  assert 'std over the 2 seeds' in table[-1]
  # Grid: 3 examples x (context, ground truth, 4 rows); the HyperLoRA column
  # is generate()'s image of example 0 (cells are 32 px enlarged 3x).
  grid = np.asarray(Image.open(tmp_path / 'grid.png'))
  cell, pad, top = 96, 2, 14
  assert grid.shape == (top + 3 * (cell + pad) + pad, 6 * (cell + pad) + pad, 3)
  run = runs_lib.restore(runs['hyper'])
  batch, _ = next(evaluate.batches(run.config, 'test', 1, 4))
  image = sample.generate(run, batch['context'], list(batch['prompt_scene']), num_steps=2,
                          image_ids=batch['index'])
  x = pad + 4 * (cell + pad)
  cropped = grid[top + pad:top + pad + cell:3, x:x + cell:3]
  np.testing.assert_array_equal(cropped, images.to_uint8(image)[0])


def test_row_of_several_runs_pairs_run_k_with_seed_k(runs, tmp_path):
  # Two copies of one run sampled with seeds 0 and 1 are that run sampled with
  # both seeds: same means and same spread over seeds.
  rows = {'one run': (runs['hyper'], 'hyperlora'),
          'two runs': ([runs['hyper'], runs['hyper']], 'hyperlora')}
  results = evaluate.compare(rows, str(tmp_path), num_examples=4, num_steps=2,
                             seeds=(0, 1), batch_size=4, grid_examples=2)
  one, two = (results['rows'][n] for n in rows)
  assert two['workdir'] == [str(runs['hyper'])] * 2
  for k in evaluate.SYNTHETIC:
    assert two['metrics'][k] == pytest.approx(one['metrics'][k])
  with pytest.raises(ValueError, match="'two runs' has 2 runs but there are 3 seeds"):
    evaluate.compare({'two runs': rows['two runs']}, str(tmp_path), seeds=(0, 1, 2))


def test_gap_recovered():
  metrics = lambda c, p: {'color_acc': {'mean': c}, 'pattern_acc': {'mean': p}}
  rows = {'a': dict(mode='no_lora', metrics=metrics(0.1, 0.3)),
          'b': dict(mode='hyperlora', metrics=metrics(0.6, 0.3)),
          'c': dict(mode='oracle', metrics=metrics(0.9, 0.3))}
  evaluate._gaps(rows)
  assert rows['b']['gap_recovered']['color_acc'] == pytest.approx(0.625)
  assert rows['b']['gap_recovered']['pattern_acc'] is None  # No gap to close.
  assert rows['c']['gap_recovered']['color_acc'] == pytest.approx(1.0)


def test_modes(runs):
  config = runs_lib.restore(runs['lora']).config
  assert evaluate.default_modes(config) == ('single_lora', 'no_lora', 'oracle')
  with pytest.raises(ValueError, match="'hyperlora' needs a hyperlora run; "
                     'this is a unet_lora run'):
    evaluate.check_mode(config, 'hyperlora')
  with pytest.raises(ValueError, match="Unknown mode 'lora'"):
    evaluate.compare({'x': (runs['lora'], 'lora')}, '/unused')


VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
              num_attention_heads=4, image_size=32, patch_size=8)


@pytest.fixture(scope='module')
def clip_folder(tmp_path_factory):
  """A tiny random CLIPModel saved by transformers, with a tokenizer."""
  folder = str(tmp_path_factory.mktemp('clip'))
  clip_folders.write_tokenizer(synthetic.vocabulary(), folder, 24)
  tokenizer = clip_folders.load_tokenizer(folder)
  torch.manual_seed(0)
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
                       num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=24, eos_token_id=tokenizer.eos_token_id),
      vision_config=VISION,
      projection_dim=16)
  model = transformers.CLIPModel(config).eval()
  model.save_pretrained(folder)
  return folder, model


def test_clip_metrics_match_transformers(clip_folder):
  folder, model = clip_folder
  scorer = evaluate.load_clip(folder)
  assert scorer.text is not None, scorer.note
  rng = np.random.RandomState(0)
  gen, ctx, tgt = (rng.uniform(-1, 1, (5, 48, 48, 3)).astype(np.float32)
                   for _ in range(3))
  prompts = synthetic.generate(5, 'test')['prompt_full']
  ours = evaluate.clip_scores(scorer, gen, ctx, tgt, prompts)

  def embed_images(x):  # The same pixels, through transformers' own model.
    pixels = np.asarray(clip.preprocess_images((x + 1) / 2, 32))
    with torch.no_grad():
      e = model.get_image_features(pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2))
    e = getattr(e, 'pooler_output', e).numpy()
    return e / np.linalg.norm(e, axis=-1, keepdims=True)

  g, c, t = embed_images(gen), embed_images(ctx), embed_images(tgt)
  ids = torch.tensor(clip.tokenize(scorer.tokenizer, prompts, 24), dtype=torch.long)
  with torch.no_grad():
    text = model.get_text_features(input_ids=ids)
  text = getattr(text, 'pooler_output', text).numpy()
  text /= np.linalg.norm(text, axis=-1, keepdims=True)
  c2g, t2g, c2t = (np.sum(a * b, -1) for a, b in ((c, g), (t, g), (c, t)))
  expected = {'C2G': c2g, 'T2G': t2g, 'T2Gdiff': np.abs(c2g - c2t),
              'CLIP-T': np.sum(text * g, -1)}
  assert set(ours) == set(expected)
  for k in expected:
    np.testing.assert_allclose(ours[k], expected[k], atol=2e-5, err_msg=k)
  assert np.ptp(expected['C2G']) > 1e-3  # Different images, different scores.


def test_clip_without_text_tower(tmp_path):
  config = transformers.CLIPVisionConfig(**VISION, projection_dim=16)
  transformers.CLIPVisionModelWithProjection(config).save_pretrained(tmp_path)
  scorer = evaluate.load_clip(str(tmp_path))
  assert scorer.text is None
  assert 'CLIP-T skipped' in scorer.note and 'not a CLIPModel' in scorer.note
  x = np.zeros((2, 32, 32, 3), np.float32)
  assert set(evaluate.clip_scores(scorer, x, x, x, ['a', 'b'])) == {
      'C2G', 'T2G', 'T2Gdiff'}


def test_cli(runs, clip_folder):
  result = run_cli('evaluate', runs['dirs'], f'--workdir={runs["hyper"]}',
                   '--num_examples=4', '--num_steps=2', '--batch_size=4',
                   '--grid_examples=2', f'--clip={clip_folder[0]}')
  assert result.returncode == 0, result.stderr[-3000:]
  out = os.path.join(runs['hyper'], 'eval')
  assert sorted(os.listdir(out)) == ['grid.png', 'results.json', 'results.md']
  results = json.loads(open(os.path.join(out, 'results.json')).read())
  assert list(results['rows']) == ['hyperlora', 'no_lora', 'oracle']
  assert set(results['rows']['hyperlora']['metrics']) == {
      'color_acc', 'pattern_acc', 'C2G', 'T2G', 'T2Gdiff', 'CLIP-T', 'num_examples',
      'by_color', 'by_pattern'}
  assert '| hyperlora | hyperlora |' in open(os.path.join(out, 'results.md')).read()


@pytest.mark.parametrize('args,message', [
    (['--workdir=/nonexistent/run'], 'Error: No training run at /nonexistent/run'),
    (['--workdir=RUN', '--modes=hyperlora,bogus'], "Error: Unknown mode 'bogus'"),
    (['--workdir=RUN', '--clip=/nonexistent/clip'],
     'Error: No such CLIP folder: /nonexistent/clip'),
])
def test_cli_errors(runs, args, message):
  args = [a.replace('RUN', runs['hyper']) for a in args]
  result = run_cli('evaluate', runs['dirs'], *args)
  assert result.returncode == 1
  assert message in result.stderr.splitlines()[-1], result.stderr[-2000:]


def test_accuracy_per_color_and_pattern():
  """The breakdown groups each example's (seed-averaged) correctness by its ground truth,
  with a standard error per value; the table shows it and the worst value's shortfall."""
  labels = {'color': np.array([0, 0, 0, 1, 1, 2]), 'pattern': np.array([0, 1, 1, 1, 2, 2])}
  per_seed = [{'color_acc': np.array([1, 1, 0, 0, 0, 1.]), 'pattern_acc': np.ones(6)},
              {'color_acc': np.array([1, 0, 0, 0, 1, 1.]), 'pattern_acc': np.zeros(6)}]
  m = evaluate._summary(per_seed, labels)
  red, orange, yellow = (m['by_color'][c] for c in synthetic.COLORS[:3])
  assert (red['n'], orange['n'], yellow['n']) == (3, 2, 1)
  assert red['mean'] == pytest.approx(0.5) and orange['mean'] == pytest.approx(0.25)
  assert red['se'] == pytest.approx(np.std([1, 0.5, 0]) / np.sqrt(3))
  assert yellow['mean'] == 1.0 and 'green' not in m['by_color']
  assert m['by_pattern']['stripes']['mean'] == pytest.approx(0.5)
  assert m['color_acc']['se'] == pytest.approx(np.std([1, .5, 0, 0, .5, 1]) / np.sqrt(6))
  results = {'rows': {'a': {'mode': 'hyperlora', 'metrics': m}},
             'settings': dict(split='test', num_examples=6, num_steps=2, guidance=3.0,
                              seeds=[0, 1], sampler='ddim')}
  table = evaluate.markdown_table(results)
  assert '| Row | red (n=3) | orange (n=2) | yellow (n=1) | worst - mean |' in table
  assert '| a | 50 ± 24 | 25 ± 18 | 100 ± 0 | -25 |' in table


def test_robust_contexts_row(runs, tmp_path):
  """The robustness split: the same held-out items and targets, other context images."""
  rows = {'HyperLoRA': (runs['hyper'], 'hyperlora'),
          'robust': (runs['hyper'], 'hyperlora_robust')}
  results = evaluate.compare(rows, str(tmp_path), num_examples=4, num_steps=2,
                             batch_size=4, grid_examples=2)
  plain, robust = (results['rows'][n]['metrics'] for n in rows)
  assert plain['num_examples'] == robust['num_examples'] == 4
  assert set(robust['by_color']) == set(plain['by_color'])  # the same items
  # Grid: context, ground truth, HyperLoRA, then the robust row's own contexts and images.
  grid = np.asarray(Image.open(tmp_path / 'grid.png'))
  assert grid.shape[1] == 5 * (96 + 2) + 2
  config = runs_lib.restore(runs['hyper']).config
  batch, _ = next(evaluate.batches(config, 'test', 1, 4))
  drawn = evaluate.robust_contexts(batch, config.data)
  assert drawn.shape == batch['context'].shape
  assert np.abs(drawn - batch['context']).mean() > 0.1
  with pytest.raises(ValueError, match='needs the synthetic task'):
    config.data.name = 'paired'
    evaluate.check_mode(config, 'hyperlora_robust')
