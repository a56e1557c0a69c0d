"""ControlNetModel (diffusers') in Flax linen, NHWC: a condition image -> UNet residuals.

The encoder is the UNet's own (`unet.encode`: the same down blocks and mid block under
the same names), so one rule in `convert.core` loads a diffusers ``controlnet/`` folder
and `params_from_unet` copies a UNet's encoder into it. Its outputs go to the UNet call
as ``down_block_additional_residuals`` and ``mid_block_additional_residual``.
"""
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from hyperlora_jax.models import unet

Dtype = Any

# ControlNet config keys beyond the UNet's encoder keys, with diffusers' defaults.
_CONTROL_KEYS = {'conditioning_channels': 3, 'controlnet_conditioning_channel_order': 'rgb',
                 'conditioning_embedding_out_channels': (16, 32, 96, 256),
                 'global_pool_conditions': False}
# The UNet config keys diffusers' ControlNetModel.from_unet copies.
_FROM_UNET_KEYS = (
    'in_channels', 'flip_sin_to_cos', 'freq_shift', 'down_block_types', 'only_cross_attention',
    'block_out_channels', 'layers_per_block', 'downsample_padding', 'mid_block_scale_factor',
    'act_fn', 'norm_num_groups', 'norm_eps', 'cross_attention_dim', 'attention_head_dim',
    'num_attention_heads', 'use_linear_projection', 'class_embed_type', 'num_class_embeds',
    'upcast_attention', 'resnet_time_scale_shift', 'projection_class_embeddings_input_dim',
    'mid_block_type', 'transformer_layers_per_block', 'encoder_hid_dim', 'encoder_hid_dim_type',
    'addition_embed_type', 'addition_time_embed_dim')
# UNet fields the encoder reads (`unet.encode`, `unet.block_settings`).
ENCODER_FIELDS = ('in_channels', 'down_block_types', 'block_out_channels', 'layers_per_block',
                  'heads', 'transformer_layers', 'cross_attention_dim', 'norm_num_groups',
                  'norm_eps', 'flip_sin_to_cos', 'freq_shift', 'use_linear_projection',
                  'upcast_attention', 'dtype')
# What a ControlNet's residuals must share with the UNet that takes them.
_MUST_MATCH = ('in_channels', 'block_out_channels', 'layers_per_block', 'cross_attention_dim')
# Params that diffusers zero-initializes (the zero convs and the condition's last conv).
_ZERO_INIT = (r'^(controlnet_down_blocks_\d+|controlnet_mid_block|'
              r'controlnet_cond_embedding/conv_out)/')


def _conv(features, name, dtype, kernel=3, stride=1):
  padding = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=padding, dtype=dtype,
                 name=name)


class ConditioningEmbedding(nn.Module):
  """ControlNetConditioningEmbedding: the condition image down to the latent size.

  conv_in, then per channel step a conv and a stride-2 conv (``blocks``), SiLU after
  each, and conv_out to the UNet's first width.
  """
  features: int
  block_out_channels: Sequence[int]
  dtype: Dtype

  @nn.compact
  def __call__(self, cond):
    channels = self.block_out_channels
    x = nn.silu(_conv(channels[0], 'conv_in', self.dtype)(cond))
    for i in range(len(channels) - 1):
      x = nn.silu(_conv(channels[i], f'blocks_{2 * i}', self.dtype)(x))
      x = nn.silu(_conv(channels[i + 1], f'blocks_{2 * i + 1}', self.dtype, stride=2)(x))
    return _conv(self.features, 'conv_out', self.dtype)(x)


class ControlNetModel(nn.Module):
  """diffusers' ControlNetModel. Build it with `from_config` or `config_from_unet`.

  The encoder fields mean what they mean on `unet.UNet` (whose encoder this runs).
  """
  in_channels: int = 4
  down_block_types: Sequence[str] = (unet.CROSS_ATTN_DOWN,) * 3 + (unet.DOWN,)
  block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
  layers_per_block: Sequence[int] = (2, 2, 2, 2)
  heads: Sequence[int] = (8, 8, 8, 8)
  transformer_layers: Sequence[int] = (1, 1, 1, 1)
  cross_attention_dim: int = 768
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  use_linear_projection: bool = False
  upcast_attention: bool = False
  conditioning_channels: int = 3
  conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256)
  bgr_condition: bool = False  # controlnet_conditioning_channel_order='bgr'
  global_pool_conditions: bool = False
  dtype: Dtype = jnp.float32

  @property
  def condition_factor(self) -> int:
    """How many condition-image pixels one latent pixel covers, per side."""
    return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

  def dummy_inputs(self):
    size = 2 ** (len(self.block_out_channels) - 1)
    cond = size * self.condition_factor
    return (jnp.zeros((1, size, size, self.in_channels)), jnp.zeros((1,)),
            jnp.zeros((1, 2, self.cross_attention_dim)),
            jnp.zeros((1, cond, cond, self.conditioning_channels)))

  @nn.compact
  def __call__(self, sample, timesteps, context, controlnet_cond, conditioning_scale=1.0):
    """The UNet residuals for one condition image per sample.

    Args:
      sample: [B, H, W, in_channels] noisy latents.
      timesteps: [B] or scalar diffusion timesteps.
      context: [B, L, cross_attention_dim] text encoder states (text only: diffusers'
        pipelines give the ControlNet no IP-Adapter tokens).
      controlnet_cond: [B, H * f, W * f, conditioning_channels], f = `condition_factor`
        (8 for SD); diffusers' pipelines feed it in [0, 1], not [-1, 1].
      conditioning_scale: a scalar or [B], multiplies every residual.

    Returns:
      (down, mid): ``down`` a tuple with one residual per UNet skip connection, ``mid``
      the mid block's; the UNet call's two additional-residual arguments.
    """
    dtype = self.dtype
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
    ch0 = self.block_out_channels[0]
    # The UNet's time embedding, from the same two pieces (time_proj has no params).
    temb = unet.timestep_embedding(timesteps, ch0, self.flip_sin_to_cos, self.freq_shift)
    temb = unet.TimestepEmbedding(4 * ch0, dtype, name='time_embedding')(temb.astype(dtype))
    x = _conv(ch0, 'conv_in', dtype)(sample.astype(dtype))
    cond = controlnet_cond.astype(dtype)
    if self.bgr_condition:
      cond = cond[..., ::-1]
    x = x + ConditioningEmbedding(ch0, self.conditioning_embedding_out_channels, dtype,
                                  name='controlnet_cond_embedding')(cond)
    x, skips = unet.encode(self, x, temb, context.astype(dtype))

    zero_conv = lambda h, name: _conv(h.shape[-1], name, dtype, kernel=1)(h)
    down = [zero_conv(h, f'controlnet_down_blocks_{i}') for i, h in enumerate(skips)]
    mid = zero_conv(x, 'controlnet_mid_block')
    scale = jnp.asarray(conditioning_scale, dtype)
    scale = scale.reshape(scale.shape + (1,) * (mid.ndim - scale.ndim))  # [B] per sample
    down, mid = [h * scale for h in down], mid * scale
    if self.global_pool_conditions:
      pool = lambda h: jnp.mean(h, axis=(1, 2), keepdims=True)
      down, mid = [pool(h) for h in down], pool(mid)
    return tuple(down), mid


def from_config(config: dict, dtype: Dtype = jnp.float32) -> ControlNetModel:
  """Builds the ControlNet from a diffusers ``controlnet/config.json`` dict.

  Beside its own four keys, a ControlNet config is a UNet config without the decoder;
  it is checked by `unet.from_config`'s rules, so a ControlNet never runs through an
  encoder the UNet would refuse.
  """
  config = dict(config)
  own = {k: config.pop(k, default) for k, default in _CONTROL_KEYS.items()}
  if own['controlnet_conditioning_channel_order'] not in ('rgb', 'bgr'):
    raise ValueError('ControlNet config controlnet_conditioning_channel_order='
                     f"{own['controlnet_conditioning_channel_order']!r} is not 'rgb' or 'bgr'.")
  down = config.get('down_block_types', ControlNetModel.down_block_types)
  # The UNet rules need a decoder: its mirror image, which the ControlNet never builds.
  mirror = {unet.CROSS_ATTN_DOWN: unet.CROSS_ATTN_UP, unet.DOWN: unet.UP}
  config.update(down_block_types=down,
                up_block_types=[mirror.get(kind, kind) for kind in reversed(down)])
  try:
    encoder = unet.from_config(config, dtype)
  except ValueError as e:
    raise ValueError(f'ControlNet config: {e}') from None
  return ControlNetModel(
      **{f: getattr(encoder, f) for f in ENCODER_FIELDS},
      conditioning_channels=own['conditioning_channels'],
      conditioning_embedding_out_channels=tuple(own['conditioning_embedding_out_channels']),
      bgr_condition=own['controlnet_conditioning_channel_order'] == 'bgr',
      global_pool_conditions=own['global_pool_conditions'])


def config_from_unet(
    unet_config: dict, conditioning_channels: int = 3,
    conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256)) -> dict:
  """The diffusers ControlNet config that ControlNetModel.from_unet makes from a UNet's.

  Build the module with `from_config`; write it beside the params as the ControlNet
  folder's config.json.
  """
  config = {k: unet_config[k] for k in _FROM_UNET_KEYS if k in unet_config}
  return dict(config, _class_name='ControlNetModel', conditioning_channels=conditioning_channels,
              conditioning_embedding_out_channels=list(conditioning_embedding_out_channels))


def check_fits_unet(control: ControlNetModel, unet_module: unet.UNet) -> None:
  """Raises ValueError naming every setting in which the ControlNet's residuals (or the
  inputs it shares with the UNet) cannot fit this UNet."""
  plain = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v
  bad = [f'{f}: ControlNet {plain(getattr(control, f))}, UNet {plain(getattr(unet_module, f))}'
         for f in _MUST_MATCH if plain(getattr(control, f)) != plain(getattr(unet_module, f))]
  if bad:
    raise ValueError('The ControlNet was made for another UNet:\n  ' + '\n  '.join(bad))


def params_from_unet(control: ControlNetModel, unet_params: Any, rng: jax.Array) -> dict:
  """ControlNet params initialized as diffusers' ControlNetModel.from_unet does.

  conv_in, time_embedding, the down blocks and the mid block are the UNet's (shared
  arrays, nothing is copied on device); the zero convs and the condition embedding's
  conv_out are zero, so the new ControlNet's residuals are exactly zero; the rest of
  the condition embedding is drawn from ``rng`` (Flax's default initializers, not
  torch's). ``control`` is the module `config_from_unet` describes.
  """
  shapes = jax.eval_shape(lambda: control.init(rng, *control.dummy_inputs()))['params']
  embedding = control.conditioning_embedding_out_channels
  cond = ConditioningEmbedding(control.block_out_channels[0], embedding, control.dtype)
  size = 2 ** (len(control.block_out_channels) - 1) * control.condition_factor
  drawn = cond.init(rng, jnp.zeros((1, size, size, control.conditioning_channels)))['params']
  params = {k: unet_params[k] for k in shapes if k in unet_params}
  params['controlnet_cond_embedding'] = drawn
  flat = traverse_util.flatten_dict(params, sep='/')
  expected = traverse_util.flatten_dict(shapes, sep='/')
  out, misfit = {}, []
  for path, shape in expected.items():
    value = jnp.zeros(shape.shape, shape.dtype) if re.match(_ZERO_INIT, path) else flat.get(path)
    if value is None or value.shape != shape.shape:
      got = None if value is None else value.shape
      misfit.append(f'{path}: UNet {got}, ControlNet {shape.shape}')
    out[path] = value
  if misfit:
    raise ValueError('The UNet params do not fit this ControlNet (build it with '
                     'config_from_unet of the same UNet):\n  ' + '\n  '.join(misfit))
  return traverse_util.unflatten_dict(out, sep='/')
