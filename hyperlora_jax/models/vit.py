"""transformers' ViTModel (the DINO ViTs, e.g. facebook/dino-vits16) and its image
preprocessing (ViTImageProcessor).

Submodule names mirror transformers 5's modules, so ``convert.torch_to_flax`` maps their
state dict unchanged: ``layers.3.attention.q_proj.weight`` is the Flax path
``layers_3/attention/q_proj/kernel``. Files keep the 4.x names
(``encoder.layer.3.attention.attention.query``: the hub's checkpoints, and what
transformers 5 still writes); `convert.vit_folders` renames them.

``apply({'params': p}, pixel_values [b, h, w, c] normalized)`` returns a ``ViTOutput``;
the DINO score's embedding is ``last_hidden_state[:, 0]``, the CLS token after the final
layernorm.
"""
import dataclasses
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from hyperlora_jax.models import clip

# The ImageNet statistics DINO was trained with (its folders' preprocessor_config.json).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@flax.struct.dataclass
class ViTOutput:
  last_hidden_state: jax.Array  # after the final layernorm
  pooler_output: Optional[jax.Array]  # tanh(dense(CLS)); None without a pooler
  hidden_states: tuple[jax.Array, ...]  # the embeddings, then each layer's output


class ViTPatchEmbeddings(nn.Module):
  hidden_size: int
  patch_size: int
  dtype: Any

  @nn.compact
  def __call__(self, pixel_values):
    p = self.patch_size
    x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                name='projection')(pixel_values)
    return x.reshape(x.shape[0], -1, self.hidden_size)  # row-major, as torch's flatten


class ViTEmbeddings(nn.Module):
  """[CLS, patches] plus learned position embeddings (no interpolation: the image has the
  model's size)."""
  hidden_size: int
  image_size: int
  patch_size: int
  dtype: Any

  @nn.compact
  def __call__(self, pixel_values):
    batch, height, width, _ = pixel_values.shape
    if (height, width) != (self.image_size, self.image_size):
      raise ValueError(f'Image size {height}x{width} does not match the model\'s '
                       f'{self.image_size}x{self.image_size}')
    d = self.hidden_size
    x = ViTPatchEmbeddings(d, self.patch_size, self.dtype, name='patch_embeddings')(
        pixel_values)
    init = nn.initializers.truncated_normal(0.02)
    cls = self.param('cls_token', init, (1, 1, d))
    positions = self.param('position_embeddings', init, (1, x.shape[1] + 1, d))
    cls = jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, d))
    return jnp.concatenate([cls, x], axis=1) + positions.astype(x.dtype)


class ViTAttention(nn.Module):
  num_attention_heads: int
  qkv_bias: bool
  dtype: Any

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    heads = x.shape[:-1] + (self.num_attention_heads, width // self.num_attention_heads)
    proj = lambda name, bias: nn.Dense(width, use_bias=bias, dtype=self.dtype, name=name)
    q, k, v = (proj(n, self.qkv_bias)(x).reshape(heads) for n in ('q_proj', 'k_proj', 'v_proj'))
    return proj('o_proj', True)(jax.nn.dot_product_attention(q, k, v).reshape(x.shape))


class ViTMLP(nn.Module):
  intermediate_size: int
  hidden_act: str
  dtype: Any

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(self.intermediate_size, dtype=self.dtype, name='fc1')(x)
    y = clip.activation(self.hidden_act)(y)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name='fc2')(y)


class ViTLayer(nn.Module):
  """Pre-LN: x + attention(layernorm_before(x)), then + mlp(layernorm_after(x))."""
  num_attention_heads: int
  intermediate_size: int
  hidden_act: str
  layer_norm_eps: float
  qkv_bias: bool
  dtype: Any

  @nn.compact
  def __call__(self, x):
    norm = lambda name: clip.layer_norm(self.layer_norm_eps, self.dtype, name)
    x = x + ViTAttention(self.num_attention_heads, self.qkv_bias, self.dtype,
                         name='attention')(norm('layernorm_before')(x))
    return x + ViTMLP(self.intermediate_size, self.hidden_act, self.dtype, name='mlp')(
        norm('layernorm_after')(x))


class ViTPooler(nn.Module):
  """act(dense(CLS)): ViTModel's pooler (add_pooling_layer)."""
  size: int
  act: str
  dtype: Any

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(self.size, dtype=self.dtype, name='dense')(x[:, 0])
    return jnp.tanh(y) if self.act == 'tanh' else clip.activation(self.act)(y)


class ViTModel(nn.Module):
  """transformers' ViTModel: embeddings -> layers -> layernorm (-> pooler, where the
  checkpoint has one: DINO's have none)."""
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = 'gelu'
  layer_norm_eps: float = 1e-12
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  qkv_bias: bool = True
  add_pooling_layer: bool = True
  pooler_output_size: Optional[int] = None  # None: hidden_size
  pooler_act: str = 'tanh'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values) -> ViTOutput:
    x = ViTEmbeddings(self.hidden_size, self.image_size, self.patch_size, self.dtype,
                      name='embeddings')(pixel_values)
    states = [x]
    for i in range(self.num_hidden_layers):
      x = ViTLayer(self.num_attention_heads, self.intermediate_size, self.hidden_act,
                   self.layer_norm_eps, self.qkv_bias, self.dtype, name=f'layers_{i}')(x)
      states.append(x)
    last = clip.layer_norm(self.layer_norm_eps, self.dtype, 'layernorm')(x)
    pooled = None
    if self.add_pooling_layer:
      pooled = ViTPooler(self.pooler_output_size or self.hidden_size, self.pooler_act,
                         self.dtype, name='pooler')(last)
    return ViTOutput(last_hidden_state=last, pooler_output=pooled, hidden_states=tuple(states))

  def dummy_inputs(self) -> tuple:
    return (jnp.zeros((1, self.image_size, self.image_size, self.num_channels), jnp.float32),)


def from_config(config: Mapping[str, Any], dtype: Any = jnp.float32) -> ViTModel:
  """A ViTModel from a transformers ViTConfig dict (model_type 'vit'); only the fields
  that shape the computation are read."""
  if config.get('model_type') != 'vit':
    raise ValueError(f'not a ViT: its model_type is {config.get("model_type")!r}, a ViTModel\'s '
                     "is 'vit' (as facebook/dino-vits16's)")
  kwargs = {f.name: config[f.name] for f in dataclasses.fields(ViTModel)
            if f.init and f.name in config and f.name not in ('parent', 'name', 'dtype')}
  module = ViTModel(**kwargs, dtype=dtype)
  clip.activation(module.hidden_act)
  if module.pooler_act != 'tanh':
    clip.activation(module.pooler_act)
  if module.image_size % module.patch_size:
    raise ValueError(f'image_size {module.image_size} is not a multiple of patch_size '
                     f'{module.patch_size}')
  if module.hidden_size % module.num_attention_heads:
    raise ValueError(f'hidden_size {module.hidden_size} is not a multiple of '
                     f'num_attention_heads {module.num_attention_heads}')
  return module


def preprocess_images(images, size: Sequence[int] = (224, 224), resample: str = 'linear',
                      mean: Sequence[float] = IMAGENET_MEAN,
                      std: Sequence[float] = IMAGENET_STD) -> jax.Array:
  """ViTImageProcessor in jnp: resize to ``size`` (height, width; no crop), normalize.

  Args:
    images: RGB [h, w, 3] or [n, h, w, 3] (one size), uint8 or float in [0, 1].
    size: the model's input (height, width).
    resample: 'linear' (PIL's BILINEAR, ViTImageProcessor's default) or 'bicubic'.
    mean, std: per-channel normalization (DINO's ImageNet statistics by default).

  Returns:
    float32 [n, height, width, 3]. Pixels differ from the PIL processor's by about one
    8-bit level at most, as `clip.preprocess_images`' do.
  """
  images = jnp.asarray(images)
  if images.ndim == 3:
    images = images[None]
  x = images.astype(jnp.float32)
  eight_bit = images.dtype == jnp.uint8
  x = clip.resize_like_pil(x / 255.0 if eight_bit else x, tuple(size), resample, eight_bit)
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
