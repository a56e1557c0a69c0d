"""ByteDance HyperLoRA's recipe (`objectives.hyperlora_basis`) at the smallest size: the
subject sets of the data, the regions the Base branch never sees, the set mean, the
parts, the stages' trainable params and init_from, the slider, and bad input."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image
from safetensors.numpy import load_file

from configs import quickstart_basis, sd15_basis, tiny_test
from hyperlora_jax import defaults, evaluate, objectives, runs, slider, stages, train
from hyperlora_jax.data import pipeline as data_pipeline
from hyperlora_jax.data import subjects, synthetic
from hyperlora_jax.models import id_base
from hyperlora_jax.objectives import hyperlora_basis
from tests.test_sample import loss_and_grads

# One worker builds its fixtures; slow: scheduled first (tests/conftest.py).
pytestmark = [pytest.mark.xdist_group('basis'), pytest.mark.slow]

SET = 2


def _config(stage, **basis):
  c = tiny_test.get_config('hyperlora_basis')
  c.data.update(set_size=SET, set_random=True)
  c.hypernet.encoder.channels = (8, 16)
  c.hypernet.decoder.update(kind='perceiver', width=16, depth=1, heads=2, queries=2,
                            block='separate')
  c.hypernet.param.update(kind='basis', mix='factors', num_id=4, num_base=4, rank=2,
                          base_rank=1)
  c.hypernet.gamma_init = 0.5  # Deltas from the first step, so every part is visible.
  c.basis.update(stage=stage, region=dict(mode='fill', blur=0.1), **basis)
  c.basis.identity.update(kind='crop', tokens=2, crop_size=8, channels=(8,))
  c.train.update(num_steps=2, checkpoint_every=2)
  c.eval.num_examples = 0
  return defaults.fill(c)


def _train(config, workdir):
  return train.train_and_evaluate(config, workdir, build_objective=objectives.build,
                                  create_dataset=data_pipeline.for_training,
                                  evaluate_fn=evaluate.evaluate_fn)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """Stage 1 (the Base-LoRA), then stage 2 (the ID-LoRA) started from it."""
  root = tmp_path_factory.mktemp('basis')
  _train(_config('base'), str(root / 'base'))
  stage2 = _config('id_clip')
  stage2.train.init_from = str(root / 'base')
  _train(stage2, str(root / 'id_clip'))
  return {'root': root, 'base': runs.restore(str(root / 'base')),
          'id_clip': runs.restore(str(root / 'id_clip'))}


def _inputs(seed=0, n=SET, resolution=32):
  """A batch of 2 synthetic subjects' sets, as the data pipeline serves them."""
  data = _config('joint').data
  data.update(set_size=n, resolution=resolution)
  rng = np.random.default_rng(seed)
  sets = []
  for i in range(2):
    ex = {'index': i, 'shape': i % 2, 'color': (3 * i + seed) % 8, 'pattern': i % 4,
          'color2': (i + 1) % 8}
    sets.append(subjects.make_set(data, False, 'test', ex, rng))
  return {k: np.stack([s[k] for s in sets]) for k in subjects.LORA_INPUTS}


def _dense(tree):
  """{path: [B, d_out, d_in]}: each sample's delta up @ down (what its LoRA adds)."""
  plain = runs.plain_loras(tree)
  return {p: np.stack([f[p]['up'] @ f[p]['down'] for f in plain]) for p in plain[0]}


# ---------------------------------------------------------------- data
def test_synthetic_sets_show_one_item_inside_its_regions():
  data = _config('joint').data
  data.update(set_size=4, set_occlude=0.0)
  ex = {'index': 7, 'shape': 1, 'color': 2, 'pattern': 0, 'color2': 5}
  out = subjects.make_set(data, False, 'train', dict(ex), np.random.default_rng(0))
  assert out['context'].shape == (4, 32, 32, 3) and out['set_mask'].all()
  again = subjects.make_set(data, False, 'train', dict(ex), np.random.default_rng(1))
  np.testing.assert_array_equal(out['context'], again['context'])  # a function of the item
  color = synthetic.COLOR_RGB[2].astype(np.float32) / 127.5 - 1
  for image, box in zip(out['context'], out['region'].astype(int)):
    inside = image[box[1]:box[3], box[0]:box[2]].reshape(-1, 3)
    outside = np.ones(image.shape[:2], bool)
    outside[box[1]:box[3], box[0]:box[2]] = False
    is_item = lambda px: np.abs(px - color).max(-1) < 0.05
    assert is_item(inside).mean() > 0.3 and not is_item(image[outside]).any()
  # Training draws 1..N of the set; every count occurs.
  rng = np.random.default_rng(0)
  counts = {int(subjects.make_set(data, True, 'train', dict(ex), rng)['set_mask'].sum())
            for _ in range(40)}
  assert counts == {1, 2, 3, 4}


def test_fill_leaves_nothing_of_the_region_and_crop_reads_it():
  images = jnp.asarray(_inputs()['context'][:, 0])
  boxes = jnp.asarray(_inputs()['region'][:, 0])
  hidden = id_base.hide_regions(images, boxes, 'fill', 0.1)
  masks = id_base.region_masks(boxes, 32, 32)
  for image, out, mask in zip(images, hidden, masks):
    inside = np.asarray(out)[np.asarray(mask) > 0]
    assert inside.std(0).max() < 1e-5  # one color over the region
    np.testing.assert_array_equal(np.asarray(out)[np.asarray(mask) == 0],
                                  np.asarray(image)[np.asarray(mask) == 0])
  blurred = id_base.hide_regions(images, boxes, 'blur', 0.1)
  assert float(jnp.abs(blurred - images).max()) > 0.1
  crops = id_base.crop_regions(images, boxes, 8)
  assert crops.shape == (2, 8, 8, 3)


def test_trigger_words_in_and_out():
  assert subjects.with_trigger('a cat on a beach', 'S*') == 'S*, a cat on a beach'
  assert subjects.with_trigger('a S* on a beach', 'S*') == 'a S* on a beach'
  assert subjects.without_trigger('fcsks fxhks fhyks, a man, smiling',
                                  subjects.PAPER_TRIGGER) == 'a man, smiling'


def _write(folder, name, size=(40, 30), box=None, embed=None):
  path = os.path.join(folder, f'{name}.png')
  pixels = np.full(size[::-1] + (3,), 90, np.uint8)
  if box is not None:  # the region red, so its place after resizing can be read
    pixels[box[1]:box[3], box[0]:box[2]] = (230, 20, 20)
  Image.fromarray(pixels).save(path)
  if box is not None:
    with open(os.path.join(folder, f'{name}.json'), 'w') as f:
      json.dump({'box': box}, f)
  if embed is not None:
    np.save(os.path.join(folder, f'{name}.npy'), np.zeros(embed, np.float32))
  return path


def test_context_files_bad_input_names_the_file(tmp_path):
  good = _write(tmp_path, 'good', box=[10, 5, 30, 25], embed=8)
  inputs, names = subjects.read_context_files([good, good], 16, as_set=True, embed_dim=8)
  assert inputs['context'].shape == (1, 2, 16, 16, 3) and names == ['good_good']
  # The region in the file's pixels is the red region of the 16 x 16 image fit makes.
  x0, y0, x1, y1 = inputs['region'][0, 0]
  red = inputs['context'][0, 0, :, :, 1] < -0.5
  ys, xs = np.nonzero(red)
  assert abs(xs.min() - x0) <= 1 and abs(xs.max() + 1 - x1) <= 1
  assert abs(ys.min() - y0) <= 1 and abs(ys.max() + 1 - y1) <= 1
  with pytest.raises(ValueError, match='No context images'):
    subjects.read_context_files([], 16)
  outside = _write(tmp_path, 'outside', box=[10, 5, 50, 25])
  with pytest.raises(ValueError, match=r'outside\.json.*does not lie inside the 40 x 30'):
    subjects.read_context_files([outside], 16)
  wrong = _write(tmp_path, 'wrong', embed=7)
  with pytest.raises(ValueError, match=r'wrong\.npy has 7 numbers.*8-d'):
    subjects.read_context_files([wrong], 16, embed_dim=8)
  plain = _write(tmp_path, 'plain')
  with pytest.raises(FileNotFoundError, match=r'plain\.npy'):
    subjects.read_context_files([plain], 16, embed_dim=8)


# ---------------------------------------------------------------- the network
def test_set_mean_masks_and_parts_add_up(trained):
  run = trained['id_clip']
  inputs = _inputs()
  both = _dense(runs.lora(run, inputs))
  # A masked-out picture does not count: the second one replaced by noise.
  masked = dict(inputs, set_mask=np.array([[True, False]] * 2))
  noisy = dict(masked, context=inputs['context'].copy())
  noisy['context'][:, 1] = np.random.default_rng(0).uniform(-1, 1, noisy['context'][:, 1].shape)
  a, b = _dense(runs.lora(run, masked)), _dense(runs.lora(run, noisy))
  # ... and a set of one picture is that picture alone; two agree with the mean.
  single = {k: v[:, :1] for k, v in inputs.items()}
  c = _dense(runs.lora(run, single))
  for p in both:
    # (one picture compiles to another program: float32 rounding apart)
    np.testing.assert_allclose(a[p], b[p], rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(a[p], c[p], rtol=1e-4, atol=2e-6)
    assert np.abs(both[p] - a[p]).max() > 1e-6  # the second picture did count
  # The ID-LoRA and the Base-LoRA add up to both; a scale of 2 doubles a part.
  ident = _dense(runs.lora(run, inputs, {'id': 1.0, 'base': 0.0}))
  base = _dense(runs.lora(run, inputs, {'id': 0.0, 'base': 1.0}))
  twice = _dense(runs.lora(run, inputs, {'id': 2.0, 'base': 0.0}))
  for p in both:
    assert np.abs(ident[p]).max() > 1e-6 and np.abs(base[p]).max() > 1e-6
    np.testing.assert_allclose(ident[p] + base[p], both[p], rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(twice[p], 2 * ident[p], rtol=1e-4, atol=2e-6)
  with pytest.raises(ValueError, match='no LoRA part face'):
    runs.lora(run, inputs, {'face': 1.0})


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep='/')


def test_stages_train_their_branch_and_start_from_the_last(trained):
  base, stage2 = trained['base'], trained['id_clip']
  # A run's params are what it trained: stage 1 the Base branch, stage 2 the ID branch.
  trained1, trained2 = set(_flat(base.params)), set(_flat(stage2.params))
  assert any(p.startswith('base_encoder/') for p in trained1)
  assert all(p.startswith(('base_', 'parameterization/base_')) or p == 'gamma_base'
             for p in trained1)
  assert any(p.startswith('id_decoder/') for p in trained2)
  assert all(p.startswith(('encoder/', 'id_decoder/', 'parameterization/id_'))
             or p == 'gamma_id' for p in trained2)
  # Stage 2 holds stage 1's Base branch exactly: frozen, from its checkpoint.
  held = _flat(stage2.objective.frozen['hypernet']['params'])
  for p in trained1:
    np.testing.assert_array_equal(held[p], _flat(base.params)[p])
  # Another architecture is refused, naming the key that differs.
  other = _config('id_clip')
  other.hypernet.param.num_id = 8
  other.train.init_from = str(trained['root'] / 'base')
  with pytest.raises(ValueError, match='hypernet.param.num_id: 4 there, 8 here'):
    objectives.build(other, jax.random.key(0))


def test_a_stage_records_the_step_it_starts_from(trained, tmp_path):
  """stages: train.init_from='stage:<name>' becomes that run's folder and its newest step
  (train.init_step, recorded); a stage that started from another step is moved aside."""
  config = _config('id_clip')
  config.train.init_from = 'stage:base'
  stage_dir = tmp_path / 'id_clip'
  stages._resolve_stages(config, str(trained['root']), str(stage_dir))  # pylint: disable=protected-access
  assert config.train.init_from == str(trained['root'] / 'base')
  assert config.train.init_step == 2
  record = json.loads((stage_dir / stages.INIT_RECORD).read_text())
  assert record == {'stage': str(trained['root'] / 'base'), 'step': 2}
  (stage_dir / stages.INIT_RECORD).write_text(json.dumps(dict(record, step=1)))
  config.train.init_from = 'stage:base'
  stages._resolve_stages(config, str(trained['root']), str(stage_dir))  # pylint: disable=protected-access
  assert (tmp_path / 'id_clip.stale-0' / stages.INIT_RECORD).exists()
  assert json.loads((stage_dir / stages.INIT_RECORD).read_text()) == record


def test_a_run_saved_with_the_old_init_key_restores_with_its_stage():
  """defaults.RENAMED: a config saved when the key was model.init_from starts from the
  same run (its frozen Base branch would otherwise be rebuilt at random)."""
  saved = _config('id_clip').to_dict()
  del saved['train']['init_from'], saved['train']['init_step']
  saved['model'].update(init_from='/runs/stage1', init_step=7)
  config = defaults.fill(ml_collections.ConfigDict(saved))
  assert (config.train.init_from, config.train.init_step) == ('/runs/stage1', 7)
  assert 'init_from' not in config.model


def test_three_conditions_reach_only_the_id_branch():
  """Stage 3's loss over a batch: every condition drawn, grads only where it trains."""
  config = _config('id_embed')
  objective = objectives.build(config, jax.random.key(0))
  rng = np.random.default_rng(0)
  inputs = _inputs()
  batch = objective.prepare(dict(inputs, id=np.arange(2), target=rng.uniform(
      -1, 1, (2, 32, 32, 3)), prompt=np.array([b'a red S* on a blue field', b'S*'])))
  batch = {k: (np.concatenate([v, v]) if not isinstance(v, tuple)
               else tuple(np.concatenate([x, x]) for x in v)) for k, v in batch.items()}
  loss, grads = loss_and_grads(objective, batch, 3)
  assert np.isfinite(loss)
  flat = _flat(grads)
  assert any(p.startswith('identity/') for p in flat)
  assert all(p.startswith(('identity/', 'id_decoder/id_', 'parameterization/id_'))
             or p == 'gamma_id' for p in flat)
  assert float(np.abs(flat['gamma_id'])) > 0
  empty = dict(inputs, set_mask=np.array([[True, True], [False, False]]), id=np.arange(2),
               target=np.zeros((2, 32, 32, 3)), prompt=np.array(['S*', 'S*']))
  with pytest.raises(ValueError, match=r'A set with zero images: examples \[1\]'):
    objective.prepare(empty)
  bad = _config('id_embed')
  bad.basis.conditions = (1.0, -1.0, 0.0)
  with pytest.raises(ValueError, match='basis.conditions'):
    objectives.build(bad, jax.random.key(0))


# ---------------------------------------------------------------- the slider
def test_slider_direction_moves_one_id_lora_to_the_other(trained, tmp_path):
  run = trained['id_clip']
  inputs = _inputs()
  a, b = ({k: v[i:i + 1] for k, v in inputs.items()} for i in (0, 1))
  ident = lambda x: runs.plain_loras(runs.lora(run, x, {'id': 1.0, 'base': 0.0}))[0]
  la, lb = ident(a), ident(b)
  out = str(tmp_path / 'slider')
  slider.write(run, a, b, out, ['S*'], [0.0, 1.0], num_steps=2, guidance=2.0)
  direction = load_file(os.path.join(out, 'slider.safetensors'))
  assert os.path.exists(os.path.join(out, 'grid.png'))
  tree = slider.direction(run, a, b)
  for p in la:
    np.testing.assert_allclose(la[p]['up'] @ la[p]['down'] + tree[p]['up'] @ tree[p]['down'],
                               lb[p]['up'] @ lb[p]['down'], rtol=1e-4, atol=2e-6)
  assert len(direction) == 2 * len(la)  # every layer's down and up in the file
  assert not hyperlora_basis.TRAINABLE['joint']  # 'joint' trains everything


# ---------------------------------------------------------------- configs
@pytest.mark.parametrize('size', ['cpu_sweep', 'gpu_sweep'])
def test_sweep_sizes_add_chains_of_other_conditions(size):
  c = quickstart_basis.get_config(size)
  mixes = quickstart_basis.SIZES[size]['conditions']
  clips = [n for n in c.stage_order if n.startswith('basis_id_clip')]
  assert [tuple(c.stages[n].basis.conditions) for n in clips] == list(mixes)
  assert {c.stages[n].train.init_from for n in clips} == {'stage:basis_base'}
  for _, run, _, _ in c.report.rows:  # every row's run is trained by the config
    assert all(stage in c.stage_order for stage in c.report.runs[run]), run


@pytest.mark.parametrize('make', [quickstart_basis.get_config, sd15_basis.get_config])
def test_stage_configs_chain_their_stages(make):
  c = make()
  chain = [n for n in c.stage_order if n.startswith('basis_')]
  assert [c.stages[n].basis.stage for n in chain] == ['base', 'id_clip', 'id_embed']
  for previous, name in zip(chain, chain[1:]):
    assert c.stages[name].train.init_from == f'stage:{previous}'
