"""The synthetic task: ground truth agrees with pixels, held-out identities."""

import hashlib
import time

import numpy as np
import pytest

from hyperlora_jax.data import synthetic


# (resolution, item_frac): the default, and the CPU quickstart's larger item.
@pytest.mark.parametrize('resolution,item_frac', [
    (32, synthetic.ITEM_FRAC), (64, synthetic.ITEM_FRAC), (16, 0.7), (32, 0.5)])
def test_scorer_reads_ground_truth(resolution, item_frac):
  for split in synthetic.SPLITS:
    g = synthetic.generate(300, split, resolution=resolution,
                           item_frac=item_frac)
    # 16 px contexts (items of 10-12 px) are below what the scorer reads;
    # only generated targets are scored.
    images = (('target', 'box'),) + (
        (('context', 'context_box'),) if resolution >= 32 else ())
    for image, box in images:
      read = np.array([synthetic.color_and_pattern_of(g[image][i], g[box][i])
                       for i in range(300)])
      assert np.mean(read[:, 0] == g['color']) >= 0.99, (split, image)
      assert np.mean(read[:, 1] == g['pattern']) >= 0.99, (split, image)
      # Every pattern occurs, so the check above covers each rule.
      assert set(g['pattern'].tolist()) == set(range(len(synthetic.PATTERNS)))


def test_scorer_detects_wrong_items():
  g = synthetic.generate(40, 'train', resolution=32)
  for i in range(40):
    img, mask = g['target'][i].copy(), g['mask'][i]
    color = int(g['color'][i])
    other = (color + 1) % len(synthetic.COLORS)
    img[mask] = synthetic.COLOR_RGB[other]  # Right place, wrong solid item.
    assert synthetic.color_and_pattern_of(img, g['box'][i]) == (other, 0)
    empty = synthetic._scene(32, int(g['background'][i]),
                             int(g['position'][i]))
    assert synthetic.color_and_pattern_of(empty, g['box'][i]) == (-1, -1)
  # Float input in [-1, 1] reads like uint8.
  target = g['target'][0].astype(np.float32) / 127.5 - 1
  assert synthetic.color_and_pattern_of(target, g['box'][0]) == (
      g['color'][0], g['pattern'][0])


@pytest.mark.parametrize('resolution,item_frac', [(16, 0.7), (32, 0.5),
                                                  (32, synthetic.ITEM_FRAC)])
def test_item_occupies_the_configured_fraction(resolution, item_frac):
  g = synthetic.generate(60, 'test', resolution=resolution,
                         item_frac=item_frac)
  ref = synthetic.generate(60, 'test', resolution=resolution)
  side = round(item_frac * resolution)
  x0, y0, x1, y1 = g['box'].T
  np.testing.assert_array_equal(x1 - x0, side)
  np.testing.assert_array_equal(y1 - y0, side)
  assert (x0 >= 0).all() and (y0 >= 0).all()
  assert (x1 <= resolution).all() and (y1 <= resolution).all()
  for i in range(60):  # The item fills its box as its shape says.
    mask = g['mask'][i]
    assert mask.sum() == mask[y0[i]:y1[i], x0[i]:x1[i]].sum()
    assert mask.sum() == synthetic._item_masks(int(g['shape'][i]), 0,
                                               side)[0].sum()
  # Only the item's size changes: same items, scenes, contexts and prompts.
  for k in ('shape', 'color', 'pattern', 'color2', 'background', 'position',
            'context', 'prompt_full'):
    np.testing.assert_array_equal(g[k], ref[k])
  with pytest.raises(ValueError, match='item_frac'):
    synthetic.example(0, item_frac=0.0)


def test_held_out_identities():
  train, test = synthetic.split_identities()
  assert not set(train) & set(test)
  assert len(train) + len(test) == len(synthetic.identities())
  assert 0.15 < len(test) / len(synthetic.identities()) < 0.25
  for k, names in enumerate((synthetic.SHAPES, synthetic.COLORS,
                             synthetic.PATTERNS)):
    assert {x[k] for x in train} == set(range(len(names)))
  keys = ('shape', 'color', 'pattern', 'color2')
  for split, pool in (('train', train), ('test', test)):
    g = synthetic.generate(500, split)
    seen = set(zip(*(g[k].tolist() for k in keys)))
    assert seen <= set(pool), split
  assert set(synthetic.split_identities(holdout_seed=1)[1]) != set(test)


def test_deterministic_and_random_access():
  a = synthetic.generate(5, 'train', start=10, seed=3)
  b = synthetic.example(12, 'train', seed=3)
  np.testing.assert_array_equal(a['target'][2], b['target'])
  assert a['prompt_full'][2] == b['prompt_full']
  c = synthetic.generate(5, 'train', start=10, seed=4)
  assert not np.array_equal(a['context'], c['context'])


def test_ground_truth_mask_box_and_prompts():
  g = synthetic.generate(100, 'test', resolution=32)
  vocab = set(synthetic.vocabulary())
  item_words = set(synthetic.SHAPES) | set(synthetic.PATTERNS[1:])
  for i in range(100):
    x0, y0, x1, y1 = g['box'][i]
    ys, xs = np.nonzero(g['mask'][i])
    assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
    assert g['mask'][i].sum() == (g['mask'][i][y0:y1, x0:x1]).sum()
    item = synthetic.COLOR_RGB[[g['color'][i], max(g['color2'][i], 0)]]
    pixels = g['target'][i][g['mask'][i]]
    assert (pixels[:, None] == item[None]).all(-1).any(-1).all()
    scene, full = g['prompt_scene'][i], g['prompt_full'][i]
    assert scene.endswith('wearing S*') and not set(scene.split()) & item_words
    assert full.startswith(scene[:-2])
    assert synthetic.item_phrase(*(int(g[k][i]) for k in (
        'shape', 'color', 'pattern', 'color2'))) in full
    for p in (scene, full, g['prompt_static'][i]):
      assert set(synthetic.words(p)) <= vocab


def test_fast_enough():
  synthetic.generate(50, 'train')  # Warm the caches.
  t = time.perf_counter()
  synthetic.generate(1000, 'train', start=50)
  assert time.perf_counter() - t < 1.0  # ~5k/s on one CI core.


def test_robust_contexts_are_other_drawings_of_the_item():
  g = synthetic.generate(30, 'test', resolution=32)
  shares = []
  for i in range(30):
    item = tuple(int(g[k][i]) for k in ('shape', 'color', 'pattern', 'color2'))
    robust = synthetic.robust_context(i, *item, resolution=32)
    assert robust.shape == (32, 32, 3) and robust.dtype == np.uint8
    np.testing.assert_array_equal(robust, synthetic.robust_context(i, *item, resolution=32))
    assert np.abs(robust.astype(int) - g['context'][i]).mean() > 10
    # The item is there: pixels near its primary color (soft edges and JPEG allowed).
    near = np.abs(robust.astype(int) - synthetic.COLOR_RGB[item[1]]).max(-1) < 60
    assert near.sum() >= 3, i  # The smallest: a diamond at 30% of the side, JPEG'd.
    shares.append(near.mean())
  assert np.mean(shares) > 0.1


def test_robust_factors_say_how_the_context_was_drawn():
  """The item's side, backdrop and JPEG quality robust_factors reports are what the image
  shows, measured from the pixels of a solid square on flat and noise backdrops (a noise
  backdrop draws between the backdrop and the item: the draws after it must still line
  up)."""
  square = synthetic.SHAPES.index('square')
  draw = lambda i, color: synthetic.robust_context(i, square, color, 0, -1, resolution=64,
                                                   seed=1).astype(int)
  sides, qualities, kinds = [], [], []
  for i in range(200):
    f = synthetic.robust_factors(i, resolution=64, seed=1)
    assert 0.3 <= f.item_side <= 0.85
    assert synthetic.ROBUST_JPEG_QUALITY[0] <= f.jpeg_quality <= synthetic.ROBUST_JPEG_QUALITY[1]
    qualities.append(f.jpeg_quality)
    kinds.append(f.backdrop)
    first = draw(i, 0)
    border = np.concatenate([first[0], first[-1], first[:, 0], first[:, -1]])
    backdrop = np.median(border, 0)
    if f.backdrop == 1:
      continue  # A gradient has no one backdrop color to measure the item against.
    color = int(np.argmax(np.abs(synthetic.COLOR_RGB - backdrop).max(-1)))  # the far one
    contrast = np.abs(synthetic.COLOR_RGB[color] - backdrop).max()
    # Item pixels: past half the item's contrast (ringing and noise stay under).
    item = np.abs(draw(i, color) - backdrop).max(-1) > contrast / 2
    sides.append((np.sqrt(item.sum()) / 64, f.item_side))  # The square's area.
  sides = np.array(sides)
  assert len(sides) > 100 and set(kinds) == {0, 1, 2}
  np.testing.assert_allclose(sides[:, 0], sides[:, 1], atol=1.5 / 64)
  assert min(qualities) < 50 and max(qualities) > 80


# The sizes the configs use: the CPU quickstart, the tiny test, the GPU quickstart.
@pytest.mark.parametrize('resolution,item_frac', [
    (16, 0.7), (32, synthetic.ITEM_FRAC), (64, synthetic.ITEM_FRAC)])
def test_scene_scorer_reads_ground_truth_and_catches_other_scenes(resolution, item_frac):
  g = synthetic.generate(90, 'test', resolution=resolution, item_frac=item_frac)
  size = int(round(item_frac * resolution))
  truth = np.stack([g['background'], g['position']], 1)
  read = np.array([synthetic.scene_of(t, size) for t in g['target']])
  np.testing.assert_array_equal(read, truth)
  assert set(g['background'].tolist()) == set(range(len(synthetic.BACKGROUNDS)))
  assert set(g['position'].tolist()) == set(range(len(synthetic.POSITIONS)))
  rng = np.random.default_rng(0)  # Noise a generated image may have: still read.
  noisy = np.clip(g['target'] + rng.normal(0, 25, g['target'].shape), 0, 255)
  noisy = noisy.astype(np.uint8)
  assert np.mean([synthetic.scene_of(t, size) == tuple(x)
                  for t, x in zip(noisy, truth)]) >= 0.97
  # The same items in other scenes: what moved reads as moved, the rest stays.
  for i in range(90):
    item = tuple(int(g[k][i]) for k in ('shape', 'color', 'pattern', 'color2'))
    background, position = truth[i]
    other_bg = (background + 1 + i % 4) % len(synthetic.BACKGROUNDS)
    other_pos = (position + 1 + i % 2) % len(synthetic.POSITIONS)
    for bg, pos in ((other_bg, position), (background, other_pos)):
      image = synthetic.target_image(item, bg, pos, resolution, size)[0]
      assert synthetic.scene_of(image, size) == (bg, pos), (i, bg, pos)
  # Float input in [-1, 1] reads like uint8; an empty scene has a background only.
  assert synthetic.scene_of(g['target'][0] / 127.5 - 1, size) == tuple(truth[0])
  blank = np.broadcast_to(synthetic.BACKGROUND_RGB[2], (resolution, resolution, 3))
  assert synthetic.scene_of(blank, size) == (2, -1)


def test_examples_without_pose_keep_their_bytes():
  """Pose is opt-in: by default every example is byte for byte what it was before pose
  existed (the digest of these examples, computed before pose was added), so every
  built dataset and published result stays valid."""
  digest = hashlib.sha256()
  for split in synthetic.SPLITS:
    for resolution, item_frac in ((16, 0.7), (32, synthetic.ITEM_FRAC),
                                  (64, synthetic.ITEM_FRAC)):
      for i in range(50):
        ex = synthetic.example(i, split, resolution=resolution, item_frac=item_frac)
        for k in sorted(ex):
          digest.update(k.encode())
          digest.update(ex[k].encode() if isinstance(ex[k], str)
                        else np.ascontiguousarray(ex[k]).tobytes())
  assert digest.hexdigest() == (
      'c242e344d5ddb95884e3020bf3ba6415d5a1ef4446110afb1df5c966377dafd6')


# The Table 1 sizes: its CPU run, the tiny test's, the GPU run's.
@pytest.mark.parametrize('resolution,item_frac', [(24, 0.46), (32, synthetic.ITEM_FRAC),
                                                  (64, synthetic.ITEM_FRAC)])
def test_pose_is_drawn_unsaid_and_read_back(resolution, item_frac):
  n = 200
  posed = synthetic.generate(n, 'test', resolution=resolution, item_frac=item_frac,
                             pose=True)
  plain = synthetic.generate(n, 'test', resolution=resolution, item_frac=item_frac)
  # The same items, scenes, contexts and prompts: only the figure moves.
  for k in ('shape', 'color', 'pattern', 'color2', 'background', 'position', 'context',
            'prompt_scene', 'prompt_full'):
    np.testing.assert_array_equal(posed[k], plain[k])
  dx, dy, scale = posed['pose'].T
  assert (np.abs(dx) <= synthetic.POSE_SHIFT[0]).all() and dx.std() > 0.03
  assert (np.abs(dy) <= synthetic.POSE_SHIFT[1]).all()
  assert (scale >= synthetic.POSE_SCALE[0]).all() and (scale <= synthetic.POSE_SCALE[1]).all()
  size = round(item_frac * resolution)
  chance, moved = [], []
  for i in range(n):
    target, box = posed['target'][i], posed['box'][i]
    assert box[2] - box[0] == size  # The item keeps its size: read exactly.
    assert synthetic.color_and_pattern_of(target, box) == (posed['color'][i],
                                                           posed['pattern'][i])
    assert synthetic.scene_of(target, size) == (posed['background'][i], posed['position'][i])
    # The pose map is the figure's silhouette: white exactly where the figure's gray is
    # or the item covers it.
    white = (posed['condition'][i] == 255).all(-1)
    figure = (target == synthetic.FIGURE_RGB).all(-1)
    assert (white | ~figure).all() and (white & ~figure <= posed['mask'][i]).all()
    assert synthetic.pose_adherence(target, target) == (True, 0.0)
    # Redrawn from the stored float32 pose (evaluation's edit modes do): the same pixels.
    item = [int(posed[k][i]) for k in ('shape', 'color', 'pattern', 'color2')]
    again = synthetic.target_image(item, int(posed['background'][i]),
                                   int(posed['position'][i]), resolution, size,
                                   tuple(float(v) for v in posed['pose'][i]))[0]
    np.testing.assert_array_equal(again, target)
    # The figure of another example's pose, or of none: rarely within the tolerance.
    other = synthetic.target_image(item, int(posed['background'][i]),
                                   int(posed['position'][i]), resolution, size,
                                   tuple(posed['pose'][(i + 1) % n]))[0]
    chance.append(synthetic.pose_adherence(other, target)[0])
    moved.append(synthetic.pose_adherence(plain['target'][i], target)[0])
  assert np.mean(chance) < 0.25 and np.mean(moved) < 0.25, (np.mean(chance), np.mean(moved))
  assert synthetic.pose_adherence(np.full_like(target, 248), target) == (False, 1.0)


@pytest.mark.parametrize('resolution,item_frac', [(16, 0.7), (32, synthetic.ITEM_FRAC),
                                                  (64, synthetic.ITEM_FRAC)])
def test_style_scorer_reads_every_style_and_ignores_content(resolution, item_frac):
  # Every item in every style at every position, the edge-touching positions included:
  # the frame is read back, and the item is still read inside its box.
  size = int(round(item_frac * resolution))
  for item in synthetic.identities()[::7]:
    for position in range(len(synthetic.POSITIONS)):
      target, _, box = synthetic.target_image(item, position % 5, position, resolution, size)
      for style in range(len(synthetic.STYLES)):
        framed = synthetic.frame(target, style)
        assert synthetic.style_of(framed) == style, (item, position, style)
        assert synthetic.color_and_pattern_of(framed, box)[0] == item[1]
  # Content in a frame's place is not a style: an item filling the whole image, or a
  # ring of each item color, reads as plain.
  for color in range(len(synthetic.COLORS)):
    assert synthetic.style_of(np.broadcast_to(synthetic.COLOR_RGB[color],
                                              (resolution, resolution, 3))) == 0


def test_styles_are_opt_in_and_change_only_the_target():
  for i in range(20):
    plain, styled = synthetic.example(i, 'train'), synthetic.example(i, 'train', styled=True)
    assert 'style' not in plain
    for k, v in plain.items():
      if k != 'target':
        assert np.array_equal(v, styled[k]) if not isinstance(v, str) else v == styled[k]
    np.testing.assert_array_equal(synthetic.frame(plain['target'], int(styled['style'])),
                                  styled['target'])
  g = synthetic.generate(200, 'train', resolution=32, styled=True)
  assert set(g['style'].tolist()) == set(range(len(synthetic.STYLES)))
  assert [synthetic.style_of(t) for t in g['target']] == g['style'].tolist()
