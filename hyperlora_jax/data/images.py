"""Image files in and out: the one loader of context images for training, sampling,
export and evaluation, folders of images paired by name (evaluation), and the picture
grids the tools write.

A file becomes pixels in two steps that every tool shares: `rgb_bytes` (the file as
displayed, in RGB: EXIF orientation applied, alpha composited on white, 16-bit scaled to
8 bits; what the dataset builders store) and `fit` (shorter side to R, center crop; what
the input pipeline does to stored bytes). `load_images` is the two together, so a file
given to sample or export is the same pixels the training data holds for it.
"""
import io
import os
import textwrap
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageOps

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


def size_of(encoded: bytes) -> tuple[int, int]:
  """(width, height) of image bytes (the header only)."""
  return Image.open(io.BytesIO(encoded)).size


def resized(encoded: bytes, size: tuple[int, int]) -> bytes:
  """Image bytes resized to `size` (width, height), as PNG."""
  img = Image.open(io.BytesIO(encoded)).convert('RGB')
  return png_bytes(np.asarray(img.resize(size, Image.BICUBIC)))


def _to_rgb(img: Image.Image) -> Image.Image:
  """RGB copy of a non-RGB image: alpha over white, 16-bit scaled to 8."""
  if img.mode.startswith('I'):
    # Pillow clips 16-bit values to 255 when converting; scale instead.
    gray = np.asarray(img, np.float64) / 257.0
    return Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8)).convert('RGB')
  if img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or (
      img.mode == 'P' and 'transparency' in img.info):
    rgba = img.convert('RGBA')
    white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert('RGB')
  if img.mode == 'F':
    raise ValueError('float images have no known range')
  return img.convert('RGB')


def png_bytes(array) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='PNG')
  return buf.getvalue()


def rgb_bytes(path: str, convert_modes: bool = True) -> tuple[bytes, Optional[str]]:
  """(encoded RGB image, the mode it was converted from or None) of an image file.

  An RGB file without EXIF rotation keeps its own bytes (a JPEG is not re-encoded);
  anything else becomes PNG of its pixels as displayed. Raises ValueError naming the
  file when it is unreadable, or not RGB and `convert_modes` is False.
  """
  try:
    with open(path, 'rb') as f:
      data = f.read()
    img = Image.open(path)  # Not from `data`: errors then name the path.
    img.load()  # Decodes everything: catches truncated files.
  except FileNotFoundError:
    raise FileNotFoundError(f'{path}: file not found') from None
  except (OSError, EOFError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f'{path}: unreadable image ({e})') from None
  rotated = img.getexif().get(0x0112, 1) not in (1, None)
  if img.mode == 'RGB' and not rotated:
    return data, None
  converted = None
  if img.mode != 'RGB':
    if not convert_modes:
      raise ValueError(f'{path}: mode {img.mode} is not RGB (set convert_modes to '
                       'convert it)')
    try:
      converted, img = img.mode, _to_rgb(img)
    except ValueError as e:
      raise ValueError(f'{path}: cannot convert {img.mode}: {e}') from None
  # Pixels as displayed, so that no reader must apply EXIF.
  return png_bytes(np.asarray(ImageOps.exif_transpose(img))), converted


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
  """(images [N, R, R, 3] in [-1, 1], names) from an image file or a folder, the
  pixels the training data holds for the same files (`rgb_bytes`, then `fit`)."""
  files = image_files(path)
  images = [fit(rgb_bytes(f)[0], resolution) for f in files]
  names = [os.path.splitext(os.path.basename(f))[0] for f in files]
  return normalize(np.stack(images)), names


def _label_lines(label: str, width: int, most: int = 4) -> list:
  """A column label wrapped to `width` characters, at most `most` lines (the last one
  ends in '...' when cut), so labels that share a beginning still differ."""
  lines = textwrap.wrap(label, max(width, 4), break_long_words=True) or ['']
  if len(lines) > most:
    lines = lines[:most]
    lines[-1] = lines[-1][:max(width, 4) - 3] + '...'
  return lines


def grid(cells, labels: Sequence[str] = (), min_cell: int = 96) -> Image.Image:
  """One picture from cells [rows, cols, H, W, 3] in [-1, 1] (or uint8),
  each enlarged (nearest) to at least `min_cell` pixels, under column labels (wrapped
  to the cell's width)."""
  cells = np.asarray(cells)
  if cells.dtype != np.uint8:
    cells = to_uint8(cells)
  rows, cols, h, w, _ = cells.shape
  k = max(1, -(-min_cell // max(h, w)))
  cells = cells.repeat(k, axis=2).repeat(k, axis=3)
  h, w, pad = h * k, w * k, 2
  lines = [_label_lines(label, w // 6) for label in labels]
  top = 12 * max(map(len, lines)) + 2 if lines else 0
  canvas = Image.new('RGB', (cols * (w + pad) + pad, top + rows * (h + pad) + pad),
                     'white')
  draw = ImageDraw.Draw(canvas)
  for j, label in enumerate(lines):
    for i, line in enumerate(label):
      draw.text((pad + j * (w + pad), 1 + 12 * i), line, fill='black')
  for i in range(rows):
    for j in range(cols):
      canvas.paste(Image.fromarray(cells[i, j]),
                   (pad + j * (w + pad), top + pad + i * (h + pad)))
  return canvas
