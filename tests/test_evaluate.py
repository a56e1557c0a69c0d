"""Evaluation: the synthetic scorer on ground truth, compare's table and grid,
CLIP metrics against transformers' CLIPModel, and the CLI."""
import json
import os

import ml_collections
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from hyperlora_jax import evaluate, sample
from hyperlora_jax import runs as runs_lib
from hyperlora_jax.data import images, synthetic
from hyperlora_jax.convert import clip_folders
from hyperlora_jax.models import clip, vit
from tests.test_sample import make_run, run_cli, shared_dirs

# One worker builds its fixtures; slow: scheduled first (tests/conftest.py).
pytestmark = [pytest.mark.xdist_group('evaluate'), pytest.mark.slow]


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
      assert set(row['metrics'][k]) == {'mean', 'std', 'se', 'seed_std'}
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


def test_merge_reports_is_one_compare_of_every_seed(runs, tmp_path):
  """A table over two training seeds made as two launches (one seed each) and merged
  reads as the one compare that sampled both: every summary, the table, the gaps."""
  two = [runs['hyper'], runs['hyper']]  # Stand-ins for the runs of two training seeds.
  rows = {'no-LoRA': (runs['hyper'], 'no_lora'), 'HyperLoRA': (two, 'hyperlora'),
          'oracle': (runs['hyper'], 'oracle')}
  kw = dict(num_examples=4, num_steps=2, batch_size=4, grid_examples=2)
  whole = evaluate.compare(rows, str(tmp_path / 'whole'), seeds=(0, 1), **kw)
  for k in (0, 1):
    evaluate.compare({n: (w[k] if isinstance(w, list) else w, m) for n, (w, m) in rows.items()},
                     str(tmp_path / f'seed{k}'), seeds=(k,), **kw)
  launches = [str(tmp_path / 'seed0'), str(tmp_path / 'seed1')]
  merged = evaluate.merge_reports(launches, str(tmp_path / 'merged'))
  flat = lambda d: {f'{k}/{j}': w for k, v in d.items() if isinstance(v, dict)
                    for j, w in flat(v).items()} | {k: v for k, v in d.items()
                                                  if not isinstance(v, dict)}
  for name, row in whole['rows'].items():
    # Pooled from scores.json in float64, summarized by compare in float32.
    assert flat(merged['rows'][name]['metrics']) == pytest.approx(
        flat(row['metrics']), rel=1e-6), name
    assert merged['rows'][name].get('gap_recovered') == row.get('gap_recovered')
  assert merged['rows']['HyperLoRA']['workdir'] == [str(runs['hyper'])] * 2
  read = lambda d, f: (tmp_path / d / f).read_text()
  assert read('merged', 'results.md') == read('whole', 'results.md')
  assert json.loads(read('merged', 'results.json')) == merged
  assert (tmp_path / 'merged' / 'grid.png').read_bytes() == (
      tmp_path / 'seed0' / 'grid.png').read_bytes()
  # Reports that are not launches of one table are refused, naming why.
  with pytest.raises(ValueError, match=r'share sampling seeds \(\[0, 0\]\)'):
    evaluate.merge_reports([launches[0]] * 2, str(tmp_path / 'bad'))
  evaluate.compare({'oracle': rows['oracle']}, str(tmp_path / 'other'), seeds=(2,), **kw)
  with pytest.raises(ValueError, match=r'other.* is not a report of the same table.*rows'):
    evaluate.merge_reports([launches[0], str(tmp_path / 'other')], str(tmp_path / 'bad'))
  # A report written before the robust labels existed pools with one that has them.
  scores = json.loads(read('seed1', 'scores.json'))
  scores['labels'] = {k: v for k, v in scores['labels'].items() if not k.startswith('robust')}
  (tmp_path / 'older').mkdir()
  for f in ('results.json', 'grid.png'):
    (tmp_path / 'older' / f).write_bytes((tmp_path / 'seed1' / f).read_bytes())
  (tmp_path / 'older' / 'scores.json').write_text(json.dumps(scores))
  older = evaluate.merge_reports([str(tmp_path / 'older'), launches[0]], str(tmp_path / 'm2'))
  assert flat(older['rows']['HyperLoRA']['metrics']['by_robust_side']) == pytest.approx(
      flat(merged['rows']['HyperLoRA']['metrics']['by_robust_side']))
  (tmp_path / 'old').mkdir()
  (tmp_path / 'old' / 'results.json').write_text(read('seed1', 'results.json'))
  with pytest.raises(FileNotFoundError, match='old has no scores.json'):
    evaluate.merge_reports([launches[0], str(tmp_path / 'old')], str(tmp_path / 'bad'))
  # The CLI's merge mode.
  result = run_cli('evaluate', runs['dirs'], f'--merge={",".join(launches)}',
                   f'--out={tmp_path / "cli"}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert read('cli', 'results.md') == read('whole', 'results.md')


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
  per_seed, kept, _ = evaluate.score_mode(run, 'hyperlora_edit', num_examples=4, num_steps=2,
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
  # (a lora_bank run's per-subject LoRAs are sampled in the hyperlora mode too)
  with pytest.raises(ValueError, match=r"'hyperlora' needs a run with a predicted LoRA "
                     r"\(hyperlora, .*lora_bank.*\); this is a unet_lora run"):
    evaluate.check_mode(config, 'hyperlora')
  with pytest.raises(ValueError, match="Unknown mode 'lora'"):
    evaluate.compare({'x': (runs['lora'], 'lora')}, '/unused')
  evaluate.check_mode(config, 'single_lora_edit')
  with pytest.raises(ValueError,
                     match=r"'hyperlora_edit' needs a run with a predicted LoRA \(hyperlora, "):
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
  assert sorted(os.listdir(out)) == ['grid.png', 'results.json', 'results.md', 'scores.json']
  results = json.loads(open(os.path.join(out, 'results.json')).read())
  assert list(results['rows']) == ['hyperlora', 'no_lora', 'oracle']
  assert set(results['rows']['hyperlora']['metrics']) == {
      'color_acc', 'pattern_acc', 'background_acc', 'position_acc', 'C2G', 'T2G', 'T2Gdiff',
      'CLIP-T', 'num_examples', 'by_color', 'by_pattern', 'by_robust_side',
      'by_robust_backdrop', 'by_robust_jpeg'}
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


def test_robust_rows_by_their_contexts_framing():
  """Robust rows' accuracy per bin of the robustness split's framing (item side against
  the training contexts', backdrop, JPEG quality): the bins are robust_factors', the
  table shows robust rows only."""
  data = ml_collections.ConfigDict(dict(resolution=64, seed=0))
  labels = evaluate.robust_labels(np.arange(40), data)
  factors = [synthetic.robust_factors(i, resolution=64, seed=0) for i in range(40)]
  lo, hi = synthetic.CONTEXT_SIDE
  np.testing.assert_array_equal(labels['robust_side'], [
      0 if f.item_side < lo else 1 if f.item_side < hi else 2 for f in factors])
  np.testing.assert_array_equal(labels['robust_backdrop'], [f.backdrop for f in factors])
  assert evaluate.ROBUST_BREAKDOWNS['robust_jpeg'][2] == ('JPEG 40-56', 'JPEG 57-73',
                                                           'JPEG 74-90')
  correct = np.array([f.item_side < lo for f in factors], np.float32)  # small ones right
  per_seed = [{'color_acc': correct, 'pattern_acc': 1 - correct}]
  m = evaluate._summary(per_seed, labels)
  small, same = (m['by_robust_side']['color_acc'][k] for k in
                 evaluate.ROBUST_BREAKDOWNS['robust_side'][2][:2])
  assert small['mean'] == 1.0 and same['mean'] == 0.0
  assert small['n'] + same['n'] + m['by_robust_side']['color_acc']['larger']['n'] == 40
  assert m['by_robust_side']['pattern_acc'][evaluate.ROBUST_BREAKDOWNS['robust_side'][2][0]][
      'mean'] == 0.0
  results = {'rows': {'plain': {'mode': 'hyperlora', 'metrics': m},
                      'robust': {'mode': 'hyperlora_robust', 'metrics': m}},
             'settings': dict(split='test', num_examples=40, num_steps=2, guidance=3.0,
                              seeds=[0], sampler='ddim')}
  table = evaluate.markdown_table(results).split('Robust contexts by their framing')[1]
  assert f'| item smaller than in training (n={small["n"]}) |' in table
  assert '| robust | 100 / 0 | 0 / 100 |' in table and '| plain |' not in table


def test_robust_contexts_row(runs, tmp_path):
  """The robustness split: the same held-out items and targets, other context images."""
  rows = {'HyperLoRA': (runs['hyper'], 'hyperlora'),
          'robust': (runs['hyper'], 'hyperlora_robust')}
  results = evaluate.compare(rows, str(tmp_path), num_examples=4, num_steps=2,
                             batch_size=4, grid_examples=2)
  plain, robust = (results['rows'][n]['metrics'] for n in rows)
  assert plain['num_examples'] == robust['num_examples'] == 4
  assert set(robust['by_color']) == set(plain['by_color'])  # the same items
  table = (tmp_path / 'results.md').read_text().split('Robust contexts by their framing')[1]
  assert '| robust |' in table and '| HyperLoRA |' not in table
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


# ---------------------------------------------------------------- folders


@pytest.fixture(scope='module')
def dino_folder(tmp_path_factory):
  """A tiny random ViTModel saved as facebook/dino-vits16 is: no pooler, and a
  ViTImageProcessor with ImageNet's statistics."""
  folder = str(tmp_path_factory.mktemp('dino'))
  torch.manual_seed(1)
  config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, image_size=32, patch_size=8)
  transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
  transformers.ViTImageProcessor(size={'height': 32, 'width': 32},
                                 image_mean=list(vit.IMAGENET_MEAN),
                                 image_std=list(vit.IMAGENET_STD)).save_pretrained(folder)
  return folder


@pytest.fixture(scope='module')
def image_folders(tmp_path_factory):
  """generated/ and references/: 5 pairs of synthetic targets and contexts at the
  models' 32 px and at 64 px (resized), one reference a JPEG; prompts.json."""
  base = tmp_path_factory.mktemp('folders')
  (base / 'generated').mkdir()
  (base / 'references').mkdir()
  prompts = {}
  for i, resolution in enumerate((32, 64, 32, 64, 48)):
    g = synthetic.example(i, 'test', resolution=resolution)
    name = f'subject_{i}'
    Image.fromarray(g['target']).save(base / 'generated' / f'{name}.png')
    Image.fromarray(g['context']).save(base / 'references' / f'{name}.{"jpg" if i == 1 else "png"}')
    prompts[name] = g['prompt_full']
  (base / 'prompts.json').write_text(json.dumps(prompts))
  return {k: str(base / k) for k in ('generated', 'references', 'prompts.json')}


def transformers_folder_scores(folders, dino_folder, clip_folder):
  """{name: (DINO, CLIP-I and CLIP-T of the pair, the pair's unit DINO and CLIP image
  embeddings)}, computed by transformers alone."""
  folder, model = clip_folder
  dino = transformers.ViTModel.from_pretrained(dino_folder, add_pooling_layer=False).eval()
  dino_processor = transformers.ViTImageProcessor.from_pretrained(dino_folder)
  clip_processor = transformers.CLIPImageProcessor(size={'shortest_edge': 32},
                                                   crop_size={'height': 32, 'width': 32})
  tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
  prompts = json.loads(open(folders['prompts.json']).read())
  unit = lambda t: (t / t.norm(dim=-1, keepdim=True)).numpy()
  out = {}
  for name in sorted(prompts):
    pair = [Image.open(os.path.join(folders[d], f)).convert('RGB')
            for d in ('generated', 'references') for f in os.listdir(folders[d])
            if f.startswith(name + '.')]
    with torch.no_grad():
      d = unit(dino(**dino_processor(images=pair, return_tensors='pt')).last_hidden_state[:, 0])
      c = model.get_image_features(**clip_processor(images=pair, return_tensors='pt'))
      c = unit(getattr(c, 'pooler_output', c))
      ids = tokenizer([prompts[name]], padding='max_length', max_length=24, truncation=True,
                      return_tensors='pt').input_ids
      t = model.get_text_features(input_ids=ids)
      t = unit(getattr(t, 'pooler_output', t))
    out[name] = ({'DINO': float(d[0] @ d[1]), 'CLIP-I': float(c[0] @ c[1]),
                  'CLIP-T': float(t[0] @ c[0])}, {'DINO': d, 'CLIP': c})
  return out


def test_folder_metrics_match_transformers(image_folders, dino_folder, clip_folder, tmp_path):
  results = evaluate.score_folders(
      image_folders['generated'], image_folders['references'], str(tmp_path),
      prompts_file=image_folders['prompts.json'], dino_folder=dino_folder,
      clip_folder=clip_folder[0], batch_size=4)  # 5 pairs: a padded second batch
  assert json.loads((tmp_path / 'results.json').read_text()) == results
  expected = transformers_folder_scores(image_folders, dino_folder, clip_folder)
  assert list(results['per_image']) == list(expected)
  dino, scorer = evaluate.load_dino(dino_folder), evaluate.load_clip(clip_folder[0])
  pairs = {name: (g, r) for name, g, r in images.pair_images(image_folders['generated'],
                                                            image_folders['references'])}
  for name, (scores, embeddings) in expected.items():
    pixels = [images.read_rgb(p) for p in pairs[name]]
    # Pixels resized by PIL and by jax.image.resize differ by one 8-bit level at most;
    # at the models' own size they are the same pixels.
    same = pixels[0].shape[:2] == (32, 32)
    tol, embedding_tol = (1e-5, 1e-6) if same else (2e-4, 5e-4)
    ours = {'DINO': evaluate.dino_embeddings(dino, pixels),
            'CLIP': evaluate.clip_image_embeddings(scorer, pixels)}
    for k, v in embeddings.items():
      np.testing.assert_allclose(ours[k], v, atol=embedding_tol, err_msg=f'{name} {k}')
    for k, v in scores.items():
      assert results['per_image'][name][k] == pytest.approx(v, abs=tol), (name, k)
  for k in evaluate.FOLDER_METRICS:
    values = np.array([s[k] for s, _ in expected.values()])
    assert np.ptp(values) > 1e-3  # Different pairs, different scores.
    assert results['metrics'][k]['mean'] == pytest.approx(values.mean(), abs=1e-3)
    assert results['metrics'][k]['std'] == pytest.approx(values.std(), abs=1e-3)
  assert results['metrics']['num_pairs'] == 5
  table = (tmp_path / 'results.md').read_text().splitlines()
  assert table[0] == '| Pairs | DINO | CLIP-I | CLIP-T |'
  assert table[2].startswith(f'| 5 | {results["metrics"]["DINO"]["mean"]:.3f} ± ')


def test_folder_errors(image_folders, dino_folder, clip_folder, tmp_path):
  gen, ref = image_folders['generated'], image_folders['references']
  score = lambda g=gen, r=ref, **kw: evaluate.score_folders(
      g, r, str(tmp_path / 'out'), **{'dino_folder': dino_folder, **kw})
  partial = tmp_path / 'partial'
  partial.mkdir()
  for name in ('subject_0.png', 'subject_2.png', 'stray.png'):
    Image.new('RGB', (8, 8)).save(partial / name)
  with pytest.raises(ValueError, match=r'1 generated images have none of the same name in '
                     r'.*references: stray; 3 reference images have none of the same name '
                     r'in .*partial: subject_1, subject_3, subject_4\.'):
    score(g=str(partial))
  (partial / 'stray.png').write_bytes(b'not a png')
  with pytest.raises(ValueError, match='Cannot read the image .*stray.png'):
    score(g=str(partial))
  with pytest.raises(FileNotFoundError, match='No such reference folder: /nonexistent'):
    score(r='/nonexistent')
  with pytest.raises(ValueError, match="not a ViT: its model_type is 'clip'"):
    score(dino_folder=clip_folder[0])
  with pytest.raises(ValueError, match='Nothing to score'):
    score(dino_folder=None)
  with pytest.raises(ValueError, match=r'CLIP-T \(--prompts\) needs a CLIP folder'):
    score(prompts_file=image_folders['prompts.json'])
  prompts = tmp_path / 'prompts.json'
  prompts.write_text(json.dumps({'subject_0': 'a figure'}))
  with pytest.raises(ValueError, match='has no prompt for 4 generated images: subject_1, '):
    score(prompts_file=str(prompts), clip_folder=clip_folder[0])
  assert not (tmp_path / 'out').exists()  # Nothing written before the inputs are known good.


def test_folder_cli(runs, image_folders, dino_folder, clip_folder, tmp_path):
  out = tmp_path / 'cli'
  result = run_cli('evaluate', runs['dirs'], f'--generated={image_folders["generated"]}',
                   f'--references={image_folders["references"]}',
                   f'--prompts={image_folders["prompts.json"]}', f'--dino={dino_folder}',
                   f'--clip={clip_folder[0]}', f'--out={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(out)) == ['results.json', 'results.md']
  results = json.loads((out / 'results.json').read_text())
  assert set(results['metrics']) == {'num_pairs', 'DINO', 'CLIP-I', 'CLIP-T'}
  assert '| Pairs | DINO | CLIP-I | CLIP-T |' in result.stdout
  missing = run_cli('evaluate', runs['dirs'], f'--generated={image_folders["generated"]}',
                    f'--dino={dino_folder}')
  assert missing.returncode == 1
  assert 'Error: --generated needs --references' in missing.stderr.splitlines()[-1]
