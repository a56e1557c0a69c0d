"""Image files in and out: the one loader of context images for training, sampling,
export and evaluation, folders of images paired by name (evaluation), and the picture
grids the tools write."""
import io
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp')


def fit(encoded: bytes, resolution: int) -> np.ndarray:
  """Decodes image bytes to [R, R, 3] uint8: shorter side to R, center crop.

  Synthetic images are built at R already, so their pixels (and boxes) pass
  through unchanged.
  """
  img = Image.open(io.BytesIO(encoded))
  img.draft('RGB', (resolution, resolution))  # JPEG: decode at <= 1/8 size.
  w, h = img.size
  img = img.convert('RGB')
  scale = resolution / min(w, h)
  if (w, h) != (resolution, resolution):
    size = [max(resolution, round(x * scale)) for x in (w, h)]
    img = img.resize(size, Image.BICUBIC)
  ox = (img.size[0] - resolution) // 2
  oy = (img.size[1] - resolution) // 2
  img = img.crop((ox, oy, ox + resolution, oy + resolution))
  return np.asarray(img)


def normalize(pixels) -> np.ndarray:
  """uint8 pixels -> float32 in [-1, 1]."""
  return np.asarray(pixels).astype(np.float32) / 127.5 - 1.0


def to_uint8(images) -> np.ndarray:
  """Images in [-1, 1] -> uint8 pixels."""
  return np.asarray(np.round((np.asarray(images) + 1) * 127.5).clip(0, 255), np.uint8)


def image_files(path: str) -> list:
  """The image file, or the folder's images (sorted), each checked readable."""
  if os.path.isdir(path):
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
      raise FileNotFoundError(f'No images ({", ".join(IMAGE_EXTENSIONS)}) in '
                              f'the folder {path}.')
  elif os.path.exists(path):
    files = [path]
  else:
    raise FileNotFoundError(f'No such context image or folder: {path}')
  for f in files:
    try:
      with Image.open(f) as image:
        image.verify()
    except (OSError, SyntaxError) as e:  # What PIL raises for bad files.
      raise ValueError(f'Cannot read the image {f}: {e}') from e
  return files


def _images_by_name(folder: str, what: str) -> dict:
  """{file name without extension: path} of a folder's images, each checked readable."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'No such {what} folder: {folder}')
  paths = image_files(folder)
  names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  twice = sorted({n for n in names if names.count(n) > 1})
  if twice:
    raise ValueError(f'{folder} has several images named {", ".join(twice)}: names pair '
                     'generated and reference images, so each must be unique.')
  return dict(zip(names, paths))


def pair_images(generated: str, references: str) -> list:
  """[(name, generated path, reference path)] of two folders' images, paired by file
  name without extension (x.png with x.jpg), sorted by name. An image without a
  partner is an error naming it: a pair missing is a result missing."""
  gen, ref = _images_by_name(generated, 'generated'), _images_by_name(references, 'reference')
  problems = []
  for alone, what, other in ((sorted(set(gen) - set(ref)), 'generated', references),
                             (sorted(set(ref) - set(gen)), 'reference', generated)):
    if alone:
      problems.append(f'{len(alone)} {what} images have none of the same name in {other}: '
                      + ', '.join(alone[:5]) + (', ...' if len(alone) > 5 else ''))
  if problems:
    raise ValueError('Generated and reference images pair by file name (without its '
                     'extension); ' + '; '.join(problems) + '.')
  return [(name, gen[name], ref[name]) for name in sorted(gen)]


def read_rgb(path: str) -> np.ndarray:
  """An image file's pixels [h, w, 3] uint8, as they are (no resize)."""
  with Image.open(path) as image:
    return np.asarray(image.convert('RGB'))


def load_images(path: str, resolution: int):
  """(images [N, R, R, 3] in [-1, 1], names) from an image file or a folder,
  preprocessed as the training data is (`fit`)."""
  files = image_files(path)
  images = []
  for f in files:
    with open(f, 'rb') as fh:
      images.append(fit(fh.read(), resolution))
  names = [os.path.splitext(os.path.basename(f))[0] for f in files]
  return normalize(np.stack(images)), names


def grid(cells, labels: Sequence[str] = (), min_cell: int = 96) -> Image.Image:
  """One picture from cells [rows, cols, H, W, 3] in [-1, 1] (or uint8),
  each enlarged (nearest) to at least `min_cell` pixels, under column labels."""
  cells = np.asarray(cells)
  if cells.dtype != np.uint8:
    cells = to_uint8(cells)
  rows, cols, h, w, _ = cells.shape
  k = max(1, -(-min_cell // max(h, w)))
  cells = cells.repeat(k, axis=2).repeat(k, axis=3)
  h, w, top, pad = h * k, w * k, 14 if labels else 0, 2
  canvas = Image.new('RGB', (cols * (w + pad) + pad, top + rows * (h + pad) + pad),
                     'white')
  draw = ImageDraw.Draw(canvas)
  for j, label in enumerate(labels):
    draw.text((pad + j * (w + pad), 1), label[:w // 6], fill='black')
  for i in range(rows):
    for j in range(cols):
      canvas.paste(Image.fromarray(cells[i, j]),
                   (pad + j * (w + pad), top + pad + i * (h + pad)))
  return canvas
