"""ByteDance HyperLoRA's two-branch hypernetwork: an ID-LoRA and a Base-LoRA, each the
coefficients of learned basis LoRAs (`lora.LoRABasis`), each predicted by a Perceiver
Resampler of its own (`hypernet.PerceiverDecoder`), as ByteDance's inference code has a
resampler and a base resampler.

Inputs, a dict of arrays (one subject per row, a set of N >= 1 images each):
  'context'   [B, N, H, W, 3] in [-1, 1]
  'set_mask'  [B, N] which images count (training draws 1..N of them)
  'region'    [B, N, 4] each image's identity region (x0, y0, x1, y1, pixels,
              end-exclusive; the synthetic item's box, a face box): hidden from the
              Base branch, cropped for a 'crop' identity encoder
  'id_embed'  [B, N, D] a precomputed identity embedding per image (an ArcFace
              vector), read by a 'precomputed' identity encoder only

Base branch: the images with their region blurred or filled (`hide_regions`) -> the
image encoder -> the Base resampler. ID branch: the images -> the same encoder -> the ID
resampler, which also attends to identity tokens when ``use_identity`` (`Identity`: a
precomputed embedding, or a conv net over the region's crop, projected to tokens). Per
target, each branch's raw coefficients are averaged over the set (ByteDance's inference
averages its latents over the images), normalized, and mixed into the bases. Each part
has its own gamma (starting at 0: the adapted UNet starts at the base model) and a
per-sample scale (``part_scales``), both in the per-sample ``mid`` of the LoRA tree.
"""
import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from hyperlora_jax import lora as lora_lib
from hyperlora_jax.models import hypernet

PARTS = ('id', 'base')
REGION_MODES = ('blur', 'fill', 'none')
IDENTITY_KINDS = ('none', 'precomputed', 'crop')


# ---------------------------------------------------------------- regions
def region_masks(boxes, height: int, width: int):
  """[n, H, W] 1.0 inside each box [n, 4] (x0, y0, x1, y1: pixel edges), else 0."""
  ys, xs = jnp.arange(height) + 0.5, jnp.arange(width) + 0.5
  inside = lambda lo, hi, at: (at >= lo[:, None]) & (at < hi[:, None])
  rows = inside(boxes[:, 1], boxes[:, 3], ys)
  cols = inside(boxes[:, 0], boxes[:, 2], xs)
  return (rows[:, :, None] & cols[:, None, :]).astype(jnp.float32)


def gaussian_blur(images, sigma: float):
  """images [n, H, W, C] blurred by a Gaussian of `sigma` pixels (separable, edges
  extended)."""
  radius = max(1, min(int(math.ceil(3 * sigma)), max(images.shape[1:3]) - 1))
  taps = jnp.exp(-0.5 * (jnp.arange(-radius, radius + 1) / sigma) ** 2)
  taps = taps / taps.sum()
  for axis in (1, 2):
    pad = [(0, 0)] * 4
    pad[axis] = (radius, radius)
    padded = jnp.pad(images, pad, mode='edge')
    length = images.shape[axis]
    images = sum(w * jax.lax.slice_in_dim(padded, i, i + length, axis=axis)
                 for i, w in enumerate(taps))
  return images


def hide_regions(images, boxes, mode: str, blur: float):
  """The images [n, H, W, 3] with each region [n, 4] hidden: 'blur' (a Gaussian of
  `blur` x the image side, ByteDance's stage 1 input), 'fill' (the color of the image's
  border, so nothing of the region is left: the synthetic task, whose identity is a
  color), 'none' (the images as they are)."""
  if mode not in REGION_MODES:
    raise ValueError(f'Unknown region mode {mode!r}; one of {REGION_MODES}.')
  if mode == 'none':
    return images
  mask = region_masks(boxes, *images.shape[1:3])[..., None]
  if mode == 'blur':
    hidden = gaussian_blur(images, blur * max(images.shape[1:3]))
  else:
    border = jnp.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]],
                             axis=1)
    hidden = jnp.broadcast_to(border.mean(axis=1)[:, None, None], images.shape)
  return images * (1 - mask) + hidden * mask


def crop_regions(images, boxes, size: int):
  """Each image's region [n, 4] resized to [n, size, size, 3] (bilinear, antialiased)."""
  def crop(image, box):
    side = jnp.maximum(box[2:] - box[:2], 1.0)  # (w, h)
    scale = size / side[::-1]  # (y, x)
    return jax.image.scale_and_translate(image, (size, size, image.shape[-1]), (0, 1), scale,
                                         -box[1::-1] * scale, 'linear')
  return jax.vmap(crop)(images, boxes.astype(jnp.float32))


# ---------------------------------------------------------------- identity
class Identity(nn.Module):
  """Identity tokens [n, tokens, width] per image: ByteDance's id_projector (Dense to
  tokens x width, reshape, LayerNorm) over an embedding that is precomputed
  ('precomputed': the 'id_embed' input, e.g. ArcFace's 512-d) or computed here
  ('crop': a conv net over the region's crop, trained with the rest)."""
  kind: str
  tokens: int
  width: int
  crop_size: int = 16
  channels: Sequence[int] = (32, 64)

  @nn.compact
  def __call__(self, images, boxes, embeds):
    if self.kind == 'precomputed':
      x = embeds
    elif self.kind == 'crop':
      x = hypernet.ConvEncoder(tuple(self.channels), name='crop_encoder')(
          crop_regions(images, boxes, self.crop_size))[1]
    else:
      raise ValueError(f'Unknown identity kind {self.kind!r}; one of {IDENTITY_KINDS[1:]}.')
    x = nn.Dense(self.tokens * self.width, name='projector')(x.astype(jnp.float32))
    return nn.LayerNorm(name='projector_norm')(x.reshape(x.shape[0], self.tokens, self.width))


# ---------------------------------------------------------------- the network
def _part_vector(mid_parts: Sequence[int], scales: Mapping[str, Any], batch: int):
  """[B, m]: each part's scale (a scalar or [B]; 1 where not given) over its entries of
  ``mid`` (`lora.LoRABasis.mid_parts`)."""
  return jnp.concatenate([jnp.broadcast_to(
      jnp.asarray(scales.get(p, 1.0), jnp.float32).reshape(-1, 1), (batch, k))
                          for p, k in zip(PARTS, mid_parts)], axis=1)


def scale_parts(tree, mid_parts: Sequence[int], scales: Mapping[str, Any]) -> dict:
  """The LoRA tree with each part's delta times ``scales[part]`` (a scalar or [B]):
  {'id': 1, 'base': 0} is the ID-LoRA alone."""
  batch = next(iter(tree.values()))['mid'].shape[0]
  vector = _part_vector(mid_parts, scales, batch)
  return {path: dict(f, mid=f['mid'] * vector) for path, f in tree.items()}


def _set_mean(raw, mask):
  """raw [B * N, T, S] -> [B, T, S]: the mean over each row's valid images."""
  b, n = mask.shape
  raw = raw.reshape((b, n) + raw.shape[1:])
  weights = mask.astype(raw.dtype) / jnp.maximum(mask.sum(1, keepdims=True), 1)
  return jnp.einsum('bn,bn...->b...', weights, raw)


def _normalize(raw, chunks: int):
  """Each of a target's `chunks` coefficient vectors to unit RMS: ByteDance's resampler
  ends with an L2 normalization (times sqrt(size) here, a constant the bases absorb)."""
  shape = raw.shape
  raw = raw.reshape(shape[:-1] + (chunks, shape[-1] // chunks))
  raw = raw * jax.lax.rsqrt(jnp.mean(raw * raw, axis=-1, keepdims=True) + 1e-8)
  return raw.reshape(shape)


class IDBaseHyperNetwork(nn.Module):
  """inputs (module docstring) -> a per-sample LoRA tree for ``targets``.

  ``parts``: the parts computed (a part left out contributes nothing: its coefficients
  are zero); ``use_identity``: the ID resampler attends to the identity tokens.
  `scale_parts` scales each part of the tree afterwards.
  """
  targets: Sequence[lora_lib.Target]
  encoder: nn.Module  # the ID branch's, and the Base branch's without base_encoder
  id_decoder: nn.Module
  base_decoder: nn.Module
  parameterization: lora_lib.LoRABasis
  identity: Optional[nn.Module] = None
  base_encoder: Optional[nn.Module] = None
  region_mode: str = 'blur'
  blur: float = 0.1
  normalize: bool = True
  gamma_init: float = 0.0

  @nn.compact
  def __call__(self, inputs: Mapping[str, Any], parts: Sequence[str] = PARTS,
               use_identity: bool = True):
    images = inputs['context']
    b, n = images.shape[:2]
    flat = images.reshape((b * n,) + images.shape[2:])
    boxes = inputs['region'].reshape(b * n, 4).astype(jnp.float32)
    mask = inputs['set_mask']
    groups = hypernet.group_targets(self.targets)
    raws = {}
    if 'id' in parts:
      tokens, pooled = self.encoder(flat)
      extra = None
      if use_identity and self.identity is not None:
        embeds = inputs.get('id_embed')
        extra = self.identity(flat, boxes, None if embeds is None else embeds.reshape(
            b * n, -1))
      raws['id'] = self.id_decoder(tokens, pooled, extra)
    if 'base' in parts:
      hidden = hide_regions(flat, boxes, self.region_mode, self.blur)
      raws['base'] = self.base_decoder(*(self.base_encoder or self.encoder)(hidden))
    gammas = {p: self.param(f'gamma_{p}', nn.initializers.constant(self.gamma_init), ())
              for p in PARTS}
    mid_scale = _part_vector(self.parameterization.mid_parts(), gammas, b)
    tree = {}
    for g, ((d_in, d_out), idx) in enumerate(groups):
      sizes = self.parameterization.part_sizes(d_in, d_out)
      chunks = []
      for part, size, decoder in zip(PARTS, sizes, (self.id_decoder, self.base_decoder)):
        if part not in raws:
          chunks.append(jnp.zeros((b, len(idx), size), jnp.float32))
          continue
        raw = _set_mean(raws[part][g].astype(jnp.float32), mask)
        chunks.append(_normalize(raw, getattr(decoder, 'queries', 1)) if self.normalize
                      else raw)
      factors = self.parameterization(jnp.concatenate(chunks, -1), d_in, d_out, idx[0])
      factors['mid'] = factors['mid'] * mid_scale[:, None]  # [B, T, m] * [B, 1, m]
      for j, i in enumerate(idx):
        tree[self.targets[i].path] = hypernet.target_factors(factors, j)
    return tree


def build(config, targets: Sequence[lora_lib.Target],
          encoder_tower: nn.Module = None) -> IDBaseHyperNetwork:
  """The network of a config's ``hypernet`` (encoder; decoder: both resamplers' shape;
  param: kind 'basis') and ``basis`` sections (encoders, region, identity, normalize).
  encoder_tower: a loaded CLIP vision tower, as `hypernet.build`'s."""
  param = lora_lib.parameterization(config.hypernet.param, targets)
  if not isinstance(param, lora_lib.LoRABasis):
    raise ValueError('The ID/Base hypernetwork predicts basis coefficients: set '
                     f"hypernet.param.kind='basis', not {config.hypernet.param.kind!r}.")
  param = param.clone(per_part=True)
  groups = hypernet.group_targets(targets)
  sizes = [param.part_sizes(*shape) for shape, _ in groups]
  id_decoder, base_decoder = (
      hypernet.build_decoder(config.hypernet.decoder, groups, [s[k] for s in sizes])
      for k in (0, 1))
  basis = config.basis
  ident = basis.identity
  if ident.kind not in IDENTITY_KINDS:
    raise ValueError(f'Unknown basis.identity.kind {ident.kind!r}; one of {IDENTITY_KINDS}.')
  if basis.region.mode not in REGION_MODES:
    raise ValueError(f'Unknown basis.region.mode {basis.region.mode!r}; one of '
                     f'{REGION_MODES}.')
  if basis.encoders not in ('separate', 'shared'):
    raise ValueError(f"Unknown basis.encoders {basis.encoders!r}; 'separate' or 'shared'.")
  identity = None
  if ident.kind != 'none':
    identity = Identity(ident.kind, ident.tokens, ident.width or config.hypernet.decoder.width,
                        ident.crop_size, tuple(ident.channels))
  encoder = lambda: hypernet.build_encoder(config.hypernet.encoder, encoder_tower)
  return IDBaseHyperNetwork(
      tuple(targets), encoder(), id_decoder, base_decoder, param, identity,
      encoder() if basis.encoders == 'separate' else None, basis.region.mode,
      basis.region.blur, basis.normalize, config.hypernet.gamma_init)
