"""UNet2DConditionModel (SD 1.x / 2.x / SDXL / tiny) in Flax linen, NHWC.

Module names mirror diffusers' so `convert.core.torch_to_flax` loads a diffusers
``unet/`` folder without per-model renaming. Every Dense can carry LoRA factors: the
``lora`` tree (see `hyperlora_jax.lora`) is threaded through as an argument, never
stored in the module.

SDXL is the same network with per-block transformer depths, linear projections and
diffusers' ``addition_embed_type='text_time'``: the pooled text embedding and the
micro-conditioning time ids (original size, crop top-left, target size), embedded
sinusoidally, feed ``add_embedding``, whose output joins the timestep embedding.
"""
import math
from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from hyperlora_jax import lora as lora_lib

Dtype = Any
CROSS_ATTN_DOWN, DOWN = 'CrossAttnDownBlock2D', 'DownBlock2D'
CROSS_ATTN_UP, UP = 'CrossAttnUpBlock2D', 'UpBlock2D'
MID = 'UNetMidBlock2DCrossAttn'

# diffusers config keys with the only value we implement. Anything else is refused.
_FIXED = {
    'act_fn': 'silu', 'center_input_sample': False, 'class_embed_type': None,
    'encoder_hid_dim': None, 'encoder_hid_dim_type': None,
    'time_cond_proj_dim': None, 'conv_in_kernel': 3, 'conv_out_kernel': 3,
    'resnet_time_scale_shift': 'default', 'time_embedding_type': 'positional',
    'timestep_post_act': None, 'dual_cross_attention': False, 'num_class_embeds': None,
    'class_embeddings_concat': False, 'mid_block_type': MID, 'attention_type': 'default',
    'cross_attention_norm': None, 'time_embedding_dim': None,
    'time_embedding_act_fn': None, 'mid_block_only_cross_attention': None,
    'reverse_transformer_layers_per_block': None, 'resnet_skip_time_act': False,
    'resnet_out_scale_factor': 1.0, 'mid_block_scale_factor': 1, 'dropout': 0.0,
    'only_cross_attention': False, 'addition_embed_type_num_heads': 64,
}
_IGNORED = {'_class_name', '_diffusers_version', '_name_or_path', 'sample_size'}
# SDXL's micro-conditioning: original size (h, w), crop top-left (y, x), target size (h, w).
NUM_TIME_IDS = 6


def timestep_embedding(t: jnp.ndarray, dim: int, flip_sin_to_cos: bool,
                       freq_shift: float) -> jnp.ndarray:
  """Sinusoidal embedding exactly as diffusers' get_timestep_embedding."""
  half = dim // 2
  exponent = -math.log(10000) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  emb = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None]
  emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  return emb


def attention_implementation(dtype, head_dim: int, q_len: int, kv_len: int) -> str:
  """cuDNN's fused attention on GPUs where it applies, XLA's elsewhere.

  jax.nn.dot_product_attention does not pick cuDNN by itself (jax 0.10), and without it
  the [B, heads, L, L] self-attention logits of a 64x64 latent are written to memory.
  cuDNN's backward refuses ragged lengths such as the 77 text tokens of cross-attention
  (seen on an H100, jax 0.11.2), whose logits are small anyway: those stay on XLA.
  """
  fused = (jax.default_backend() == 'gpu' and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
           and head_dim % 8 == 0 and head_dim <= 128 and q_len % 64 == 0 and kv_len % 64 == 0)
  return 'cudnn' if fused else 'xla'


def _conv(features, name, dtype, kernel=3, stride=1, padding=1):
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=padding,
                 dtype=dtype, name=name)


def _group_norm(groups, eps, name, dtype):
  # float32 compute keeps the two-pass variance (diffusers' exact numerics). With
  # half-precision activations the statistics are still float32 sums, where one pass
  # (E[x^2] - E[x]^2) is accurate enough and saves a read of every activation.
  fast = jnp.dtype(dtype) != jnp.float32
  return nn.GroupNorm(groups, epsilon=eps, dtype=dtype, use_fast_variance=fast, name=name)


class ResnetBlock(nn.Module):
  out_channels: int
  groups: int
  eps: float
  dtype: Dtype

  @nn.compact
  def __call__(self, x, temb, lora=None):
    h = nn.silu(_group_norm(self.groups, self.eps, 'norm1', self.dtype)(x))
    h = _conv(self.out_channels, 'conv1', self.dtype)(h)
    temb = lora_lib.Dense(self.out_channels, dtype=self.dtype, name='time_emb_proj')(
        nn.silu(temb), lora)
    h = h + temb[:, None, None, :]
    h = nn.silu(_group_norm(self.groups, self.eps, 'norm2', self.dtype)(h))
    h = _conv(self.out_channels, 'conv2', self.dtype)(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 'conv_shortcut', self.dtype, kernel=1, padding=0)(x)
    return x + h


class ImageContext(NamedTuple):
  """Cross-attention context that carries IP-Adapter image tokens beside the text.

  The UNet wraps its text context in this when called with ``ip_tokens``; blocks pass
  it along untouched and only `Attention` opens it (diffusers' (text, image) tuple).
  """
  text: jnp.ndarray
  tokens: jnp.ndarray  # [B, N, cross_attention_dim]
  scale: Any  # scalar or [B]


class Attention(nn.Module):
  """Multi-head attention with LoRA-able to_q/to_k/to_v/to_out.0.

  With an `ImageContext` the queries also attend to the image tokens through their own
  to_k_ip/to_v_ip, and that result, times the scale, is added before to_out (IP-Adapter's
  decoupled cross-attention, as diffusers' IPAdapterAttnProcessor2_0). Those two layers
  exist only then, so the params of a UNet without IP-Adapter are unchanged.
  """
  heads: int
  head_dim: int
  upcast: bool
  dtype: Dtype
  out_bias: bool = True

  @nn.compact
  def __call__(self, x, context=None, lora=None):
    image = context if isinstance(context, ImageContext) else None
    if image is not None:
      context = image.text
    context = x if context is None else context
    inner = self.heads * self.head_dim
    dense = lambda n, f, b: lora_lib.Dense(f, use_bias=b, dtype=self.dtype, name=n)
    split = lambda a: a.reshape(a.shape[:2] + (self.heads, self.head_dim))
    q = split(dense('to_q', inner, False)(x, lora))

    def attend(k_name, v_name, context):
      k = split(dense(k_name, inner, False)(context, lora))
      v = split(dense(v_name, inner, False)(context, lora))
      q_ = q
      if self.upcast:  # SD2.1 overflows in fp16/bf16 logits otherwise.
        q_, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
      return jax.nn.dot_product_attention(q_, k, v, implementation=attention_implementation(
          q_.dtype, self.head_dim, q.shape[1], k.shape[1])).astype(self.dtype)

    out = attend('to_k', 'to_v', context)
    if image is not None:
      scale = jnp.asarray(image.scale, self.dtype)
      scale = scale.reshape(scale.shape + (1,) * (out.ndim - scale.ndim))  # [B] per sample
      out = out + scale * attend('to_k_ip', 'to_v_ip', image.tokens)
    out = out.reshape(out.shape[:2] + (inner,))
    return dense('to_out_0', x.shape[-1], self.out_bias)(out, lora)


class GEGLU(nn.Module):
  """diffusers' GEGLU: one projection to twice the width, half of it gates the rest.

  ``gated=False`` is diffusers' plain GELU (a projection, then GELU), which IP-Adapter
  Plus' Resampler uses; both are ``net.0.proj`` in diffusers.
  """
  features: int
  dtype: Dtype
  gated: bool = True
  use_bias: bool = True

  @nn.compact
  def __call__(self, x, lora=None):
    h = lora_lib.Dense((2 if self.gated else 1) * self.features, use_bias=self.use_bias,
                       dtype=self.dtype, name='proj')(x, lora)
    if not self.gated:
      return nn.gelu(h, approximate=False)
    hidden, gate = jnp.split(h, 2, axis=-1)
    return hidden * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """ff.net.0 (GEGLU to 4x width) -> ff.net.2 (back to the model width)."""
  dtype: Dtype
  gated: bool = True
  use_bias: bool = True
  mult: int = 4

  @nn.compact
  def __call__(self, x, lora=None):
    h = GEGLU(self.mult * x.shape[-1], self.dtype, self.gated, self.use_bias,
              name='net_0')(x, lora)
    return lora_lib.Dense(x.shape[-1], use_bias=self.use_bias, dtype=self.dtype,
                          name='net_2')(h, lora)


class TransformerBlock(nn.Module):
  heads: int
  head_dim: int
  upcast: bool
  dtype: Dtype

  @nn.compact
  def __call__(self, x, context, lora=None):
    norm = lambda n: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=n)
    attn = lambda n: Attention(self.heads, self.head_dim, self.upcast, self.dtype, name=n)
    x = attn('attn1')(norm('norm1')(x), None, lora) + x
    x = attn('attn2')(norm('norm2')(x), context, lora) + x
    return FeedForward(self.dtype, name='ff')(norm('norm3')(x), lora) + x


class Transformer2D(nn.Module):
  heads: int
  layers: int
  groups: int
  linear_projection: bool
  upcast: bool
  dtype: Dtype

  @nn.compact
  def __call__(self, x, context, lora=None):
    b, hgt, wid, c = x.shape
    head_dim = c // self.heads
    residual = x
    x = _group_norm(self.groups, 1e-6, 'norm', self.dtype)(x)
    if self.linear_projection:
      x = lora_lib.Dense(c, dtype=self.dtype, name='proj_in')(x.reshape(b, -1, c), lora)
    else:
      x = _conv(c, 'proj_in', self.dtype, kernel=1, padding=0)(x).reshape(b, -1, c)
    for i in range(self.layers):
      x = TransformerBlock(self.heads, head_dim, self.upcast, self.dtype,
                           name=f'transformer_blocks_{i}')(x, context, lora)
    if self.linear_projection:
      x = lora_lib.Dense(c, dtype=self.dtype, name='proj_out')(x, lora).reshape(b, hgt, wid, c)
    else:
      x = _conv(c, 'proj_out', self.dtype, kernel=1, padding=0)(x.reshape(b, hgt, wid, c))
    return x + residual


class _Block(nn.Module):
  """What down and up blocks share: resnets, each followed by attention when ``heads``."""
  out_channels: int
  num_layers: int
  groups: int
  eps: float
  resample: bool
  heads: Optional[int]
  transformer_layers: int
  linear_projection: bool
  upcast: bool
  dtype: Dtype

  def _layer(self, i, x, temb, context, lora):
    x = ResnetBlock(self.out_channels, self.groups, self.eps, self.dtype,
                    name=f'resnets_{i}')(x, temb, lora)
    if self.heads:
      x = Transformer2D(self.heads, self.transformer_layers, self.groups,
                        self.linear_projection, self.upcast, self.dtype,
                        name=f'attentions_{i}')(x, context, lora)
    return x


class DownBlock(_Block):
  """DownBlock2D, or CrossAttnDownBlock2D when ``heads`` is set."""

  @nn.compact
  def __call__(self, x, temb, context, lora=None):
    skips = []
    for i in range(self.num_layers):
      x = self._layer(i, x, temb, context, lora)
      skips.append(x)
    if self.resample:
      x = Downsample(self.out_channels, self.dtype, name='downsamplers_0')(x)
      skips.append(x)
    return x, skips


class Downsample(nn.Module):
  channels: int
  dtype: Dtype

  @nn.compact
  def __call__(self, x):
    return _conv(self.channels, 'conv', self.dtype, stride=2)(x)


class Upsample(nn.Module):
  channels: int
  dtype: Dtype

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    x = jax.image.resize(x, (b, 2 * h, 2 * w, c), method='nearest')
    return _conv(self.channels, 'conv', self.dtype)(x)


class UpBlock(_Block):
  """UpBlock2D, or CrossAttnUpBlock2D when ``heads`` is set."""

  @nn.compact
  def __call__(self, x, skips, temb, context, lora=None):
    for i in range(self.num_layers):
      x = self._layer(i, jnp.concatenate([x, skips.pop()], axis=-1), temb, context, lora)
    if self.resample:
      x = Upsample(self.out_channels, self.dtype, name='upsamplers_0')(x)
    return x


class MidBlock(nn.Module):
  """UNetMidBlock2DCrossAttn: resnet, then (attention, resnet) per transformer stack."""
  groups: int
  eps: float
  heads: int
  transformer_layers: int
  linear_projection: bool
  upcast: bool
  dtype: Dtype

  @nn.compact
  def __call__(self, x, temb, context, lora=None):
    c = x.shape[-1]
    x = ResnetBlock(c, self.groups, self.eps, self.dtype, name='resnets_0')(x, temb, lora)
    x = Transformer2D(self.heads, self.transformer_layers, self.groups,
                      self.linear_projection, self.upcast, self.dtype,
                      name='attentions_0')(x, context, lora)
    return ResnetBlock(c, self.groups, self.eps, self.dtype, name='resnets_1')(x, temb, lora)


class UNet(nn.Module):
  """UNet2DConditionModel. Use `from_config` to build it from a diffusers config.

  ``transformer_layers`` are per down block; up block i mirrors down block n-1-i and the
  mid block takes the last one, as diffusers reverses ``transformer_layers_per_block``.
  ``addition_time_embed_dim`` set: SDXL's ``text_time`` added conditioning, whose
  ``add_embedding`` takes ``projection_class_embeddings_input_dim`` inputs.
  """
  in_channels: int = 4
  out_channels: int = 4
  down_block_types: Sequence[str] = (CROSS_ATTN_DOWN,) * 3 + (DOWN,)
  up_block_types: Sequence[str] = (UP,) + (CROSS_ATTN_UP,) * 3
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
  addition_time_embed_dim: Optional[int] = None
  projection_class_embeddings_input_dim: Optional[int] = None
  dtype: Dtype = jnp.float32

  @property
  def pooled_text_dim(self) -> Optional[int]:
    """Width of the pooled text embedding (``text_embeds``) an SDXL UNet takes."""
    if not self.addition_time_embed_dim:
      return None
    return self.projection_class_embeddings_input_dim - NUM_TIME_IDS * self.addition_time_embed_dim

  def dummy_inputs(self):
    size = 2 ** (len(self.block_out_channels) - 1)
    inputs = (jnp.zeros((1, size, size, self.in_channels)), jnp.zeros((1,)),
              jnp.zeros((1, 2, self.cross_attention_dim)))
    if not self.addition_time_embed_dim:
      return inputs
    return inputs + (None, jnp.zeros((1, self.pooled_text_dim)), jnp.zeros((1, NUM_TIME_IDS)))

  def _added_embedding(self, text_embeds, time_ids, batch, lora):
    """SDXL's add_embedding(concat(text_embeds, sinusoidal(time_ids))), as diffusers'
    ``addition_embed_type='text_time'``; None for UNets without it."""
    if not self.addition_time_embed_dim:
      if text_embeds is not None or time_ids is not None:
        raise ValueError('text_embeds / time_ids given to a UNet without SDXL added '
                         "conditioning (its config has no addition_embed_type='text_time').")
      return None
    if text_embeds is None or time_ids is None:
      raise ValueError("This UNet has SDXL added conditioning (addition_embed_type="
                       "'text_time'): pass text_embeds [B, pooled] and time_ids [B, 6].")
    time_ids = jnp.asarray(time_ids, jnp.float32)
    time_ids = jnp.broadcast_to(time_ids, (batch, time_ids.shape[-1]))
    time_embeds = timestep_embedding(time_ids.reshape(-1), self.addition_time_embed_dim,
                                     self.flip_sin_to_cos, self.freq_shift).reshape(batch, -1)
    text_embeds = jnp.broadcast_to(text_embeds, (batch, text_embeds.shape[-1]))
    added = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1)
    if added.shape[-1] != self.projection_class_embeddings_input_dim:
      raise ValueError(
          f'text_embeds ({text_embeds.shape[-1]}) + {time_ids.shape[-1]} time ids x '
          f'{self.addition_time_embed_dim} = {added.shape[-1]} inputs, but the UNet\'s '
          f'add_embedding takes projection_class_embeddings_input_dim='
          f'{self.projection_class_embeddings_input_dim}.')
    return TimestepEmbedding(4 * self.block_out_channels[0], self.dtype, name='add_embedding')(
        added.astype(self.dtype), lora)

  @nn.compact
  def __call__(self, sample, timesteps, context, lora: Optional[lora_lib.LoRATree] = None,
               text_embeds=None, time_ids=None,
               down_block_additional_residuals: Optional[Sequence[jnp.ndarray]] = None,
               mid_block_additional_residual: Optional[jnp.ndarray] = None,
               ip_tokens: Optional[jnp.ndarray] = None, ip_scale: Any = 1.0):
    """Predicts the model output (eps or v) for NHWC latents.

    Args:
      sample: [B, H, W, in_channels] noisy latents.
      timesteps: [B] or scalar diffusion timesteps.
      context: [B, L, cross_attention_dim] text encoder states.
      lora: optional LoRA tree keyed by Dense paths (shared or per-sample factors).
      text_embeds: SDXL only: [B, pooled] projected pooled text embedding
        (diffusers' ``added_cond_kwargs['text_embeds']``).
      time_ids: SDXL only: [B, 6] or [6] micro-conditioning ids
        (``added_cond_kwargs['time_ids']``).
      down_block_additional_residuals: ControlNet residuals, one per skip connection
        (`controlnet.ControlNetModel`'s first output), added to the skips after the
        last down block, as diffusers does.
      mid_block_additional_residual: ControlNet residual added to the mid block's output.
      ip_tokens: [B, N, cross_attention_dim] IP-Adapter image tokens (`ip_adapter`'s
        projections); every cross-attention then needs its to_k_ip/to_v_ip params.
      ip_scale: the image attention's weight, a scalar or [B].
    """
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
    ch0 = self.block_out_channels[0]
    temb = timestep_embedding(timesteps, ch0, self.flip_sin_to_cos, self.freq_shift)
    temb = temb.astype(self.dtype)
    temb = TimestepEmbedding(4 * ch0, self.dtype, name='time_embedding')(temb, lora)
    added = self._added_embedding(text_embeds, time_ids, sample.shape[0], lora)
    if added is not None:
      temb = temb + added
    x = _conv(ch0, 'conv_in', self.dtype)(sample.astype(self.dtype))
    context = context.astype(self.dtype)
    if ip_tokens is not None:
      context = ImageContext(context, ip_tokens.astype(self.dtype), ip_scale)
    common = block_settings(self)

    x, skips = encode(self, x, temb, context, lora)
    x, skips = add_control_residuals(x, skips, down_block_additional_residuals,
                                     mid_block_additional_residual)
    n = len(self.block_out_channels)
    for i, kind in enumerate(self.up_block_types):
      j = n - 1 - i  # up block i mirrors down block j
      x = UpBlock(
          self.block_out_channels[j], self.layers_per_block[j] + 1,
          resample=i < n - 1, heads=self.heads[j] if kind == CROSS_ATTN_UP else None,
          transformer_layers=self.transformer_layers[j], name=f'up_blocks_{i}',
          **common)(x, skips, temb, context, lora)
    x = nn.silu(_group_norm(self.norm_num_groups, self.norm_eps, 'conv_norm_out',
                            self.dtype)(x))
    return _conv(self.out_channels, 'conv_out', self.dtype)(x)


def block_settings(net) -> dict:
  """The block arguments a UNet-shaped module (UNet, ControlNet) gives every block."""
  return dict(groups=net.norm_num_groups, eps=net.norm_eps,
              linear_projection=net.use_linear_projection,
              upcast=net.upcast_attention, dtype=net.dtype)


def encode(net, x, temb, context, lora=None):
  """The down blocks and the mid block of a UNet-shaped module, inside its compact call.

  One piece of code for the encoder of the UNet and of the ControlNet (which has the
  same fields and param names). Returns (mid block output, skips): conv_in's output
  ``x`` first, then one per resnet and downsampler.
  """
  common = block_settings(net)
  skips = [x]
  n = len(net.block_out_channels)
  for i, kind in enumerate(net.down_block_types):
    x, block_skips = DownBlock(
        net.block_out_channels[i], net.layers_per_block[i],
        resample=i < n - 1, heads=net.heads[i] if kind == CROSS_ATTN_DOWN else None,
        transformer_layers=net.transformer_layers[i], name=f'down_blocks_{i}',
        **common)(x, temb, context, lora)
    skips += block_skips
  x = MidBlock(heads=net.heads[-1], transformer_layers=net.transformer_layers[-1],
               name='mid_block', **common)(x, temb, context, lora)
  return x, skips


def add_control_residuals(x, skips, down=None, mid=None):
  """ControlNet residuals added where diffusers adds them: ``down[i]`` to skip i after
  the last down block, ``mid`` to the mid block's output ``x``. Either may be None."""
  if down is not None:
    if len(down) != len(skips):
      raise ValueError(f'{len(down)} down_block_additional_residuals for {len(skips)} '
                       'UNet skip connections: the ControlNet was made for another UNet.')
    skips = [_add_residual(s, r, f'down_block_additional_residuals[{i}]')
             for i, (s, r) in enumerate(zip(skips, down))]
  if mid is not None:
    x = _add_residual(x, mid, 'mid_block_additional_residual')
  return x, skips


def _add_residual(x, residual, name):
  try:
    fits = jnp.broadcast_shapes(x.shape, residual.shape) == x.shape
  except ValueError:
    fits = False
  if not fits:
    raise ValueError(f'{name} has shape {residual.shape}; the UNet adds it to a '
                     f'{x.shape} activation.')
  return x + residual.astype(x.dtype)


class TimestepEmbedding(nn.Module):
  features: int
  dtype: Dtype

  @nn.compact
  def __call__(self, x, lora=None):
    x = lora_lib.Dense(self.features, dtype=self.dtype, name='linear_1')(x, lora)
    return lora_lib.Dense(self.features, dtype=self.dtype, name='linear_2')(nn.silu(x), lora)


def _per_block(value, n, name):
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f'UNet config {name} has {len(value)} entries for {n} blocks.')
    if not all(isinstance(v, int) for v in value):
      # Per-layer lists (SSD-1B-style asymmetric UNets) are not implemented.
      raise ValueError(f'UNet config {name}={value!r}: only one int per block is supported.')
    return tuple(value)
  return (value,) * n


def _added_conditioning(config: dict) -> dict:
  """The UNet fields of diffusers' addition_embed_type: None, or SDXL's 'text_time'."""
  kind = config.get('addition_embed_type')
  time_dim = config.get('addition_time_embed_dim')
  input_dim = config.get('projection_class_embeddings_input_dim')
  if kind is None:
    if time_dim is not None or input_dim is not None:
      raise ValueError('UNet config sets addition_time_embed_dim / projection_class_'
                       'embeddings_input_dim without addition_embed_type.')
    return {}
  if kind != 'text_time':
    raise ValueError(f"UNet config addition_embed_type={kind!r} is not supported (only "
                     "None, or 'text_time' as SDXL).")
  if not time_dim or not input_dim or input_dim <= NUM_TIME_IDS * time_dim:
    raise ValueError(
        f"addition_embed_type='text_time' needs addition_time_embed_dim and a projection_"
        f"class_embeddings_input_dim above {NUM_TIME_IDS} x addition_time_embed_dim (room "
        f"for the pooled text embedding); got {time_dim} and {input_dim}.")
  return dict(addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=input_dim)


def from_config(config: dict, dtype: Dtype = jnp.float32) -> UNet:
  """Builds the UNet from a diffusers ``unet/config.json`` dict.

  Refuses keys it does not know and settings it does not implement, naming them, so a
  checkpoint never runs through a silently different architecture.
  """
  known = set(_FIXED) | _IGNORED | {
      'in_channels', 'out_channels', 'down_block_types', 'up_block_types',
      'block_out_channels', 'layers_per_block', 'attention_head_dim', 'num_attention_heads',
      'transformer_layers_per_block', 'cross_attention_dim', 'norm_num_groups', 'norm_eps',
      'flip_sin_to_cos', 'freq_shift', 'use_linear_projection', 'upcast_attention',
      'downsample_padding', 'addition_embed_type', 'addition_time_embed_dim',
      'projection_class_embeddings_input_dim'}
  unknown = sorted(set(config) - known)
  if unknown:
    raise ValueError(f'Unknown UNet config keys: {unknown}')
  for key, value in _FIXED.items():
    got = config.get(key, value)
    if isinstance(got, list) and not any(got) and value is False:
      got = False  # a per-block list of False is the same as False
    if got != value:
      raise ValueError(f'UNet config {key}={got!r} is not supported (only {value!r}).')
  if config.get('downsample_padding', 1) != 1:
    raise ValueError('UNet config downsample_padding must be 1.')
  down, up = tuple(config['down_block_types']), tuple(config['up_block_types'])
  for kind in down + up:
    if kind not in (CROSS_ATTN_DOWN, DOWN, CROSS_ATTN_UP, UP):
      raise ValueError(f'UNet block type {kind} is not supported.')
  channels = tuple(config['block_out_channels'])
  n = len(channels)
  # diffusers quirk: SD configs name the head count `attention_head_dim`.
  heads = config.get('num_attention_heads') or config.get('attention_head_dim', 8)
  cross = config.get('cross_attention_dim', 1280)
  if isinstance(cross, (list, tuple)):
    if len(set(cross)) != 1:
      raise ValueError(f'Per-block cross_attention_dim {cross} is not supported.')
    cross = cross[0]
  return UNet(
      in_channels=config.get('in_channels', 4), out_channels=config.get('out_channels', 4),
      down_block_types=down, up_block_types=up, block_out_channels=channels,
      layers_per_block=_per_block(config.get('layers_per_block', 2), n, 'layers_per_block'),
      heads=_per_block(heads, n, 'num_attention_heads'),
      transformer_layers=_per_block(config.get('transformer_layers_per_block', 1), n,
                                    'transformer_layers_per_block'),
      cross_attention_dim=cross, norm_num_groups=config.get('norm_num_groups', 32),
      norm_eps=config.get('norm_eps', 1e-5), flip_sin_to_cos=config.get('flip_sin_to_cos', True),
      freq_shift=config.get('freq_shift', 0),
      use_linear_projection=bool(config.get('use_linear_projection')),
      upcast_attention=bool(config.get('upcast_attention')),  # SDXL's config says null
      dtype=dtype, **_added_conditioning(config))
