"""A subject's set of context images: the inputs of ByteDance HyperLoRA's recipe
(`objectives.hyperlora_basis`), from the data pipeline, from image files, and its
trigger words.

With ``data.set_size = N > 0`` every example of the input pipeline carries, beside its
target and prompt:

  'context'   float32 [N, R, R, 3] in [-1, 1]: N pictures of the example's subject
  'set_mask'  bool [N]: which of them count (training draws 1..N with data.set_random;
              a subject with fewer files than N masks the rest)
  'region'    float32 [N, 4]: each picture's identity region (x0, y0, x1, y1 in pixels
              of the R x R image, end-exclusive); the whole image where the data gives
              none
  'id_embed'  float32 [N, D]: each picture's precomputed identity embedding; D = 0
              where the data has none

The synthetic task renders N pictures of the example's item (`synthetic.subject_render`:
other sizes and places, some partly covered; the region is the item's box). A
'subjects' folder (`builders.Subjects`) holds several files per subject with their
regions and embeddings; training draws the target and the context pictures among them.
Beside image files, `read_context_files` reads the same things: X.json ({"box": [x0,
y0, x1, y1]} in the file's pixels) and X.npy (the embedding) beside an image X.
"""
import io
import json
import os
import re
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from hyperlora_jax.data import images as image_io
from hyperlora_jax.data import synthetic

LORA_INPUTS = ('context', 'set_mask', 'region', 'id_embed')
PAPER_TRIGGER = 'fcsks fxhks fhyks'  # ByteDance's trigger words (their ComfyUI workflows)


# ---------------------------------------------------------------- trigger words
def default_trigger(data) -> str:
  """The trigger of a data config: the synthetic task's S*, else the paper's words."""
  return synthetic.TOKEN if data.name == 'synthetic' else PAPER_TRIGGER


def with_trigger(prompt: str, trigger: str) -> str:
  """The prompt calling the ID-LoRA: the trigger words first where they are absent."""
  if trigger in prompt:
    return prompt
  return f'{trigger}, {prompt}' if prompt else trigger


def without_trigger(prompt: str, trigger: str) -> str:
  """The prompt with the trigger words taken out (and the commas they leave)."""
  out = re.sub(r'\s*,(\s*,)+', ',', prompt.replace(trigger, ' '))
  return re.sub(r'\s+', ' ', out).strip(' ,')


# ---------------------------------------------------------------- boxes
def fit_box(box, width: int, height: int, resolution: int) -> np.ndarray:
  """A box in a file's pixels -> the same region in `image_io.fit`'s R x R image
  (shorter side to R, center crop), clipped to it."""
  scale = resolution / min(width, height)
  size = [max(resolution, round(x * scale)) for x in (width, height)]
  offset = [(s - resolution) // 2 for s in size]
  sx, sy = size[0] / width, size[1] / height
  x0, y0, x1, y1 = (float(v) for v in box)
  out = np.array([x0 * sx - offset[0], y0 * sy - offset[1], x1 * sx - offset[0],
                  y1 * sy - offset[1]], np.float32)
  return np.clip(out, 0, resolution)


def check_box(box, width: int, height: int, where: str) -> list:
  """The box as 4 floats, or ValueError naming `where` when it does not lie inside the
  image (an identity region must cover part of its image, and only of it)."""
  try:
    x0, y0, x1, y1 = (float(v) for v in box)
  except (TypeError, ValueError):
    raise ValueError(f'{where}: a region is [x0, y0, x1, y1], not {box!r}.') from None
  if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
    raise ValueError(f'{where}: the region {[x0, y0, x1, y1]} does not lie inside the '
                     f'{width} x {height} image.')
  return [x0, y0, x1, y1]


# ---------------------------------------------------------------- the pipeline's sets
def _synthetic_set(ex, data, split: str):
  """N renders of the example's item, a pure function of (seed, split, index)."""
  item = tuple(int(ex[k]) for k in ('shape', 'color', 'pattern', 'color2'))
  rng = np.random.default_rng([data.seed, synthetic.SPLITS.index(split), int(ex['index']),
                               104729])
  renders = [synthetic.subject_render(item, rng, data.resolution, data.set_occlude)
             for _ in range(data.set_size)]
  return {'context': image_io.normalize(np.stack([r[0] for r in renders])),
          'region': np.stack([r[1] for r in renders]).astype(np.float32),
          'id_embed': np.zeros((data.set_size, 0), np.float32)}


def _folder_set(ex, data, rng, training: bool):
  """N of a 'subjects' example's files (and its target), drawn in training, the first
  ones otherwise."""
  names = [n.decode() if isinstance(n, bytes) else str(n) for n in ex['names']]
  count, n = len(names), data.set_size
  if not count:
    raise ValueError(f'Subject {ex["id"]!r} has no images: a set needs at least one.')
  if training:
    target = int(rng.integers(count))
    chosen = rng.choice(count, n, replace=count < n)
  else:
    target, chosen = 0, np.arange(n) % count
  pictures, regions = [], []
  for i in chosen:
    pictures.append(image_io.fit(ex['images'][i], data.resolution))
    width, height = (int(v) for v in ex['sizes'][i])
    regions.append(fit_box(ex['boxes'][i], width, height, data.resolution))
  embeds = np.asarray(ex['embeds'], np.float32).reshape(count, -1)
  if embeds.shape[1] and embeds.shape[1] != data.id_embed_dim:
    raise ValueError(f'The identity embedding of {names[0]} has {embeds.shape[1]} numbers; '
                     f'data.id_embed_dim is {data.id_embed_dim}.')
  prompt = ex['prompts'][target]
  out = {k: v for k, v in ex.items()
         if k not in ('images', 'names', 'prompts', 'boxes', 'sizes', 'embeds')}
  out.update(target=image_io.normalize(image_io.fit(ex['images'][target], data.resolution)),
             prompt=prompt.decode() if isinstance(prompt, bytes) else str(prompt),
             context=image_io.normalize(np.stack(pictures)), region=np.stack(regions),
             id_embed=embeds[chosen], set_mask=np.arange(n) < min(count, n))
  return out


def make_set(data, training: bool, split: str, ex, rng):
  """The example with its set of context images (the module docstring's keys); in
  training, 1..N of them count (data.set_random)."""
  if 'images' in ex:
    ex = _folder_set(ex, data, rng, training)
  else:
    ex = dict(ex, set_mask=np.ones(data.set_size, bool), **_synthetic_set(ex, data, split))
  if training and data.set_random:
    ex['set_mask'] = ex['set_mask'] & (np.arange(data.set_size) < rng.integers(
        1, data.set_size + 1))
  return ex


# ---------------------------------------------------------------- files
def read_context_files(paths: Sequence[str], resolution: int, as_set: bool = False,
                       embed_dim: Optional[int] = None):
  """(inputs, names) for context image files: one subject per file, or one subject of
  all of them (`as_set`). An image X may have X.json ({"box": [x0, y0, x1, y1]}, its
  identity region in its own pixels; else the whole image) and X.npy (its identity
  embedding, required when `embed_dim` is given, and of that size)."""
  if not paths:
    raise ValueError('No context images: a set needs at least one.')
  pictures, regions, embeds = [], [], []
  for path in paths:
    data = image_io.rgb_bytes(path)[0]
    with Image.open(io.BytesIO(data)) as image:
      width, height = image.size
    pictures.append(image_io.normalize(image_io.fit(data, resolution)))
    stem = os.path.splitext(path)[0]
    box = [0, 0, width, height]
    if os.path.exists(stem + '.json'):
      with open(stem + '.json') as f:
        try:
          box = json.load(f)['box']
        except (ValueError, KeyError, TypeError) as e:
          raise ValueError(f'{stem}.json: expected {{"box": [x0, y0, x1, y1]}} ({e!r}).') from None
      box = check_box(box, width, height, f'{stem}.json')
    regions.append(fit_box(box, width, height, resolution))
    if embed_dim:
      if not os.path.exists(stem + '.npy'):
        raise FileNotFoundError(f'{path} has no identity embedding {stem}.npy: this run '
                                f'reads a {embed_dim}-d embedding per image.')
      vector = np.load(stem + '.npy', allow_pickle=False).astype(np.float32).reshape(-1)
      if vector.size != embed_dim:
        raise ValueError(f'{stem}.npy has {vector.size} numbers; this run reads '
                         f'{embed_dim}-d identity embeddings.')
      embeds.append(vector)
    else:
      embeds.append(np.zeros(0, np.float32))
  names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  stack = lambda xs: np.stack(xs)[None] if as_set else np.stack(xs)[:, None]
  inputs = {'context': stack(pictures), 'region': stack(regions), 'id_embed': stack(embeds)}
  inputs['set_mask'] = np.ones(inputs['context'].shape[:2], bool)
  return inputs, ['_'.join(names)[:60]] if as_set else names
