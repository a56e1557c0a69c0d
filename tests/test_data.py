"""Builders and pipeline: broken inputs, host sharding, resuming."""

import json
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from hyperlora_jax import defaults
from hyperlora_jax.data import augment, builders
from hyperlora_jax.data import pipeline
from hyperlora_jax.data import synthetic

pytestmark = pytest.mark.xdist_group('data')  # one worker builds its fixtures

RED, BLUE = (200, 30, 30), (30, 30, 200)


def _config(tmp_path, **kw):
  data = defaults.get_config().data
  data.data_dir = str(tmp_path / 'tfds')
  data.num_threads = 2
  data.update(kw)
  return data


def _save(path, mode='RGB', color=RED, size=(24, 16), fmt=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new(mode, size, color).save(path, format=fmt)


def _paired_folder(root, bad=()):
  """Two good pairs, plus the bad cases named in `bad`; test split empty."""
  lines = []

  def pair(name, cloth_writer=None):
    cloth = root / 'train' / 'cloth' / f'{name}.jpg'
    (cloth_writer or (lambda p: _save(p, color=BLUE)))(cloth)
    _save(root / 'train' / 'image' / f'{name}.png', color=RED)
    lines.append(f'{name}.png {name}.jpg')

  pair('good0')
  pair('good1')
  if 'corrupt' in bad:
    pair('corrupt', lambda p: p.write_bytes(b'not an image'))
  if 'truncated' in bad:
    def truncated(p):
      _save(p, size=(64, 64))
      p.write_bytes(p.read_bytes()[:200])
    pair('truncated', truncated)
  if 'gray' in bad:
    pair('gray', lambda p: _save(p, 'L', 100, fmt='JPEG'))
  if 'rgba' in bad:
    def rgba(p):  # Left half transparent red, right half opaque blue.
      a = np.zeros((16, 24, 4), np.uint8)
      a[:, :12] = (*RED, 0)
      a[:, 12:] = (*BLUE, 255)
      Image.fromarray(a, 'RGBA').save(p, format='PNG')
    pair('rgba', rgba)
  if 'cmyk' in bad:
    pair('cmyk', lambda p: _save(p, 'CMYK', (0, 255, 255, 0), fmt='JPEG'))
  if 'missing' in bad:
    lines.append('missing.png missing.jpg')
  (root / 'train_pairs.txt').write_text('\n'.join(lines) + '\n')
  (root / 'test').mkdir()
  (root / 'test_pairs.txt').write_text('')
  (root / 'prompts.jsonl').write_text(json.dumps(
      {'context': 'good0.jpg', 'target': 'good0.png',
       'prompt': 'a woman in a park wearing S*'}) + '\n')
  return root


@pytest.mark.parametrize('bad,name', [
    ('corrupt', 'corrupt.jpg'), ('truncated', 'truncated.jpg'),
    ('missing', r'missing.jpg: file not found \(pair listed at .*pairs.txt:3'),
    ('gray', 'gray.jpg: mode L')])
def test_bad_example_is_an_error_naming_the_file(tmp_path, bad, name):
  root = _paired_folder(tmp_path / 'viton', bad=(bad,))
  (root / 'test_pairs.txt').write_text('good0.png good0.jpg\n')
  data = _config(tmp_path, name='paired', source_dir=str(root),
                 convert_modes=False)
  with pytest.raises(builders.BadExample, match=name):
    builders.build(data)


def test_empty_split_is_an_error(tmp_path):
  root = _paired_folder(tmp_path / 'viton')
  data = _config(tmp_path, name='paired', source_dir=str(root))
  with pytest.raises(builders.BadExample, match="split 'test'.*empty"):
    builders.build(data)


def test_skip_counts_bad_examples_and_converts_modes(tmp_path):
  bad = ('corrupt', 'truncated', 'missing', 'gray', 'rgba', 'cmyk')
  root = _paired_folder(tmp_path / 'viton', bad=bad)
  data = _config(tmp_path, name='paired', source_dir=str(root),
                 on_bad_example='skip', resolution=16, batch_size=2)
  builder = builders.build(data)
  assert set(builder.info.splits) == {'train'}  # The empty test split: out.
  meta = builder.info.metadata
  assert meta['skipped'] == {'train': 3}
  assert meta['converted'] == {'train': 3}
  assert meta['static_prompt'] == {'train': 4}
  with pytest.raises(ValueError, match='no split'):
    pipeline.create_dataset(data, 'test', process_index=0, process_count=1)

  batches = list(pipeline.create_dataset(
      data, 'train', process_index=0, process_count=1, num_epochs=1,
      shuffle=False))
  ex = {i: (b['context'][k], b['target'][k], b['prompt'][k])
        for b in batches for k, i in enumerate(b['id']) if b['valid'][k]}
  assert sorted(ex) == sorted(f'{n}.png {n}.jpg' for n in (
      'good0', 'good1', 'gray', 'rgba', 'cmyk'))
  to_pixels = lambda x: np.round((x + 1) * 127.5)
  context, target, prompt = ex['good0.png good0.jpg']
  assert context.shape == target.shape == (16, 16, 3)
  assert context.dtype == np.float32
  np.testing.assert_allclose(to_pixels(target),
                             np.broadcast_to(RED, target.shape))
  assert prompt == 'a woman in a park wearing S*'
  assert ex['good1.png good1.jpg'][2] == 'a person wearing S*'
  gray = to_pixels(ex['gray.png gray.jpg'][0])
  assert np.abs(gray - 100).max() <= 2  # JPEG.
  rgba = to_pixels(ex['rgba.png rgba.jpg'][0])
  # 24x16 -> 24x16 kept, center crop 16x16 = columns 4..19 of the original.
  np.testing.assert_allclose(rgba[:, :6], 255)  # Transparent -> white.
  np.testing.assert_allclose(rgba[:, 10:], np.broadcast_to(BLUE, (16, 6, 3)))
  cmyk = to_pixels(ex['cmyk.png cmyk.jpg'][0]).mean((0, 1))
  assert cmyk[0] > 200 and cmyk[1:].max() < 60  # C=0, M=Y=255: red.

  data.convert_modes = False
  data.data_dir = str(tmp_path / 'tfds2')
  meta = builders.build(data).info.metadata
  assert meta['skipped'] == {'train': 6} and meta['converted'] == {'train': 0}


def test_single_and_triples(tmp_path):
  single = tmp_path / 'faces'
  for split, n in (('train', 3), ('test', 2)):
    for i in range(n):
      _save(single / split / f'person{i}.png', color=(10 * i, 50, 50))
  data = _config(tmp_path, name='single', source_dir=str(single),
                 resolution=8, batch_size=4)
  (b,) = list(pipeline.create_dataset(
      data, 'test', process_index=0, process_count=1, num_epochs=1,
      shuffle=False))
  assert b['valid'].tolist() == [True, True, False, False]
  np.testing.assert_array_equal(b['context'], b['target'])
  assert set(b['prompt']) == {'a [V] face'}
  assert sorted(b['id'][:2]) == ['person0', 'person1']
  # One identity per image: its id, indexing the split's sorted identities.
  assert pipeline.subject_keys(data, 'test') == ('person0', 'person1')
  assert [pipeline.subject_keys(data, 'test')[s] for s in b['subject'][:2]] == list(b['id'][:2])

  triples = tmp_path / 'triples'
  for i in range(3):
    _save(triples / 'train' / f'ex{i}' / 'context.png', color=RED)
    _save(triples / 'train' / f'ex{i}' / 'target.jpg', color=BLUE)
  (triples / 'train' / 'ex0' / 'prompt.txt').write_text('a blue thing\n')
  (triples / 'train' / 'ex1' / 'target.jpg').unlink()
  data = _config(tmp_path, name='triples', source_dir=str(triples),
                 resolution=8, batch_size=2)
  with pytest.raises(builders.BadExample, match='ex1.*target'):
    builders.build(data)
  data.on_bad_example = 'skip'
  (b,) = list(pipeline.create_dataset(
      data, 'train', process_index=0, process_count=1, num_epochs=1,
      shuffle=False))
  prompts = dict(zip(b['id'], b['prompt']))
  assert prompts == {'ex0': 'a blue thing', 'ex2': 'a photo of S*'}


@pytest.fixture(scope='module')
def synthetic_data(tmp_path_factory):
  data = _config(tmp_path_factory.mktemp('syn'), num_train=37, num_test=11,
                 batch_size=4)
  builders.build(data)
  return data


@pytest.mark.parametrize('hosts', [1, 2])
def test_hosts_are_disjoint_and_complete(synthetic_data, hosts):
  seen, counts = [], []
  for p in range(hosts):
    batches = list(pipeline.create_dataset(
        synthetic_data, 'train', process_index=p, process_count=hosts,
        num_epochs=1))
    counts.append(len(batches))
    for b in batches:
      assert b['context'].shape == (4 // hosts, 32, 32, 3)
      seen.append(b['index'][b['valid']])
  seen = np.concatenate(seen)
  assert len(set(counts)) == 1  # Hosts step in lockstep.
  assert sorted(seen.tolist()) == list(range(37))  # Disjoint and complete.


def test_endless_host_reads_only_its_block(synthetic_data):
  it = pipeline.create_dataset(synthetic_data, 'train', process_index=1,
                               process_count=2)
  first = np.concatenate([next(it)['index'] for _ in range(20)])
  # Host 1 of 2 owns records 18..36: every epoch is a permutation of them.
  assert sorted(first[:19].tolist()) == list(range(18, 37))
  assert sorted(first[19:38].tolist()) == list(range(18, 37))
  assert first[:19].tolist() != first[19:38].tolist()  # Reshuffled.


def test_resume_mid_epoch(synthetic_data):
  it = pipeline.create_dataset(synthetic_data, 'train', process_index=0,
                               process_count=1)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(8)]  # Crosses the epoch boundary.
  resumed = pipeline.create_dataset(synthetic_data, 'train', process_index=0,
                                    process_count=1)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  fresh = next(pipeline.create_dataset(synthetic_data, 'train',
                                       process_index=0, process_count=1))
  assert not np.array_equal(fresh['index'], expected[0]['index'])


def test_worker_processes_give_the_same_batches_and_resume(synthetic_data, capfd):
  """... and stay as quiet as the main process (each worker's TFDS builder logged its
  "custom data configuration" before the workers hid the libraries' routine lines)."""
  data = synthetic_data.copy_and_resolve_references()
  data.num_workers = 2
  threads = pipeline.create_dataset(synthetic_data, 'train', process_index=0,
                                    process_count=1)
  want = [next(threads)['index'] for _ in range(12)]  # Crosses an epoch.
  workers = pipeline.create_dataset(data, 'train', process_index=0, process_count=1)
  got = [next(workers)['index'] for _ in range(5)]
  state = json.loads(json.dumps(workers.get_state()))
  resumed = pipeline.create_dataset(data, 'train', process_index=0, process_count=1)
  resumed.set_state(state)
  got += [next(resumed)['index'] for _ in range(7)]
  np.testing.assert_array_equal(np.stack(got), np.stack(want))
  assert 'custom data configuration' not in capfd.readouterr().err


def test_examples_carry_their_subject_and_the_target_can_be_the_context(synthetic_data):
  keys = pipeline.subject_keys(synthetic_data, 'train')
  assert list(keys) == sorted(set(keys)) and len(keys) > 20  # 37 examples, ~33 items
  data = synthetic_data.copy_and_resolve_references()
  data.context = 'target'
  seen = []
  for b in pipeline.create_dataset(data, 'train', process_index=0, process_count=1,
                                   num_epochs=1, shuffle=False):
    np.testing.assert_array_equal(b['context'], b['target'])
    for i in np.nonzero(b['valid'])[0]:
      item = synthetic.item_phrase(*(int(b[k][i]) for k in ('shape', 'color', 'pattern',
                                                             'color2')))
      assert b['identity'][i] == item == keys[b['subject'][i]]
      seen.append(int(b['index'][i]))
  records = pipeline.subject_records(synthetic_data, 'train')
  assert list(records) == list(keys)
  assert sorted(i for r in records.values() for i in r) == sorted(seen) == list(range(37))
  picked = pipeline.load_records(data, 'train', records[keys[0]])
  assert set(picked['identity']) == {keys[0]} and picked['subject'].tolist() == [0] * len(
      records[keys[0]])
  data.context = 'item'
  with pytest.raises(ValueError, match="data.context must be 'context' or 'target'"):
    pipeline.create_dataset(data, 'train', process_index=0, process_count=1)


def test_syntheticlist(synthetic_data):
  data = synthetic_data.copy_and_resolve_references()
  data.prompt = 'full'
  (*_, last) = batches = list(pipeline.create_dataset(
      data, 'test', process_index=0, process_count=1, num_epochs=1,
      shuffle=False))
  assert len(batches) == 3 and last['valid'].sum() == 3
  train_ids = set(synthetic.split_identities()[0])
  for b in batches:
    assert b['prompt'].tolist() == b['prompt_full'].tolist()
    assert all(p.endswith('wearing S*') for p in b['prompt_scene'])
    for i in range(4):
      ident = tuple(int(b[k][i]) for k in ('shape', 'color', 'pattern',
                                            'color2'))
      assert ident not in train_ids
      assert synthetic.color_and_pattern_of(b['target'][i], b['box'][i]) == (
          b['color'][i], b['pattern'][i])
      # Same pixels as the generator: PNG and normalization are lossless.
      ex = synthetic.example(int(b['id'][i]), 'test')
      np.testing.assert_array_equal(
          np.round((b['context'][i] + 1) * 127.5), ex['context'])


def test_item_frac_gets_its_own_data(synthetic_data, tmp_path):
  # The default keeps the name data had before item_frac existed: built data
  # (and the published quickstart runs' inputs) are reused unchanged.
  assert builders.synthetic_config(32, 4000, 200).name == 'r32_4d25893f26'
  assert builders.synthetic_config(
      32, 4000, 200, item_frac=synthetic.ITEM_FRAC).name == 'r32_4d25893f26'
  big = synthetic_data.copy_and_resolve_references()
  big.item_frac = 0.5
  default, other = builders.make_builder(synthetic_data), builders.build(big)
  assert other.data_path != default.data_path
  b = next(pipeline.create_dataset(big, 'test', process_index=0,
                                   process_count=1, num_epochs=1,
                                   shuffle=False))
  np.testing.assert_array_equal(b['box'][:, 2] - b['box'][:, 0], 16)
  for i in range(4):
    ex = synthetic.example(int(b['id'][i]), 'test', item_frac=0.5)
    np.testing.assert_array_equal(np.round((b['target'][i] + 1) * 127.5),
                                  ex['target'])
    assert synthetic.color_and_pattern_of(b['target'][i], b['box'][i]) == (
        b['color'][i], b['pattern'][i])
  # A config saved before the field existed reads the default's data.
  old = synthetic_data.copy_and_resolve_references()
  del old['item_frac']
  assert builders.make_builder(old).data_path == default.data_path


def test_build_cli(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'hyperlora_jax.data.pipeline',
       f'--data.data_dir={tmp_path}', '--data.num_train=6',
       '--data.num_test=2', '--data.batch_size=2'],
      capture_output=True, text=True, check=True, timeout=120,
      cwd=pathlib.Path(__file__).parents[1])
  assert 'train: 6 examples' in out.stdout
  assert 'context (2, 32, 32, 3) float32' in out.stdout


def test_augmented_contexts_are_seeded_and_resume(synthetic_data):
  """Training contexts vary in framing (not the targets); the draws follow the stream
  position, so a resumed run gets the same augmented batches and a new epoch new ones."""
  data = synthetic_data.copy_and_resolve_references()
  data.augment.p = 1.0
  make = lambda: pipeline.create_dataset(data, 'train', process_index=0, process_count=1,
                                         augment=True)
  plain = pipeline.create_dataset(synthetic_data, 'train', process_index=0, process_count=1)
  it = make()
  a, b = next(it), next(plain)
  np.testing.assert_array_equal(a['index'], b['index'])
  np.testing.assert_array_equal(a['target'], b['target'])
  assert np.abs(a['context'] - b['context']).mean() > 0.05
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(10)]  # Crosses the epoch boundary.
  resumed = make()
  resumed.set_state(state)
  for w in want:
    np.testing.assert_array_equal(next(resumed)['context'], w['context'])
  # The same record in the next epoch is drawn anew.
  first, later = {}, {}
  for batch in [a] + want:
    for i, ctx in zip(batch['index'], batch['context']):
      (later if int(i) in first else first).setdefault(int(i), ctx)
  repeated = sorted(set(first) & set(later))
  assert repeated and any(np.abs(first[i] - later[i]).max() > 0 for i in repeated)



def test_augment_draws():
  config = defaults.get_config().data.augment
  ex = synthetic.example(3, 'train', resolution=32)
  assert augment.context(ex['context'], np.random.default_rng(0), config) is ex['context']
  config.p = 1.0
  outs = [augment.context(ex['context'], np.random.default_rng(i), config)
          for i in range(20)]
  assert all(o.shape == (32, 32, 3) and o.dtype == np.uint8 for o in outs)
  np.testing.assert_array_equal(outs[0], augment.context(ex['context'],
                                                         np.random.default_rng(0), config))
  # Smaller, moved items: the share of item-colored pixels varies widely.
  item = synthetic.COLOR_RGB[ex['color']].astype(int)
  share = [np.mean(np.abs(o.astype(int) - item).max(-1) < 40) for o in outs]
  assert min(share) < 0.5 * max(share)
  # New backdrops: the corners are not always the generator's white.
  assert sum(np.abs(o[0, 0].astype(int) - 248).max() > 30 for o in outs) >= 5


def test_augment_zooms_in_above_scale_one():
  """scale > 1 enlarges a random window to the whole image: the item covers more of it
  than in any original context (whose item is at most 0.75 of the side)."""
  config = defaults.get_config().data.augment
  config.update(p=1.0, scale=(1.3, 1.3), background=0.0, jpeg=0.0, lowres=0.0)
  ex = synthetic.example(3, 'train', resolution=32)
  item = lambda im: np.mean(np.abs(im.astype(int) - 248).max(-1) > 40)  # not backdrop
  zoomed = [augment.context(ex['context'], np.random.default_rng(i), config)
            for i in range(10)]
  assert all(z.shape == (32, 32, 3) and z.dtype == np.uint8 for z in zoomed)
  assert min(item(z) for z in zoomed) > 1.3 * item(ex['context'])
  assert len({z.tobytes() for z in zoomed}) > 1  # Windows at random positions.
  config.scale = (1.0, 1.0)  # Neither shrunk nor zoomed: the context as it was.
  np.testing.assert_array_equal(
      augment.context(ex['context'], np.random.default_rng(0), config), ex['context'])


def _odd_images(folder):
  """Files whose pixels differ from a naive decode: EXIF-rotated, transparent, 16-bit."""
  folder.mkdir(parents=True, exist_ok=True)
  a = np.zeros((16, 24, 3), np.uint8)
  a[:, :8] = RED
  exif = Image.Exif()
  exif[0x0112] = 6  # Rotate 90 degrees clockwise when displayed.
  Image.fromarray(a).save(folder / 'rotated.jpg', exif=exif, quality=95)
  rgba = np.zeros((16, 16, 4), np.uint8)
  rgba[:, :8] = (*BLUE, 255)  # The right half is transparent: white when composited.
  Image.fromarray(rgba, 'RGBA').save(folder / 'transparent.png')
  gray16 = np.full((16, 16), 20000, np.uint16)  # 78 / 255, not clipped to white.
  Image.fromarray(gray16).save(folder / 'deep.png')


def test_sample_and_export_see_the_training_pixels(tmp_path):
  """One loader: a file given to sample/export (`images.load_images`) is exactly the
  pixels the input pipeline serves for it from the built dataset."""
  from hyperlora_jax.data import images  # pylint: disable=import-outside-toplevel
  _odd_images(tmp_path / 'src')
  data = _config(tmp_path, name='single', source_dir=str(tmp_path / 'src'), resolution=16)
  batch = next(pipeline.create_dataset(data, 'train', process_index=0, process_count=1,
                                       num_epochs=1, shuffle=False, batch_size=3))
  loaded, names = images.load_images(str(tmp_path / 'src'), 16)
  served = dict(zip(batch['id'], batch['context']))
  for name, pixels in zip(names, loaded):
    np.testing.assert_array_equal(pixels, served[name], err_msg=name)
  by_name = dict(zip(names, images.to_uint8(loaded)))
  assert abs(int(by_name['deep'][0, 0, 0]) - 78) <= 1
  assert (by_name['transparent'][:, 12:] == 255).all()
  rotated = by_name['rotated'][..., 0]  # The red left stripe, displayed on top.
  assert (rotated[:3] > 150).all() and (rotated[-3:] < 50).all()


def test_changed_source_folder_is_rebuilt(tmp_path, capfd):
  src = tmp_path / 'src'
  for i in range(2):
    _save(src / f'id{i}.png', color=RED)
  data = _config(tmp_path, name='single', source_dir=str(src), resolution=8)
  count = lambda: builders.build(data).info.splits['train'].num_examples
  assert count() == 2
  assert 'Unknown size' not in capfd.readouterr().out  # No TFDS download line for it.
  _save(src / 'id2.png', color=BLUE)  # Added.
  assert count() == 3
  _save(src / 'id0.png', color=BLUE, size=(30, 30))  # Replaced.
  batch = next(pipeline.create_dataset(data, 'train', process_index=0, process_count=1,
                                       num_epochs=1, shuffle=False, batch_size=3))
  first = dict(zip(batch['id'], batch['context']))['id0']
  assert first[0, 0, 2] > first[0, 0, 0]  # Blue now, not the red it was built with.


def test_condition_images_in_paired_and_triples_folders(tmp_path):
  """VITON-HD's openpose_img/ (its names) and triples' condition.*: read, resized to
  the target's size (counted), missing ones an error naming the file or skipped."""
  root = _paired_folder(tmp_path / 'viton')
  (root / 'test_pairs.txt').write_text('good0.png good0.jpg\n')
  for split in ('train', 'test'):
    for name in ('good0', 'good1')[:2 if split == 'train' else 1]:
      _save(root / split / 'image' / f'{name}.png', color=RED)
      _save(root / split / 'cloth' / f'{name}.jpg', color=BLUE)
  _save(root / 'train' / 'openpose_img' / 'good0_rendered.png', color=(0, 255, 0))
  data = _config(tmp_path, name='paired', source_dir=str(root), resolution=16,
                 batch_size=2)
  with pytest.raises(builders.BadExample, match=r'good1_rendered.png: file not found'):
    builders.build(data)
  # Half the target's size: resized to it, so the crop is the same as the target's.
  _save(root / 'train' / 'openpose_img' / 'good1_rendered.png', color=(0, 255, 0),
        size=(12, 8))
  _save(root / 'test' / 'openpose_img' / 'good0_rendered.png', color=(0, 255, 0))
  builder = builders.build(data)
  assert builder.info.metadata['resized'] == {'train': 1, 'test': 0}
  (b,) = list(pipeline.create_dataset(data, 'train', process_index=0, process_count=1,
                                      num_epochs=1, shuffle=False))
  assert b['condition'].shape == b['target'].shape == (2, 16, 16, 3)
  np.testing.assert_allclose(np.round((b['condition'] + 1) * 127.5),
                             np.broadcast_to((0, 255, 0), (2, 16, 16, 3)), atol=1)

  triples = tmp_path / 'triples'
  for i in range(3):
    _save(triples / 'train' / f'ex{i}' / 'context.png', color=RED)
    _save(triples / 'train' / f'ex{i}' / 'target.png', color=BLUE)
    if i != 1:
      _save(triples / 'train' / f'ex{i}' / 'condition.png', color=(0, 0, 0))
  data = _config(tmp_path, name='triples', source_dir=str(triples), resolution=8,
                 batch_size=2, on_bad_example='skip')
  builder = builders.build(data)
  assert builder.info.metadata['skipped'] == {'train': 1}  # ex1 has no condition.png
  (b,) = list(pipeline.create_dataset(data, 'train', process_index=0, process_count=1,
                                      num_epochs=1, shuffle=False))
  assert sorted(b['id']) == ['ex0', 'ex2'] and (b['condition'] == -1).all()


def test_posed_synthetic_data_is_opt_in(synthetic_data, tmp_path):
  default = builders.make_builder(synthetic_data)
  assert builders.synthetic_config(32, 4000, 200, pose=False).name == 'r32_4d25893f26'
  posed = synthetic_data.copy_and_resolve_references()
  posed.pose = True
  builder = builders.build(posed)
  assert builder.data_path != default.data_path
  assert 'condition' not in default.info.features and 'condition' in builder.info.features
  b = next(pipeline.create_dataset(posed, 'test', process_index=0, process_count=1,
                                   num_epochs=1, shuffle=False))
  for i in range(4):
    ex = synthetic.example(int(b['id'][i]), 'test', pose=True)
    for key in ('target', 'condition'):
      np.testing.assert_array_equal(np.round((b[key][i] + 1) * 127.5), ex[key])
    np.testing.assert_array_equal(b['pose'][i], ex['pose'])
  old = synthetic_data.copy_and_resolve_references()
  del old['pose']  # A config saved before the field existed reads the default's data.
  assert builders.make_builder(old).data_path == default.data_path


def test_styles_get_their_own_data_and_group_a_zoo(tmp_path):
  assert builders.synthetic_config(32, 4000, 200, styles=False).name == 'r32_4d25893f26'
  data = _config(tmp_path, num_train=40, num_test=8, resolution=16, styles=True)
  assert builders.make_builder(data).data_path != builders.make_builder(
      _config(tmp_path, num_train=40, num_test=8, resolution=16)).data_path
  batch = pipeline.load_records(data, 'train', range(40))
  styles = pipeline.subject_records(data, 'train', by='style')
  assert list(styles) == sorted(synthetic.STYLES[1:])
  for name, records in styles.items():
    assert {synthetic.STYLES[s] for s in batch['style'][records]} == {name}
  content = pipeline.subject_records(data, 'train', by='content')
  plain = [i for i in range(40) if batch['style'][i] == 0]
  assert sorted(i for r in content.values() for i in r) == plain
  for item, records in content.items():
    assert set(batch['identity'][records]) == {item}
  with pytest.raises(ValueError, match='data.styles=True'):
    pipeline.subject_records(_config(tmp_path, num_train=4, num_test=2, resolution=16),
                             'train', by='style')
