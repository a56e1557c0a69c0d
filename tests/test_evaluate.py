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
  found = {k: [] for k in evaluate.SYNTHETIC + evaluate.SCENE}
  wrong = {'pattern_acc': [], 'position_acc': []}
  for batch, n in evaluate.batches(config, 'test', None, 8):
    for k, v in evaluate.score_synthetic(batch['target'], batch).items():
      found[k].append(v[:n])
    # The same items read from the wrong place: far from perfect.
    shifted = evaluate.score_synthetic(np.roll(batch['target'], 11, axis=2), batch)
    for k in wrong:
      wrong[k].append(shifted[k][:n])
  assert len(np.concatenate(found['color_acc'])) == 16  # The whole test split.
  for k, v in found.items():
    assert np.mean(np.concatenate(v)) >= 0.99, k
  for k, v in wrong.items():
    assert np.mean(np.concatenate(v)) < 0.7, k


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
      assert set(row['metrics'][k]) == {'mean', 'std', 'seed_std'}
    assert row['metrics']['num_examples'] == 6
  table = (tmp_path / 'results.md').read_text().splitlines()
  assert table[0] == ('| Row | Mode | color acc (%) | pattern acc (%) | color gap recovered | '
                      'pattern gap recovered | background acc (%) | position acc (%) |')
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
  # Edit rows are measured against the edit ends, which were asked the same scenes.
  rows.update(d=dict(mode='hyperlora_edit', metrics=metrics(0.5, 0.3)),
              e=dict(mode='no_lora_edit', metrics=metrics(0.0, 0.3)),
              f=dict(mode='oracle_edit', metrics=metrics(1.0, 0.3)))
  evaluate._gaps(rows)
  assert rows['d']['gap_recovered']['color_acc'] == pytest.approx(0.5)
  assert rows['b']['gap_recovered']['color_acc'] == pytest.approx(0.625)


def test_edit_prompts_ask_for_other_scenes(runs):
  config = runs_lib.restore(runs['hyper']).config
  batch, n = next(evaluate.batches(config, 'test', None, 16))
  prompts, background, position = evaluate.edit_prompts(batch, seed=0)
  assert (background != batch['background']).all()
  assert (position != batch['position']).all()
  assert len(set(zip(background.tolist(), position.tolist()))) > 3
  again = evaluate.edit_prompts(batch, seed=0)
  assert again[0] == prompts
  assert evaluate.edit_prompts(batch, seed=1)[0] != prompts
  for i, prompt in enumerate(prompts):
    item = [int(batch[k][i]) for k in ('shape', 'color', 'pattern', 'color2')]
    assert prompt == synthetic.prompts(*item, background[i], position[i])['prompt_scene']
    assert 'S*' in prompt and 'S*' not in evaluate.edit_prompts(batch, 0, 'full')[0][i]
  edited = evaluate.edit_batch(batch, seed=0)
  np.testing.assert_array_equal(edited['context'], batch['context'])
  assert edited['prompt_scene'] == prompts
  # The asked scene's ground truth scores perfectly against the asked scene;
  # the example's own target, the item right but the scene not, scores zero there.
  for k, v in evaluate.score_synthetic(edited['target'], edited).items():
    assert v[:n].mean() == 1.0, k
  own = evaluate.score_synthetic(batch['target'], edited)
  assert own['background_acc'].max() == 0 and own['position_acc'].max() == 0


def test_edit_mode_samples_and_scores_the_asked_scene(runs):
  run = runs_lib.restore(runs['hyper'])
  per_seed, kept = evaluate.score_mode(run, 'hyperlora_edit', num_examples=4, num_steps=2,
                                       seeds=(1,), batch_size=4, keep=4)
  batch, _ = next(evaluate.batches(run.config, 'test', 4, 4))
  edited = evaluate.edit_batch(batch, seed=1)
  image = sample.generate(run, batch['context'], edited['prompt_scene'], num_steps=2,
                          seed=1, image_ids=batch['index'])
  np.testing.assert_array_equal(kept['generated'], image)
  np.testing.assert_array_equal(kept['target'], edited['target'])
  expected = evaluate.score_synthetic(image, edited)
  assert set(per_seed[0]) == set(evaluate.SYNTHETIC + evaluate.SCENE)
  for k, v in expected.items():
    np.testing.assert_array_equal(per_seed[0][k], v)


def test_modes(runs):
  config = runs_lib.restore(runs['lora']).config
  assert evaluate.default_modes(config) == ('single_lora', 'no_lora', 'oracle')
  with pytest.raises(ValueError, match="'hyperlora' needs a hyperlora run; "
                     'this is a unet_lora run'):
    evaluate.check_mode(config, 'hyperlora')
  with pytest.raises(ValueError, match="Unknown mode 'lora'"):
    evaluate.compare({'x': (runs['lora'], 'lora')}, '/unused')
  evaluate.check_mode(config, 'single_lora_edit')
  with pytest.raises(ValueError, match="'hyperlora_edit' needs a hyperlora run"):
    evaluate.check_mode(config, 'hyperlora_edit')
  folders = config.copy_and_resolve_references()
  folders.data.name = 'single'
  with pytest.raises(ValueError, match="'no_lora_edit' asks for other synthetic scenes"):
    evaluate.check_mode(folders, 'no_lora_edit')


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
      'color_acc', 'pattern_acc', 'background_acc', 'position_acc', 'C2G', 'T2G', 'T2Gdiff',
      'CLIP-T', 'num_examples'}
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
