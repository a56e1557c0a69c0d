"""CLIP text and vision towers (transformers' CLIPTextModel[WithProjection],
CLIPVisionModel[WithProjection]).

Submodule names mirror transformers' modules, so ``convert.torch_to_flax`` maps their
state dicts unchanged: ``text_model.encoder.layers.3.self_attn.q_proj.weight`` is the
Flax path ``text_model/encoder/layers_3/self_attn/q_proj/kernel``. The roots keep the
``text_model`` / ``vision_model`` level that diffusers pipelines and transformers 4.x
checkpoints carry (`convert.clip_folders` loads folders, transformers 5 saves too).
Attention and MLP projections are ``lora.Dense``, so both towers take an optional LoRA
tree keyed by paths such as
``text_model/encoder/layers_0/self_attn/q_proj``.

Images are NHWC, already normalized (see ``preprocess_images``).
"""
import dataclasses
import functools
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from hyperlora_jax.lora import Dense, LoRATree

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_ACTIVATIONS = {
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
    'gelu': functools.partial(jax.nn.gelu, approximate=False),  # torch's erf form
}


def activation(name: str):
  if name not in _ACTIVATIONS:
    raise ValueError(f'Unsupported CLIP hidden_act {name!r}; supported: {sorted(_ACTIVATIONS)}')
  return _ACTIVATIONS[name]


def layer_norm(eps: float, dtype: Any, name: str) -> nn.LayerNorm:
  # The two-pass variance matches torch; CLIP's large activation outliers make the fast
  # E[x^2] - E[x]^2 form lose digits.
  return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


@flax.struct.dataclass
class CLIPTextOutput:
  """``hidden_states`` as transformers' output_hidden_states: the embeddings, then each
  layer's output (no final layer norm). diffusers' ``clip_skip=k`` is
  ``final_layer_norm(hidden_states[-(k + 1)])``, with the params under
  ``text_model/final_layer_norm`` (SD2 checkpoints instead drop their last layer); SDXL
  takes ``hidden_states[-(k + 2)]`` with no final norm."""
  last_hidden_state: jax.Array  # after final_layer_norm
  pooler_output: jax.Array  # last_hidden_state at the EOS token
  hidden_states: tuple[jax.Array, ...]
  text_embeds: Optional[jax.Array] = None  # text_projection(pooler_output)


@flax.struct.dataclass
class CLIPVisionOutput:
  """``hidden_states`` as transformers': pre_layrnorm'd embeddings, then each layer."""
  last_hidden_state: jax.Array
  pooler_output: jax.Array  # post_layernorm of the CLS token
  hidden_states: tuple[jax.Array, ...]
  image_embeds: Optional[jax.Array] = None  # visual_projection(pooler_output)


class CLIPAttention(nn.Module):
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, is_causal=False, lora: Optional[LoRATree] = None):
    width = x.shape[-1]
    heads = x.shape[:-1] + (self.num_heads, width // self.num_heads)
    proj = lambda name, y: Dense(width, dtype=self.dtype, name=name)(y, lora)
    q = proj('q_proj', x).reshape(heads)
    k = proj('k_proj', x).reshape(heads)
    v = proj('v_proj', x).reshape(heads)
    y = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)
    return proj('out_proj', y.reshape(x.shape))


class CLIPMLP(nn.Module):
  intermediate_size: int
  hidden_act: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, lora: Optional[LoRATree] = None):
    y = Dense(self.intermediate_size, dtype=self.dtype, name='fc1')(x, lora)
    y = activation(self.hidden_act)(y)
    return Dense(x.shape[-1], dtype=self.dtype, name='fc2')(y, lora)


class CLIPEncoderLayer(nn.Module):
  num_attention_heads: int
  intermediate_size: int
  hidden_act: str
  layer_norm_eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, is_causal=False, lora: Optional[LoRATree] = None):
    y = layer_norm(self.layer_norm_eps, self.dtype, 'layer_norm1')(x)
    x = x + CLIPAttention(self.num_attention_heads, self.dtype, name='self_attn')(
        y, mask, is_causal, lora)
    y = layer_norm(self.layer_norm_eps, self.dtype, 'layer_norm2')(x)
    return x + CLIPMLP(self.intermediate_size, self.hidden_act, self.dtype, name='mlp')(y, lora)


REMAT_CHOICES = "'none', 'full' or a jax.checkpoint_policies name"


def remat_policy(name: str):
  """(remat?, policy) of a per-layer remat setting: 'none'; 'full' (a layer keeps only
  its input for the backward); a jax.checkpoint_policies name, e.g.
  'dots_with_no_batch_dims_saveable' (keeps the projections' outputs, recomputes norms,
  softmax and activations)."""
  if name == 'none':
    return False, None
  if name == 'full':
    return True, None
  policy = None if name.startswith('_') else getattr(jax.checkpoint_policies, name, None)
  if policy is None:
    raise ValueError(f'Unknown remat {name!r}: use {REMAT_CHOICES}.')
  return True, policy


class CLIPEncoder(CLIPEncoderLayer):
  """``num_hidden_layers`` layers of the fields it shares with CLIPEncoderLayer (as
  transformers builds both from one config). Returns every hidden state: the input, then
  each layer's output.

  ``remat`` other than 'none' (see `remat_policy`) runs the layers as one lax.scan whose
  body is jax.checkpoint'ed: the backward recomputes, one layer at a time, what the policy
  does not keep. A scan, not a loop of checkpointed layers, because XLA's scheduler is
  free to hoist the recomputation of every layer of such a loop to before the backward,
  which keeps all of them alive at once again (seen on CPU: no saving); a loop body can't
  be hoisted. XLA also compiles one layer instead of ``num_hidden_layers``. Param paths
  (``layers_<i>``) and values are unchanged: the params are stacked per call. The loop
  still serves init and LoRA'd towers (a LoRA is keyed by each layer's own path).
  """
  num_hidden_layers: int = 12
  remat: str = 'none'

  @nn.compact
  def __call__(self, x, mask=None, is_causal=False, lora: Optional[LoRATree] = None):
    remat, policy = remat_policy(self.remat)
    fields = _fields(self, CLIPEncoderLayer)
    if remat and not lora and not self.is_initializing():
      return self._scan(x, mask, is_causal, fields, policy)
    states = [x]
    for i in range(self.num_hidden_layers):
      x = CLIPEncoderLayer(**fields, name=f'layers_{i}')(x, mask, is_causal, lora)
      states.append(x)
    return tuple(states)

  def _scan(self, x, mask, is_causal, fields, policy):
    layer = CLIPEncoderLayer(**fields, parent=None)
    params = self.variables['params']
    # Kernels stacked in the compute dtype, the dtype each Dense casts them to anyway:
    # the same values, half the copy. Norm scales and biases stay as stored.
    cast = lambda a: a.astype(self.dtype) if a.ndim >= 2 else a
    stacked = jax.tree.map(lambda *a: jnp.stack([cast(b) for b in a]),
                           *[params[f'layers_{i}'] for i in range(self.num_hidden_layers)])

    def body(h, p):
      h = layer.apply({'params': p}, h, mask, is_causal)
      return h, h

    body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    _, states = jax.lax.scan(body, x, stacked)
    return (x,) + tuple(states)


def _fields(module: nn.Module, cls: type) -> dict:
  """The dataclass fields of ``cls`` read from ``module`` (an instance of a subclass, or
  any module with fields of those names)."""
  return {f.name: getattr(module, f.name) for f in dataclasses.fields(cls)
          if f.init and f.name not in ('parent', 'name')}


def _add_positions(x, num_positions: int, dtype: Any):
  """x [..., n, d] plus rows 0..n-1 of a learned ``position_embedding`` table of
  ``num_positions``; called inside a compact method, so the table is the caller's."""
  n, width = x.shape[-2:]
  return x + nn.Embed(num_positions, width, dtype=dtype, name='position_embedding')(
      jnp.arange(n))


class CLIPTextEmbeddings(nn.Module):
  vocab_size: int
  hidden_size: int
  max_position_embeddings: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids):
    length = input_ids.shape[-1]
    if length > self.max_position_embeddings:
      raise ValueError(f'Sequence length {length} exceeds max_position_embeddings '
                       f'{self.max_position_embeddings}')
    tokens = nn.Embed(self.vocab_size, self.hidden_size, dtype=self.dtype,
                      name='token_embedding')(input_ids)
    return _add_positions(tokens, self.max_position_embeddings, self.dtype)


class _Tower(nn.Module):
  """What the text and vision transformers share: the encoder's fields (the defaults are
  the text tower's; the vision tower overrides its own) and the encoder and norms."""
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  remat: str = 'none'  # of each encoder layer (CLIPEncoder); no checkpoint field

  def _norm(self, name: str) -> nn.LayerNorm:
    return layer_norm(self.layer_norm_eps, self.dtype, name)

  def _encoder(self, x, mask=None, is_causal=False, lora: Optional[LoRATree] = None):
    return CLIPEncoder(**_fields(self, CLIPEncoder), name='encoder')(x, mask, is_causal, lora)


class CLIPTextTransformer(_Tower):
  """embeddings -> causal encoder -> final_layer_norm, pooled at the EOS token."""
  vocab_size: int = 49408
  max_position_embeddings: int = 77
  eos_token_id: int = 49407

  @nn.compact
  def __call__(self, input_ids, attention_mask=None,
               lora: Optional[LoRATree] = None) -> CLIPTextOutput:
    x = CLIPTextEmbeddings(self.vocab_size, self.hidden_size, self.max_position_embeddings,
                           self.dtype, name='embeddings')(input_ids)
    # Padding hides keys only; the causal mask is applied on top of it.
    mask = None if attention_mask is None else attention_mask[:, None, None, :].astype(bool)
    states = self._encoder(x, mask, True, lora)
    last = self._norm('final_layer_norm')(states[-1])
    if self.eos_token_id == 2:
      # Configs from before transformers PR #24773 say eos_token_id=2; transformers then
      # pools at the largest id (CLIP's EOS ends the vocabulary), so we do too.
      eos = jnp.argmax(input_ids, axis=-1)
    else:  # the first EOS: the pad token may equal EOS
      eos = jnp.argmax((input_ids == self.eos_token_id).astype(jnp.int32), axis=-1)
    pooled = jnp.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]
    return CLIPTextOutput(last_hidden_state=last, pooler_output=pooled, hidden_states=states)


class CLIPTextModel(CLIPTextTransformer):
  """transformers' CLIPTextModel: the transformer under ``text_model``; with a
  ``projection_dim``, CLIPTextModelWithProjection (SDXL's second text encoder), whose
  ``text_projection`` (no bias) of the pooled output is ``text_embeds``.

  ``apply({'params': p}, input_ids [b, t] int, attention_mask=None [b, t], lora=None)``
  returns a ``CLIPTextOutput``.
  """
  projection_dim: Optional[int] = None

  @nn.compact
  def __call__(self, input_ids, attention_mask=None,
               lora: Optional[LoRATree] = None) -> CLIPTextOutput:
    out = CLIPTextTransformer(**_fields(self, CLIPTextTransformer), name='text_model')(
        input_ids, attention_mask, lora)
    if self.projection_dim is None:
      return out
    embeds = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype,
                      name='text_projection')(out.pooler_output)
    return out.replace(text_embeds=embeds)

  def dummy_inputs(self) -> tuple:
    return (jnp.zeros((1, self.max_position_embeddings), jnp.int32),)


class CLIPVisionEmbeddings(nn.Module):
  hidden_size: int
  image_size: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values):
    batch, height, width, _ = pixel_values.shape
    if (height, width) != (self.image_size, self.image_size):
      raise ValueError(f'Image size {height}x{width} does not match the model\'s '
                       f'{self.image_size}x{self.image_size}')
    p = self.patch_size
    patches = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding='VALID',
                      use_bias=False, dtype=self.dtype, name='patch_embedding')(pixel_values)
    patches = patches.reshape(batch, -1, self.hidden_size)  # row-major, as torch's flatten
    cls = self.param('class_embedding', nn.initializers.normal(self.hidden_size ** -0.5),
                     (self.hidden_size,))
    cls = jnp.broadcast_to(cls.astype(patches.dtype), (batch, 1, self.hidden_size))
    x = jnp.concatenate([cls, patches], axis=1)
    return _add_positions(x, x.shape[1], self.dtype)


class CLIPVisionTransformer(_Tower):
  """embeddings -> pre_layrnorm -> encoder; pooled = post_layernorm(CLS)."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_attention_heads: int = 12
  image_size: int = 224
  patch_size: int = 32

  @nn.compact
  def __call__(self, pixel_values, lora: Optional[LoRATree] = None) -> CLIPVisionOutput:
    x = CLIPVisionEmbeddings(self.hidden_size, self.image_size, self.patch_size, self.dtype,
                             name='embeddings')(pixel_values)
    x = self._norm('pre_layrnorm')(x)  # sic, transformers
    states = self._encoder(x, lora=lora)
    pooled = self._norm('post_layernorm')(states[-1][:, 0])
    return CLIPVisionOutput(last_hidden_state=states[-1], pooler_output=pooled,
                            hidden_states=states)


class CLIPVisionModelWithProjection(CLIPVisionTransformer):
  """transformers' CLIPVisionModelWithProjection: ``vision_model`` + ``visual_projection``.

  With ``projection_dim=None`` it is a CLIPVisionModel (no projection, no image_embeds).
  ``apply({'params': p}, pixel_values [b, h, w, c] normalized, lora=None)`` returns a
  ``CLIPVisionOutput``.
  """
  num_channels: int = 3
  projection_dim: Optional[int] = 512

  @nn.compact
  def __call__(self, pixel_values, lora: Optional[LoRATree] = None) -> CLIPVisionOutput:
    out = CLIPVisionTransformer(**_fields(self, CLIPVisionTransformer), name='vision_model')(
        pixel_values, lora)
    if self.projection_dim is None:
      return out
    embeds = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype,
                      name='visual_projection')(out.pooler_output)
    return out.replace(image_embeds=embeds)

  def dummy_inputs(self) -> tuple:
    return (jnp.zeros((1, self.image_size, self.image_size, self.num_channels), jnp.float32),)


def _tower_config(config: Mapping[str, Any], tower: str) -> dict:
  """The ``text``/``vision`` config inside a full CLIPConfig, or the config itself."""
  sub = config.get(f'{tower}_config') or config
  model_type = sub.get('model_type', f'clip_{tower}_model')
  if model_type != f'clip_{tower}_model':
    raise ValueError(f'Expected a CLIPConfig or a clip_{tower}_model config, got model_type '
                     f'{model_type!r}')
  return dict(sub)


def _build(cls: type, config: Mapping[str, Any], dtype: Any, **overrides) -> nn.Module:
  # Only the fields that shape the computation are read; the rest of a transformers
  # config (dropout, init ranges, token ids for generation, versions) does not matter here.
  kwargs = {f.name: config[f.name] for f in dataclasses.fields(cls)
            if f.init and f.name in config and f.name not in ('parent', 'name', 'dtype')}
  module = cls(**{**kwargs, **overrides}, dtype=dtype)
  activation(module.hidden_act)
  if module.hidden_size % module.num_attention_heads:
    raise ValueError(f'hidden_size {module.hidden_size} is not a multiple of '
                     f'num_attention_heads {module.num_attention_heads}')
  return module


def text_from_config(config: Mapping[str, Any], dtype: Any = jnp.float32) -> CLIPTextModel:
  """A CLIP text tower from a transformers CLIPConfig or CLIPTextConfig dict.

  Every CLIPTextConfig has a projection_dim; only a config whose architectures is
  ['CLIPTextModelWithProjection'] gets the projection (a CLIPModel's text_projection
  belongs to the full model, so its text tower gets none).
  """
  with_projection = config.get('architectures') == ['CLIPTextModelWithProjection']
  return _build(CLIPTextModel, _tower_config(config, 'text'), dtype,
                projection_dim=config.get('projection_dim', 512) if with_projection else None)


def vision_from_config(config: Mapping[str, Any],
                       dtype: Any = jnp.float32) -> CLIPVisionModelWithProjection:
  """A CLIP vision tower from a transformers CLIPConfig or CLIPVisionConfig dict.

  A full CLIPConfig's projection_dim sits at its top level (CLIPModel's visual_projection);
  a config whose architectures is ['CLIPVisionModel'] gets no projection.
  """
  sub = _tower_config(config, 'vision')
  overrides = {}
  if config.get('vision_config'):
    overrides['projection_dim'] = config.get('projection_dim', 512)
  elif config.get('architectures') == ['CLIPVisionModel']:
    overrides['projection_dim'] = None
  return _build(CLIPVisionModelWithProjection, sub, dtype, **overrides)


def resize_like_pil(x, size: tuple[int, int], method: str, eight_bit: bool) -> jax.Array:
  """x [n, h, w, c] in [0, 1] resized to ``size`` (height, width) as PIL's antialiased
  ``Image.resize`` does: width first, then height, each pass clipping the cubic overshoot
  and, for 8-bit images (``eight_bit``), rounding to 8 bits. ``method``: 'bicubic' (PIL's
  BICUBIC, Keys a=-0.5) or 'linear' (BILINEAR, a triangle filter)."""
  n, h, w, c = x.shape
  for shape in ((n, h, size[1], c), (n,) + tuple(size) + (c,)):
    if shape != x.shape:  # PIL copies a side it does not resize.
      x = jnp.clip(jax.image.resize(x, shape, method, antialias=True), 0.0, 1.0)
      if eight_bit:
        x = jnp.round(x * 255.0) / 255.0
  return x


def preprocess_images(images, image_size: int = 224, mean: Sequence[float] = CLIP_MEAN,
                      std: Sequence[float] = CLIP_STD) -> jax.Array:
  """CLIPImageProcessor in jnp: bicubic resize of the shorter side, center crop, normalize.

  Args:
    images: RGB [h, w, 3] or [n, h, w, 3] (one size), uint8 or float in [0, 1].
    image_size: the shorter side after resizing and the side of the square crop.
    mean, std: per-channel normalization (CLIP's by default).

  Returns:
    float32 [n, image_size, image_size, 3].

  Deviation from CLIPImageProcessor (PIL): ``jax.image.resize``'s antialiased Keys cubic
  (a=-0.5) is PIL's bicubic filter, but PIL rounds the resized uint8 image to uint8 and
  treats borders slightly differently, so pixels differ by a few 1/255 at most (see
  tests/test_clip.py); CLIP features are insensitive to that.
  """
  images = jnp.asarray(images)
  if images.ndim == 3:
    images = images[None]
  x = images.astype(jnp.float32)
  if images.dtype == jnp.uint8:
    x = x / 255.0
  h, w = x.shape[1:3]
  # transformers' get_resize_output_image_size: the longer side is floored.
  long = int(image_size * max(h, w) / min(h, w))
  new_h, new_w = (long, image_size) if w <= h else (image_size, long)
  x = resize_like_pil(x, (new_h, new_w), 'bicubic', images.dtype == jnp.uint8)
  top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
  x = x[:, top:top + image_size, left:left + image_size]
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def model_max_length(tokenizer) -> int:
  """The tokenizer's model_max_length, or 77 (CLIP's) where it sets none."""
  from transformers.tokenization_utils_base import VERY_LARGE_INTEGER  # pylint: disable=g-import-not-at-top
  length = tokenizer.model_max_length
  return 77 if length >= VERY_LARGE_INTEGER else length


def tokenize(tokenizer, prompts, max_length: Optional[int] = None) -> np.ndarray:
  """Token ids [len(prompts), max_length] int32, padded and truncated as diffusers does.

  max_length defaults to `model_max_length(tokenizer)`.
  """
  if isinstance(prompts, str):
    prompts = [prompts]
  max_length = max_length or model_max_length(tokenizer)
  ids = tokenizer(list(prompts), padding='max_length', max_length=max_length,
                  truncation=True, return_tensors='np').input_ids
  return ids.astype(np.int32)
