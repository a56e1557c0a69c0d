"""AutoencoderKL, the Stable Diffusion VAE, in Flax linen (NHWC).

Submodule names mirror diffusers' (``encoder/down_blocks_0/resnets_1/conv1``), so
``convert.torch_to_flax`` maps a diffusers ``vae/`` state dict onto these params with no
per-model renaming. Params are fp32; ``dtype`` is the compute dtype.
"""
import functools
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# diffusers hard-codes this epsilon for every norm inside the VAE.
_EPS = 1e-6
_ACTIVATIONS = {'silu': nn.silu, 'swish': nn.silu}
_DOWN_BLOCK = 'DownEncoderBlock2D'
_UP_BLOCK = 'UpDecoderBlock2D'
_CONFIG_KEYS = ('in_channels', 'out_channels', 'down_block_types', 'up_block_types',
                'block_out_channels', 'layers_per_block', 'act_fn', 'latent_channels',
                'norm_num_groups', 'scaling_factor', 'shift_factor', 'use_quant_conv',
                'use_post_quant_conv', 'mid_block_add_attention')
# Keys that describe the checkpoint or the pipeline, not the network.
_IGNORED_KEYS = ('sample_size', 'force_upcast')
# Keys used only by some pipelines; harmless while unset.
_UNSUPPORTED_UNLESS_NONE = ('latents_mean', 'latents_std')


def _group_norm(groups: int, dtype: Dtype, name: str) -> nn.GroupNorm:
  # The two-pass variance matches torch; the fast E[x^2]-E[x]^2 form loses digits.
  return nn.GroupNorm(num_groups=groups, epsilon=_EPS, dtype=dtype,
                      use_fast_variance=False, name=name)


def _conv3x3(features: int, dtype: Dtype, name: str, stride: int = 1,
             padding: Any = ((1, 1), (1, 1))) -> nn.Conv:
  return nn.Conv(features, (3, 3), strides=(stride, stride), padding=padding,
                 dtype=dtype, name=name)


class ResnetBlock2D(nn.Module):
  """GroupNorm-act-conv twice plus a (1x1 conv) shortcut; no time embedding."""
  out_channels: int
  groups: int
  act_fn: str = 'silu'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    act = _ACTIVATIONS[self.act_fn]
    h = act(_group_norm(self.groups, self.dtype, 'norm1')(x))
    h = _conv3x3(self.out_channels, self.dtype, 'conv1')(h)
    h = act(_group_norm(self.groups, self.dtype, 'norm2')(h))
    h = _conv3x3(self.out_channels, self.dtype, 'conv2')(h)
    if x.shape[-1] != self.out_channels:
      x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, name='conv_shortcut')(x)
    return x + h


class Attention(nn.Module):
  """Single-head self-attention over the H*W positions, with a residual."""
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b, h, w, c = x.shape
    # Row-major H*W tokens match diffusers' view(b, c, h*w).transpose(1, 2).
    y = _group_norm(self.groups, self.dtype, 'group_norm')(x).reshape(b, h * w, 1, c)
    dense = functools.partial(nn.Dense, c, dtype=self.dtype)
    q, k, v = (dense(name=n)(y) for n in ('to_q', 'to_k', 'to_v'))
    y = jax.nn.dot_product_attention(q, k, v)
    return x + dense(name='to_out_0')(y.reshape(b, h, w, c))


class UNetMidBlock2D(nn.Module):
  """resnet, (attention), resnet at the lowest resolution."""
  channels: int
  groups: int
  add_attention: bool = True
  act_fn: str = 'silu'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    resnet = functools.partial(ResnetBlock2D, self.channels, self.groups, self.act_fn,
                               self.dtype)
    x = resnet(name='resnets_0')(x)
    if self.add_attention:
      x = Attention(self.groups, self.dtype, name='attentions_0')(x)
    return resnet(name='resnets_1')(x)


class Downsample2D(nn.Module):
  """3x3 stride-2 conv after diffusers' asymmetric (0, 1, 0, 1) zero pad."""
  channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv3x3(self.channels, self.dtype, 'conv', stride=2, padding='VALID')(x)


class Upsample2D(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv."""
  channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv3x3(self.channels, self.dtype, 'conv')(x)


class _Block(nn.Module):
  """What the encoder's and decoder's blocks share: ``num_layers`` resnets, then the
  block's resampler (``_resample``) when ``resample`` (all blocks but the last)."""
  out_channels: int
  num_layers: int
  groups: int
  resample: bool
  act_fn: str = 'silu'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    for i in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.groups, self.act_fn, self.dtype,
                        name=f'resnets_{i}')(x)
    return self._resample(x) if self.resample else x


class DownEncoderBlock2D(_Block):
  """Resnets, then a stride-2 downsampler unless it is the encoder's last block."""

  def _resample(self, x: jnp.ndarray) -> jnp.ndarray:
    return Downsample2D(self.out_channels, self.dtype, name='downsamplers_0')(x)


class UpDecoderBlock2D(_Block):
  """Resnets, then a x2 upsampler unless it is the decoder's last block."""

  def _resample(self, x: jnp.ndarray) -> jnp.ndarray:
    return Upsample2D(self.out_channels, self.dtype, name='upsamplers_0')(x)


class _Coder(nn.Module):
  """What the encoder and decoder share: fields, the mid block, the blocks and the output
  head; each puts them in its own order."""
  out_channels: int
  block_out_channels: Sequence[int]
  layers_per_block: int
  groups: int
  add_attention: bool = True
  act_fn: str = 'silu'
  dtype: Dtype = jnp.float32

  def _mid_block(self, x: jnp.ndarray, channels: int) -> jnp.ndarray:
    return UNetMidBlock2D(channels, self.groups, self.add_attention, self.act_fn,
                          self.dtype, name='mid_block')(x)

  def _blocks(self, x: jnp.ndarray, block: type, channels: Sequence[int], num_layers: int,
              prefix: str) -> jnp.ndarray:
    for i, c in enumerate(channels):
      x = block(c, num_layers, self.groups, resample=i < len(channels) - 1,
                act_fn=self.act_fn, dtype=self.dtype, name=f'{prefix}_{i}')(x)
    return x

  def _head(self, x: jnp.ndarray) -> jnp.ndarray:
    x = _ACTIVATIONS[self.act_fn](_group_norm(self.groups, self.dtype, 'conv_norm_out')(x))
    return _conv3x3(self.out_channels, self.dtype, 'conv_out')(x)


class Encoder(_Coder):
  """Image [B, H, W, C] -> moments [B, H/2^(n-1), W/2^(n-1), out_channels]."""

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    channels = self.block_out_channels
    x = _conv3x3(channels[0], self.dtype, 'conv_in')(x)
    x = self._blocks(x, DownEncoderBlock2D, channels, self.layers_per_block, 'down_blocks')
    return self._head(self._mid_block(x, channels[-1]))


class Decoder(_Coder):
  """Latents -> image; mirrors the encoder with one extra resnet per block."""

  @nn.compact
  def __call__(self, z: jnp.ndarray) -> jnp.ndarray:
    channels = tuple(reversed(self.block_out_channels))
    x = _conv3x3(channels[0], self.dtype, 'conv_in')(z)
    x = self._mid_block(x, channels[0])
    x = self._blocks(x, UpDecoderBlock2D, channels, self.layers_per_block + 1, 'up_blocks')
    return self._head(x)


class AutoencoderKL(nn.Module):
  """diffusers' AutoencoderKL; defaults are diffusers' defaults."""
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: Sequence[str] = (_DOWN_BLOCK,)
  up_block_types: Sequence[str] = (_UP_BLOCK,)
  block_out_channels: Sequence[int] = (64,)
  layers_per_block: int = 1
  act_fn: str = 'silu'
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: Optional[float] = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  dtype: Dtype = jnp.float32

  def __post_init__(self):
    # Fail at construction, not deep inside a trace.
    for kinds, allowed in ((self.down_block_types, _DOWN_BLOCK),
                           (self.up_block_types, _UP_BLOCK)):
      for kind in kinds:
        if kind != allowed:
          raise ValueError(f'Unsupported VAE block type {kind!r}; only {allowed!r}.')
      if len(kinds) != len(self.block_out_channels):
        raise ValueError(f'{len(kinds)} block types for {len(self.block_out_channels)} '
                         'block_out_channels.')
    if self.act_fn not in _ACTIVATIONS:
      raise ValueError(f'Unsupported VAE act_fn {self.act_fn!r}; one of {list(_ACTIVATIONS)}.')
    super().__post_init__()

  def setup(self):
    common = dict(block_out_channels=self.block_out_channels,
                  layers_per_block=self.layers_per_block, groups=self.norm_num_groups,
                  add_attention=self.mid_block_add_attention, act_fn=self.act_fn,
                  dtype=self.dtype)
    self.encoder = Encoder(2 * self.latent_channels, **common)
    self.decoder = Decoder(self.out_channels, **common)
    if self.use_quant_conv:
      self.quant_conv = nn.Conv(2 * self.latent_channels, (1, 1), dtype=self.dtype)
    if self.use_post_quant_conv:
      self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1), dtype=self.dtype)

  def encode(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Images NHWC in [-1, 1] -> (mean, logvar) of the latent Gaussian (unscaled)."""
    moments = self.encoder(x)
    if self.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    # Same clamp as diffusers' DiagonalGaussianDistribution.
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z: jnp.ndarray) -> jnp.ndarray:
    """Unscaled latents NHWC -> images NHWC (about [-1, 1])."""
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    # Touches every submodule, so init creates all params.
    return self.decode(self.encode(x)[0])

  def dummy_inputs(self) -> tuple[jnp.ndarray]:
    """Arguments for ``init``: the smallest image every block can halve."""
    side = 2 ** len(self.block_out_channels)
    return (jnp.zeros((1, side, side, self.in_channels), jnp.float32),)


def from_config(config: Mapping[str, Any], dtype: Dtype = jnp.float32) -> AutoencoderKL:
  """Builds an AutoencoderKL from a diffusers ``vae/config.json`` dict."""
  kwargs = {}
  for key, value in config.items():
    if key in _CONFIG_KEYS:
      kwargs[key] = tuple(value) if isinstance(value, list) else value
    elif key.startswith('_') or key in _IGNORED_KEYS:
      continue
    elif key in _UNSUPPORTED_UNLESS_NONE and value is None:
      continue
    else:
      raise ValueError(f'Unsupported AutoencoderKL config setting {key}={value!r}.')
  return AutoencoderKL(**kwargs, dtype=dtype)


def encode_latents(module: AutoencoderKL, params: Any, images: jnp.ndarray,
                   rng: Optional[jax.Array] = None) -> jnp.ndarray:
  """Images -> scaled latents for the UNet: the mean, or a sample when rng is given."""
  mean, logvar = module.apply({'params': params}, images, method='encode')
  z = mean.astype(jnp.float32)
  if rng is not None:
    z = z + jnp.exp(0.5 * logvar.astype(jnp.float32)) * jax.random.normal(rng, z.shape)
  return (z - (module.shift_factor or 0.0)) * module.scaling_factor


def decode_latents(module: AutoencoderKL, params: Any, latents: jnp.ndarray) -> jnp.ndarray:
  """The inverse of ``encode_latents``' scaling, then decode to images."""
  z = latents / module.scaling_factor + (module.shift_factor or 0.0)
  return module.apply({'params': params}, z, method='decode')
