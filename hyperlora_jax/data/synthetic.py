"""Synthetic recontextualization task (the analogue of garment -> model).

Context image: one item (shape, primary color, pattern, pattern color) alone
on a plain white background, large. Target image: a scene (background color,
a gray figure on the left / in the center / on the right) in which the figure
wears the same item, smaller, on its torso. The target's pattern is drawn in
the item's own coordinates, so it is the same texture at a smaller scale.

Prompts (one example):
  scene  "a figure on the left, pink background, wearing S*"   (no item words)
  static "a figure wearing S*"                                (first stage)
  full   "a figure on the left, pink background, wearing a red circle with
          blue stripes"                                       (oracle / base)

Pose (opt-in, `example(..., pose=True)`; a data config key, off by default so every
dataset built before it keeps its bytes): the figure's exact offset and size are drawn
from a continuous range that no prompt mentions (`pose_of`), the item moves with the
torso (its size stays, so it is read as exactly), and the example gains a pose map,
the figure's silhouette ('condition'), which a ControlNet reads. `pose_of_image` reads
the figure's center and size back from pixels; `pose_adherence` compares two readings
within `POSE_TOLERANCE`.

Item identities are the attribute combinations (shape, color, pattern,
color2); a seeded subset is held out: the 'test' split only has held-out
identities and 'train' never has them, so test measures adaptation to new
context images (each attribute value on its own is still seen in training).

Every example is a pure function of (seed, split, index), so any range of a
split can be generated independently and adding examples never changes the
earlier ones. Rendering is aliasing-free (hard edges, exact palette colors),
which makes `color_and_pattern_of` (the item) and `scene_of` (background and
figure position, the editability scorer) read ground-truth pixels back exactly.
Every item has a border of its primary color, so the primary color covers
most of the item for every pattern (checks are 50/50 inside the border):
"dominant color" is well defined.

Styles (opt-in, `example(..., styled=True)`; `data.styles` in a config): a frame of one
of `STYLES`' colors around the whole target ('plain': none), drawn over everything, of
width R/8. It is the rendering a style LoRA teaches: global, the same for every item and
scene, and orthogonal to the content (the item's color and pattern, read inside its
box; a frame pixel there is ignored by that reading). `style_of` reads it back from the
outer ring. The style is drawn from its own random stream, so a styled example has the
same item, scene and context as the unstyled one of that index, and unstyled data is
byte-identical to data built before styles existed. Held-out content-style pairs: the
test split's items are never in train, in any style.

No textures from package images: none ship with what is installed (no
scikit-image) and the scorer's exact-palette guarantee would be lost.
"""

import functools
import itertools
from typing import NamedTuple, Optional

import numpy as np

SHAPES = ('square', 'circle', 'triangle', 'diamond')
COLORS = ('red', 'orange', 'yellow', 'green', 'cyan', 'blue', 'purple',
          'black')
COLOR_RGB = np.array([(220, 40, 40), (245, 140, 20), (240, 220, 40),
                      (40, 160, 60), (30, 190, 200), (40, 70, 220),
                      (140, 50, 180), (30, 30, 30)], np.uint8)
PATTERNS = ('solid', 'stripes', 'dots', 'checks')
# Scene colors are pale (and the figure gray) so that no scene pixel is near
# an item color: the scorer separates item from scene by nearest color.
BACKGROUNDS = ('white', 'beige', 'pink', 'light blue', 'mint')
BACKGROUND_RGB = np.array([(248, 248, 248), (235, 220, 185), (250, 195, 210),
                           (170, 205, 240), (190, 240, 200)], np.uint8)
FIGURE_RGB = np.array((120, 120, 120), np.uint8)
POSITIONS = ('left', 'center', 'right')
_POSITION_PHRASE = ('on the left', 'in the center', 'on the right')
_POSITION_X = (0.22, 0.5, 0.78)  # Figure center, fraction of the width.
# Frame colors far (>= 120 in RGB) from every item, scene and figure color and from
# each other, so a frame pixel never reads as content and the styles never as each other.
STYLES = ('plain', 'magenta frame', 'lime frame', 'rose frame')
STYLE_RGB = np.array([(0, 0, 0), (255, 0, 255), (120, 255, 0), (255, 90, 150)], np.uint8)
CONTEXT_BACKGROUND = 0  # White, like product photos.
TOKEN = 'S*'
STATIC_PROMPT = f'a figure wearing {TOKEN}'
SPLITS = ('train', 'test')

ITEM_FRAC = 0.34  # Default item side in the target, fraction of the resolution.
CONTEXT_SIDE = (0.6, 0.75)  # The item's side in a context (`example`), its range.
_BORDER = 0.25  # Border width in item units (the item spans [-1, 1]).
_CELLS = 5  # Stripes / checks cells across the item.
# Dot centers per shape, placed so that whole dots fit inside the border and
# stay > 1 px apart at R=32 (a clipped dot would read as another pattern).
_DOTS = (((-.35, -.35), (.35, -.35), (-.35, .35), (.35, .35)),
         ((-.35, -.35), (.35, -.35), (-.35, .35), (.35, .35)),
         ((0, -.05), (-.3, .45), (.3, .45)),
         ((0, -.4), (-.4, 0), (.4, 0), (0, .4)))
_DOT_RADIUS = 0.18
# Pose: the figure's size (a factor on the unposed figure, about its center) and the
# offset of its center (fraction of the side, each axis within +-), drawn per example.
POSE_SCALE = (0.6, 1.0)
POSE_SHIFT = (0.1, 0.05)
_PIVOT_Y = 0.5  # The figure scales about (its position's x, this y).
# Pose adherence: the figure-and-item pixels' center within this fraction of the side of
# the truth's, and their vertical spread (std) within this fraction of the truth's.
POSE_TOLERANCE = dict(center=0.06, size=0.1)


# Item colors, scene colors, the figure, then the frames (after the figure: a pixel
# nearest a frame color is neither item nor scene for the readers).
_PALETTE = np.concatenate(
    [COLOR_RGB, BACKGROUND_RGB, FIGURE_RGB[None], STYLE_RGB[1:]]).astype(np.int32)
_FIGURE = len(COLORS) + len(BACKGROUNDS)  # The figure's gray in the palette.
_FRAMES = _FIGURE + 1  # The first frame color's label (style 1).


def identities():
  """All item identities (shape, color, pattern, color2); color2=-1 if solid."""
  out = []
  for s, c, p in itertools.product(range(len(SHAPES)), range(len(COLORS)),
                                   range(len(PATTERNS))):
    if p == 0:
      out.append((s, c, 0, -1))
    else:
      out.extend((s, c, p, c2) for c2 in range(len(COLORS)) if c2 != c)
  return out


@functools.lru_cache(maxsize=None)
def split_identities(holdout_seed=0, test_fraction=0.2):
  """Returns (train, test) identity tuples; test is a seeded held-out subset.

  Redraws (deterministically) until every attribute value occurs in train,
  so test items are new combinations of seen attributes, never unseen words.
  """
  ids = identities()
  n_test = int(round(test_fraction * len(ids)))
  rng = np.random.default_rng(holdout_seed)
  while True:
    test = set(rng.choice(len(ids), n_test, replace=False).tolist())
    train = tuple(x for i, x in enumerate(ids) if i not in test)
    seen = [set(col) for col in zip(*train)]
    if all(len(seen[k]) >= n for k, n in enumerate(
        (len(SHAPES), len(COLORS), len(PATTERNS)))):
      return train, tuple(ids[i] for i in sorted(test))


def item_phrase(shape, color, pattern, color2):
  """'a red circle', 'an orange circle with blue stripes'."""
  article = 'an' if COLORS[color][0] in 'aeiou' else 'a'
  words = f'{article} {COLORS[color]} {SHAPES[shape]}'
  if pattern:
    words += f' with {COLORS[color2]} {PATTERNS[pattern]}'
  return words


def prompts(shape, color, pattern, color2, background, position):
  """The three prompts of one example: scene, static, full."""
  scene = (f'a figure {_POSITION_PHRASE[position]}, '
           f'{BACKGROUNDS[background]} background, wearing')
  return {
      'prompt_scene': f'{scene} {TOKEN}',
      'prompt_static': STATIC_PROMPT,
      'prompt_full': f'{scene} {item_phrase(shape, color, pattern, color2)}',
  }


def words(prompt):
  """The word-level tokenization the vocabulary is built with."""
  return prompt.lower().replace(',', ' , ').split()


def vocabulary():
  """Sorted list of every word of every prompt (for a word-level tokenizer)."""
  vocab = set()
  for ident in identities():
    for bg, pos in itertools.product(range(len(BACKGROUNDS)),
                                     range(len(POSITIONS))):
      for p in prompts(*ident, bg, pos).values():
        vocab.update(words(p))
  return sorted(vocab)


def _shape_mask(shape, u, v):
  """Inside test in item coordinates, u to the right and v down, in [-1, 1]."""
  if shape == 0:
    return (np.abs(u) <= 1) & (np.abs(v) <= 1)
  if shape == 1:
    return u * u + v * v <= 1
  if shape == 2:  # Apex up, base at the bottom.
    return (np.abs(u) <= (v + 1) / 2) & (v <= 1)
  return np.abs(u) + np.abs(v) <= 1


# Bounded: at R=512 one entry is ~0.3 MB and sizes vary with R.
@functools.lru_cache(maxsize=256)
def _item_masks(shape, pattern, size):
  """(item, pattern color) masks [size, size] of one item; read-only."""
  # Pixel centers in item units.
  t = (np.arange(size) + 0.5) / size * 2 - 1
  v, u = np.meshgrid(t, t, indexing='ij')
  mask = _shape_mask(shape, u, v)
  inner = _shape_mask(shape, u / (1 - _BORDER), v / (1 - _BORDER))
  cu = np.floor((u + 1) / 2 * _CELLS).astype(int)
  cv = np.floor((v + 1) / 2 * _CELLS).astype(int)
  if pattern == 1:
    second = cv % 2 == 1
  elif pattern == 2:
    second = np.any([(u - du)**2 + (v - dv)**2 <= _DOT_RADIUS**2
                     for du, dv in _DOTS[shape]], axis=0)
  elif pattern == 3:
    second = (cu + cv) % 2 == 1
  else:
    second = np.zeros_like(mask)
  second &= inner
  mask.setflags(write=False)
  second.setflags(write=False)
  return mask, second


def _figure(resolution, position, pose=None):
  """The figure's mask [R, R] (head, torso, legs) at `position`, posed by `pose`
  (dx, dy, scale: `pose_of`) or as drawn without one."""
  r = resolution
  y, x = (np.mgrid[0:r, 0:r] + 0.5) / r
  cx = _POSITION_X[position]
  if pose is not None:  # Each pixel's place on the unposed figure.
    dx, dy, scale = pose
    x, y = cx + (x - cx - dx) / scale, _PIVOT_Y + (y - _PIVOT_Y - dy) / scale
  head = (x - cx)**2 + (y - 0.17)**2 <= 0.08**2
  torso = (np.abs(x - cx) <= 0.15) & (y >= 0.27) & (y <= 0.72)
  legs = ((np.abs(np.abs(x - cx) - 0.075) <= 0.045) & (y > 0.72)
          & (y <= 0.95))
  return head | torso | legs


@functools.lru_cache(maxsize=64)
def _scene(resolution, background, position, pose=None):
  """Background plus figure (head, torso, legs), read-only [R, R, 3]."""
  r = resolution
  img = np.broadcast_to(BACKGROUND_RGB[background], (r, r, 3)).copy()
  img[_figure(r, position, pose)] = FIGURE_RGB
  img.setflags(write=False)
  return img


def pose_map(resolution, position, pose=None):
  """The pose map of a target: the figure's silhouette, white on black [R, R, 3] uint8
  (what a ControlNet is given; the item is not on it)."""
  out = np.zeros((resolution, resolution, 3), np.uint8)
  out[_figure(resolution, position, pose)] = 255
  return out


def pose_of(index, split='train', seed=0):
  """Example `index`'s pose (dx, dy, scale), from a random stream of its own (so an
  example's item, scene and context are the same with and without pose)."""
  rng = np.random.default_rng([seed, SPLITS.index(split), index, 7])
  dx, dy = (rng.uniform(-s, s) for s in POSE_SHIFT)
  # float32 values: the data stores them so, and a target redrawn from them is the same.
  return tuple(float(np.float32(v)) for v in (dx, dy, rng.uniform(*POSE_SCALE)))


def _paste(canvas, shape, color, pattern, color2, size, x0, y0):
  """Draws the item with its box's top-left at (x0, y0); returns its mask."""
  mask, second = _item_masks(shape, pattern, size)
  region = canvas[y0:y0 + size, x0:x0 + size]
  region[mask] = COLOR_RGB[color]
  region[second] = COLOR_RGB[color2]  # Empty when solid (color2 = -1).
  full = np.zeros(canvas.shape[:2], bool)
  full[y0:y0 + size, x0:x0 + size] = mask
  return full


def item_box(position, resolution, size, pose=None):
  """(x0, y0, x1, y1), end-exclusive: the box of an item of side `size` on the
  figure's torso at `position` (moved with it by `pose`; its size stays, so the
  scorer reads it as well at every pose), moved inward where it would leave the
  image."""
  cx, cy = _POSITION_X[position], 0.47
  if pose is not None:
    dx, dy, scale = pose
    cx, cy = cx + dx, _PIVOT_Y + scale * (cy - _PIVOT_Y) + dy
  x0 = min(max(int(round(cx * resolution - size / 2)), 0), resolution - size)
  y0 = min(max(int(round(cy * resolution - size / 2)), 0), resolution - size)
  return x0, y0, x0 + size, y0 + size


def target_image(item, background, position, resolution, size, pose=None):
  """A target: the scene (`background`, `position`, `pose`: `pose_of`, or None) with
  its figure wearing `item` (shape, color, pattern, color2), of side `size`.

  Returns (image [R, R, 3] uint8, item mask [R, R] bool, box [4] int32).
  """
  box = item_box(position, resolution, size, pose)
  image = _scene(resolution, background, position, pose).copy()
  mask = _paste(image, *item, size, box[0], box[1])
  return image, mask, np.array(box, np.int32)


def example(index, split='train', *, resolution=32, seed=0, holdout_seed=0,
            test_fraction=0.2, item_frac=ITEM_FRAC, pose=False, styled=False):
  """Example `index` of `split`: a dict of numpy arrays and prompt strings.

  `item_frac` is the item's side in the target as a fraction of the resolution
  (the figure's torso is 0.3 wide): a larger item is a larger share of the
  target's pixels, so of the diffusion loss. The box is kept inside the image
  (it moves inward at the left / right positions above 0.44); the random draws
  do not depend on it, so the same index has the same item, scene and context.

  Keys: 'context', 'target' [R, R, 3] uint8; 'mask' [R, R] bool (item pixels
  in the target); 'box' [4] int32 (x0, y0, x1, y1), the item's pixel box in
  the target, end-exclusive; 'context_box' likewise in the context;
  'shape', 'color', 'pattern', 'color2' (-1 if solid), 'background',
  'position' int32 ids into SHAPES, COLORS, ...; the three prompts (see
  `prompts`). With `pose`: the figure posed by `pose_of` (the prompts do not change),
  and 'pose' float32 [3] (dx, dy, scale), 'condition' [R, R, 3] uint8 (`pose_map`).
  With `styled`: 'style' int32 into STYLES (uniform, its own random
  stream), the target framed by `frame`; the context is never framed.
  """
  r = resolution
  if not 0 < item_frac <= 1:
    raise ValueError(f'item_frac must be in (0, 1], got {item_frac}')
  ident_pool = split_identities(holdout_seed, test_fraction)[
      SPLITS.index(split)]
  rng = np.random.default_rng([seed, SPLITS.index(split), index])
  shape, color, pattern, color2 = ident_pool[rng.integers(len(ident_pool))]
  background = int(rng.integers(len(BACKGROUNDS)))
  position = int(rng.integers(len(POSITIONS)))

  size_c = int(round(rng.uniform(*CONTEXT_SIDE) * r))
  jitter = np.round(rng.uniform(-0.05, 0.05, 2) * r).astype(int)
  cx0, cy0 = np.clip((r - size_c) // 2 + jitter, 0, r - size_c)
  context = np.broadcast_to(BACKGROUND_RGB[CONTEXT_BACKGROUND],
                            (r, r, 3)).copy()
  item = (shape, color, pattern, color2)
  _paste(context, *item, size_c, cx0, cy0)

  posed = pose_of(index, split, seed) if pose else None
  target, mask, box = target_image(item, background, position, r,
                                   int(round(item_frac * r)), posed)
  if styled:
    style = int(np.random.default_rng([seed, SPLITS.index(split), index, 1]).integers(
        len(STYLES)))
    target = frame(target, style)
  out = {
      'context': context, 'target': target, 'mask': mask, 'box': box,
      'context_box': np.array([cx0, cy0, cx0 + size_c, cy0 + size_c],
                              np.int32),
  }
  attrs = dict(shape=shape, color=color, pattern=pattern, color2=color2,
               background=background, position=position)
  out.update({k: np.int32(v) for k, v in attrs.items()})
  out.update(prompts(**attrs))
  if pose:
    out.update(pose=np.array(posed, np.float32), condition=pose_map(r, position, posed))
  if styled:
    out['style'] = np.int32(style)
  return out


def frame_width(resolution):
  return max(1, resolution // 8)


def frame(image, style):
  """`image` [R, R, 3] uint8 in `style`: a frame of its color over the outer ring."""
  if not style:
    return image
  out = np.array(image)
  w = frame_width(out.shape[0])
  ring = np.ones(out.shape[:2], bool)
  ring[w:-w, w:-w] = False
  out[ring] = STYLE_RGB[style]
  return out


def subject_render(item, rng, resolution, occlude=0.0):
  """Another picture of an item, for a subject's set of context images: on white, its
  side 45-80% of the image, anywhere in the frame; with probability `occlude` a
  rectangle of a random color covers 25-50% of it (so one picture may mislead where
  several agree). Returns (image [R, R, 3] uint8, box [4] int32 of the whole item)."""
  r = resolution
  size = max(2, int(round(rng.uniform(0.45, 0.8) * r)))
  x0, y0 = (int(v) for v in rng.integers(0, r - size + 1, 2))
  image = np.broadcast_to(BACKGROUND_RGB[CONTEXT_BACKGROUND], (r, r, 3)).copy()
  _paste(image, *item, size, x0, y0)
  if rng.random() < occlude:
    w, h = (max(1, int(round(f * size))) for f in rng.uniform(0.5, 0.7, 2))
    ox, oy = x0 + int(rng.integers(0, size - w + 1)), y0 + int(rng.integers(0, size - h + 1))
    image[oy:oy + h, ox:ox + w] = rng.integers(0, 256, 3)
  return image, np.array([x0, y0, x0 + size, y0 + size], np.int32)


def generate(num, split='train', *, start=0, **kwargs):
  """Examples start..start+num-1 of `split`, stacked; kwargs as `example`."""
  exs = [example(i, split, **kwargs) for i in range(start, start + num)]
  return {k: [e[k] for e in exs] if isinstance(exs[0][k], str)
          else np.stack([e[k] for e in exs]) for k in exs[0]}


def _item_polygon(shape, cx, cy, half):
  """The item outline as PIL points, or None for the circle (an ellipse)."""
  if shape == 0:
    return [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half),
            (cx - half, cy + half)]
  if shape == 2:
    return [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
  if shape == 3:
    return [(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)]
  return None


def _draw_item(draw, shape, cx, cy, half, fill):
  polygon = _item_polygon(shape, cx, cy, half)
  if polygon is None:
    draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=fill)
  else:
    draw.polygon(polygon, fill=fill)


ROBUST_BACKDROPS = ('flat', 'gradient', 'noise')  # robust_context's backdrop kinds
ROBUST_JPEG_QUALITY = (40, 90)  # robust_context's JPEG qualities, both ends drawn


class _RobustLayout(NamedTuple):
  """What `robust_context` drew for one example, at 4x the resolution (`big` pixels)."""
  backdrop: int  # into ROBUST_BACKDROPS
  colors: np.ndarray  # [2, 3]: the flat color, or the gradient's two ends
  noise: Optional[np.ndarray]  # [big, big, 3] (noise backdrops)
  half: float  # the item's half side, pixels
  center: np.ndarray  # [2] (x, y), pixels
  jpeg_quality: int


def _robust_layout(index, big, seed) -> _RobustLayout:
  rng = np.random.default_rng([seed, 7919, index])
  backdrop = int(rng.integers(3))
  colors = rng.integers(0, 256, (2, 3))
  noise = rng.normal(0, 25, (big, big, 3)) if backdrop == 2 else None
  half = rng.uniform(0.15, 0.425) * big
  center = rng.uniform(half, big - half, 2)
  quality = int(rng.integers(ROBUST_JPEG_QUALITY[0], ROBUST_JPEG_QUALITY[1] + 1))
  return _RobustLayout(backdrop, colors, noise, half, center, quality)


class RobustFactors(NamedTuple):
  """How `robust_context` framed one example."""
  item_side: float  # the item's side, fraction of the image's (0.3-0.85)
  backdrop: int  # into ROBUST_BACKDROPS
  jpeg_quality: int  # in ROBUST_JPEG_QUALITY


@functools.lru_cache(maxsize=4096)  # A report asks once per row for the same examples.
def robust_factors(index, *, resolution=32, seed=0) -> RobustFactors:
  """How `robust_context` framed example `index`, so a report can say which framing a
  hypernetwork loses on."""
  big = resolution * 4
  layout = _robust_layout(index, big, seed)
  return RobustFactors(2 * layout.half / big, layout.backdrop, layout.jpeg_quality)


def robust_context(index, shape, color, pattern, color2, *, resolution=32, seed=0):
  """A context image of the item drawn as a user's photo might show it: the robustness
  split's contexts (`evaluate`), by drawing code of their own.

  Unlike `example`'s contexts (hard-edged masks, large, centered, on white), the item
  is drawn with PIL's vector primitives at 4x and downsampled (soft edges), at 30-85% of
  the side anywhere in the frame, on a random flat, gradient or noise backdrop, and
  JPEG-compressed at quality 40-90 (`robust_factors` says which). A pure function of
  (seed, index, the item).
  """
  # Imported here: PIL is the one dependency of this module beyond numpy, and only
  # this drawer needs it.
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  r = resolution
  big = r * 4
  layout = _robust_layout(index, big, seed)
  a, b = layout.colors
  if layout.backdrop == 0:
    backdrop = np.broadcast_to(a, (big, big, 3))
  elif layout.backdrop == 1:
    backdrop = np.broadcast_to(a + (b - a) * np.linspace(0, 1, big)[:, None, None],
                               (big, big, 3))
  else:
    backdrop = a + layout.noise
  canvas = Image.fromarray(np.clip(backdrop, 0, 255).astype(np.uint8))
  half, (cx, cy) = layout.half, layout.center
  item = Image.new('RGB', (big, big))
  draw = ImageDraw.Draw(item)
  _draw_item(draw, shape, cx, cy, half, tuple(int(c) for c in COLOR_RGB[color]))
  if pattern:
    # The pattern inside the border, clipped to the inner outline.
    texture = Image.new('RGB', (big, big), tuple(int(c) for c in COLOR_RGB[color]))
    tdraw = ImageDraw.Draw(texture)
    fill = tuple(int(c) for c in COLOR_RGB[color2])
    cell = 2 * half / _CELLS
    for i in range(_CELLS):
      for j in range(_CELLS):
        x, y = cx - half + j * cell, cy - half + i * cell
        if (pattern == 1 and i % 2) or (pattern == 3 and (i + j) % 2):
          tdraw.rectangle([x, y, x + cell, y + cell], fill=fill)
    if pattern == 2:
      for du, dv in _DOTS[shape]:
        x, y, rad = cx + du * half, cy + dv * half, _DOT_RADIUS * half
        tdraw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=fill)
    inner = Image.new('L', (big, big), 0)
    _draw_item(ImageDraw.Draw(inner), shape, cx, cy, half * (1 - _BORDER), 255)
    item.paste(texture, mask=inner)
  outline = Image.new('L', (big, big), 0)
  _draw_item(ImageDraw.Draw(outline), shape, cx, cy, half, 255)
  canvas.paste(item, mask=outline)
  small = canvas.resize((r, r), Image.LANCZOS)
  buffer = io.BytesIO()
  small.save(buffer, 'JPEG', quality=layout.jpeg_quality)
  return np.asarray(Image.open(buffer).convert('RGB'))


def _labels(image):
  """Each pixel's nearest palette entry [H, W]: item colors, then scene ones."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = np.clip((image + 1) * 127.5, 0, 255)
  dist = ((image.astype(np.int32)[..., None, :] - _PALETTE)**2).sum(-1)
  return dist.argmin(-1)


def color_and_pattern_of(image, box):
  """Reads (color id, pattern id) of the item in `box` from pixels alone.

  This is the analytic scorer for generated targets. Each pixel in the box is
  labeled with its nearest palette color (item colors and scene colors);
  scene-colored pixels are ignored. The most frequent item color is the
  color; the second one decides the pattern: (nearly) absent -> solid; runs
  of it along x much longer than along y -> stripes; blobs meeting at their
  corners (or covering much of the item) -> checks; else dots.

  Args:
    image: [H, W, 3], uint8 in [0, 255] or float in [-1, 1].
    box: (x0, y0, x1, y1) pixel box, end-exclusive (as `example` gives).

  Returns:
    (color, pattern) ints; (-1, -1) if no item-colored pixel is in the box.
  """
  x0, y0, x1, y1 = (int(b) for b in box)
  labels = _labels(np.asarray(image)[max(y0, 0):y1, max(x0, 0):x1])
  if labels.size == 0:
    return -1, -1
  is_item = labels < len(COLORS)
  counts = np.bincount(labels[is_item], minlength=len(COLORS))
  if counts.sum() == 0:
    return -1, -1
  first, second = np.argsort(-counts, kind='stable')[:2]
  frac2 = counts[second] / counts.sum()
  # Thresholds sit between the ranges measured on ground truth at R = 32..128
  # (fraction: solid 0, dots 0.09-0.22, checks 0.22-0.39; mean run along x
  # over along y: stripes >= 2.0, others <= 1.33; checks' cells meet at
  # corners 4-16 times, dots never).
  if frac2 < 0.03:
    return int(first), 0
  b = labels == second
  runs_x = (b[:, 1:] & ~b[:, :-1]).sum() + b[:, 0].sum()
  runs_y = (b[1:] & ~b[:-1]).sum() + b[0].sum()
  if runs_y >= 1.6 * runs_x:  # Same count of pixels, so runs 1.6x longer.
    return int(first), 1
  corners = ((b[1:, 1:] & b[:-1, :-1] & ~b[1:, :-1] & ~b[:-1, 1:]).sum()
             + (b[1:, :-1] & b[:-1, 1:] & ~b[1:, 1:] & ~b[:-1, :-1]).sum())
  return int(first), 2 if corners < 2 and frac2 < 0.3 else 3


def _figure_and_item(labels):
  """Pixels labeled an item color or the figure's gray: what moves with the scene's
  position."""
  return (labels < len(COLORS)) | (labels == _FIGURE)


@functools.lru_cache(maxsize=64)
def _position_centroids(resolution, size):
  """The figure-and-item mass's horizontal centroid at each position for an
  item of side `size` (a solid square: every shape is symmetric about the box's
  vertical axis). The item is moved inward at the sides, so at large items
  the centroids sit closer together than the figures do."""
  out = []
  for position in range(len(POSITIONS)):
    image = target_image((0, 0, 0, -1), 0, position, resolution, size)[0]
    out.append(np.nonzero(_figure_and_item(_labels(image)))[1].mean())
  return np.array(out)


def scene_of(image, item_size):
  """Reads (background id, position id) of a target from pixels alone.

  The scorer of editability: does the image show the scene its prompt asked
  for? Pixels are labeled by nearest palette color as in
  `color_and_pattern_of`. The background is the most frequent scene color on
  the image's border (the figure never reaches it; a large item may, so only
  scene-colored pixels vote). The position is the one whose ground-truth
  centroid of figure-and-item pixels (item or figure colors, wherever they
  are) lies nearest to the image's: the figure and its item move together,
  and every such pixel votes, so a blurred figure or a misplaced item moves
  the reading only in proportion to its mass.

  Args:
    image: [H, W, 3] with H == W, uint8 in [0, 255] or float in [-1, 1].
    item_size: the item's side in pixels (an example's box width).

  Returns:
    (background, position) ints; -1 for what has no pixel to read.
  """
  labels = _labels(image)
  border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0],
                           labels[1:-1, -1]]) - len(COLORS)
  votes = np.bincount(border[(border >= 0) & (border < len(BACKGROUNDS))],
                      minlength=len(BACKGROUNDS))
  background = int(votes.argmax()) if votes.sum() else -1
  xs = np.nonzero(_figure_and_item(labels))[1]
  if not xs.size:
    return background, -1
  centroids = _position_centroids(labels.shape[1], int(item_size))
  return background, int(np.abs(centroids - xs.mean()).argmin())


def pose_of_image(image):
  """Reads where and how large the figure is from pixels alone: (center x, center y,
  vertical spread), fractions of the side, of the pixels labeled an item color or the
  figure's gray (as `scene_of` labels them), or None when there is none. The center
  moves with the pose's offset, the spread (their std along y) with its scale; every
  such pixel counts, so a stray one moves the reading only by its share of the mass."""
  labels = _labels(image)
  ys, xs = np.nonzero(_figure_and_item(labels))
  if len(xs) < 2:
    return None
  side = labels.shape[0]
  return ((xs.mean() + 0.5) / side, (ys.mean() + 0.5) / side, ys.std() / side)


def pose_adherence(image, truth):
  """(adherent, center error): is the figure of `image` where and as large as in the
  ground-truth target `truth` (`pose_of_image` of both)? Within `POSE_TOLERANCE`: the
  center within 0.06 of the side, the spread within 10% of the truth's. The error is a
  fraction of the side (1.0 when the image has no figure)."""
  got, want = pose_of_image(image), pose_of_image(truth)
  if got is None or want is None:
    return False, 1.0
  error = float(np.hypot(got[0] - want[0], got[1] - want[1]))
  size = abs(got[2] / want[2] - 1)
  return bool(error <= POSE_TOLERANCE['center'] and size <= POSE_TOLERANCE['size']), error


def style_of(image):
  """Reads the style id (into STYLES) of an image from pixels alone.

  Pixels of the outer ring (`frame_width`) are labeled by nearest palette color as in
  `color_and_pattern_of`: a frame color holding most of the ring is that style, else
  'plain' (0). Item, scene and figure pixels (an item at the image's edge, a figure's
  legs) never read as a frame: its colors are far from all of them.

  Args:
    image: [H, W, 3] with H == W, uint8 in [0, 255] or float in [-1, 1].
  """
  labels = _labels(image)
  w = frame_width(labels.shape[0])
  ring = np.ones(labels.shape, bool)
  ring[w:-w, w:-w] = False
  votes = np.array([(labels[ring] == _FRAMES + k).sum() for k in range(len(STYLES) - 1)])
  best = int(votes.argmax())
  return best + 1 if votes[best] > ring.sum() / 2 else 0
