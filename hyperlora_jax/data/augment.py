"""Context-image augmentations, so a hypernetwork does not learn the framing of its data.

Real users' context images vary: the subject is smaller or off center, on another
background, JPEG-compressed, upscaled from a small photo. `context` draws one such
variation of an image; the input pipeline applies it to training contexts only (the
targets stay exact, the loss is computed on them). Every draw comes from the generator
it is given: the pipeline seeds it from the example's position in the stream, so a
resumed run sees the same augmented images.

config.data.augment (`hyperlora_jax.defaults`):
  p           probability that a context is augmented at all (0: off)
  scale       (lo, hi) side of the image after scaling, fraction of the original: under
              1 it is shrunk and pasted at a uniformly random position on the (new)
              background; over 1, a random window of 1/scale of the side is enlarged
              to the whole image (zoomed in: the subject larger, its edges may leave
              the frame)
  background  probability of a new background: the pixels near the border's color
              (a product photo's backdrop) become a random flat color, gradient or noise
  jpeg        probability of JPEG compression at a quality in jpeg_quality (lo, hi)
  lowres      probability of a down-then-up resize by a factor in lowres_scale (lo, hi)
"""
import io

import numpy as np
from PIL import Image

# How close (max over channels, 0-255) a pixel is to the border color to count as
# backdrop. The synthetic items' darkest-to-white gap is far larger.
_BACKDROP_TOLERANCE = 24


def _backdrop_color(image: np.ndarray) -> np.ndarray:
  border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
  return np.median(border, axis=0)


def random_background(rng: np.random.Generator, size: int) -> np.ndarray:
  """A [size, size, 3] uint8 backdrop: a flat color, a two-color gradient or noise."""
  kind = rng.integers(3)
  a, b = rng.integers(0, 256, (2, 3))
  if kind == 0:
    return np.broadcast_to(a.astype(np.uint8), (size, size, 3)).copy()
  if kind == 1:
    t = np.linspace(0, 1, size)[:, None, None]
    ramp = t if rng.random() < 0.5 else t.transpose(1, 0, 2)
    return np.broadcast_to(a + (b - a) * ramp, (size, size, 3)).astype(np.uint8)
  noise = rng.normal(0, rng.uniform(10, 40), (size, size, 3))
  return np.clip(a + noise, 0, 255).astype(np.uint8)


def _resize(image: np.ndarray, side: int) -> np.ndarray:
  return np.asarray(Image.fromarray(image).resize((side, side), Image.BICUBIC))


def context(image: np.ndarray, rng: np.random.Generator, config) -> np.ndarray:
  """One augmented copy of a square uint8 [R, R, 3] context image (`config`: the
  module docstring's keys)."""
  if rng.random() >= config.p:
    return image
  r = image.shape[0]
  backdrop = _backdrop_color(image)
  canvas = np.broadcast_to(backdrop.astype(np.uint8), image.shape).copy()
  if rng.random() < config.background:
    canvas = random_background(rng, r)
    near = np.abs(image.astype(np.int32) - backdrop).max(-1) <= _BACKDROP_TOLERANCE
    image = np.where(near[..., None], canvas, image)
  side = max(1, int(round(rng.uniform(*config.scale) * r)))
  if side < r:
    x0, y0 = rng.integers(0, r - side + 1, 2)
    canvas[y0:y0 + side, x0:x0 + side] = _resize(image, side)
    image = canvas
  elif side > r:
    window = max(1, int(round(r * r / side)))
    x0, y0 = rng.integers(0, r - window + 1, 2)
    image = _resize(np.ascontiguousarray(image[y0:y0 + window, x0:x0 + window]), r)
  if rng.random() < config.lowres:
    image = _resize(_resize(image, max(2, int(round(rng.uniform(*config.lowres_scale) * r)))),
                    r)
  if rng.random() < config.jpeg:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, 'JPEG', quality=int(rng.integers(*config.jpeg_quality)))
    image = np.asarray(Image.open(buffer).convert('RGB'))
  return image
