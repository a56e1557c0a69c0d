"""IP-Adapter's image projections (diffusers' names): image embeddings -> UNet tokens.

The tokens go to the UNet call as ``ip_tokens`` (with ``ip_scale``); the UNet's
cross-attentions then read them through their to_k_ip/to_v_ip params, a subtree of
their own that `merge_params` lays over the UNet's params for the call. Several images
per sample: concatenate their tokens along N (what diffusers' [B, images, N, C] amounts
to: one attention over all of them).
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax import traverse_util

from hyperlora_jax.models import unet

Dtype = Any


def _layer_norm(name, dtype):
  return nn.LayerNorm(epsilon=1e-5, dtype=dtype, name=name)  # torch's default eps


class ImageProjection(nn.Module):
  """diffusers' ImageProjection (IP-Adapter): a pooled CLIP image embedding [B, D] ->
  ``num_tokens`` tokens [B, num_tokens, cross_attention_dim]."""
  image_embed_dim: int
  cross_attention_dim: int
  num_tokens: int = 4
  dtype: Dtype = jnp.float32

  def dummy_inputs(self):
    return (jnp.zeros((1, self.image_embed_dim)),)

  @nn.compact
  def __call__(self, image_embeds):
    x = nn.Dense(self.num_tokens * self.cross_attention_dim, dtype=self.dtype,
                 name='image_embeds')(image_embeds.astype(self.dtype))
    x = x.reshape(x.shape[:1] + (self.num_tokens, self.cross_attention_dim))
    return _layer_norm('norm', self.dtype)(x)


class ResamplerBlock(nn.Module):
  """IPAdapterPlusImageProjectionBlock: the latents attend to [features; latents]."""
  heads: int
  dim_head: int
  ffn_ratio: int
  dtype: Dtype

  @nn.compact
  def __call__(self, x, latents):
    q = _layer_norm('ln1', self.dtype)(latents)
    kv = jnp.concatenate([_layer_norm('ln0', self.dtype)(x), q], axis=1)
    latents = unet.Attention(self.heads, self.dim_head, False, self.dtype, out_bias=False,
                             name='attn')(q, kv) + latents
    h = _layer_norm('ff_0', self.dtype)(latents)
    return unet.FeedForward(self.dtype, gated=False, use_bias=False, mult=self.ffn_ratio,
                            name='ff_1')(h) + latents


class Resampler(nn.Module):
  """IPAdapterPlusImageProjection (IP-Adapter Plus): CLIP hidden states [B, N, D] ->
  ``num_queries`` tokens [B, num_queries, output_dims] through learned latent queries."""
  embed_dims: int
  output_dims: int
  hidden_dims: int
  depth: int = 4
  heads: int = 16
  dim_head: int = 64
  num_queries: int = 8
  ffn_ratio: int = 4
  dtype: Dtype = jnp.float32

  def dummy_inputs(self):
    return (jnp.zeros((1, 1, self.embed_dims)),)

  @nn.compact
  def __call__(self, x):
    latents = self.param('latents', nn.initializers.normal(self.hidden_dims ** -0.5),
                         (1, self.num_queries, self.hidden_dims))
    x = nn.Dense(self.hidden_dims, dtype=self.dtype, name='proj_in')(x.astype(self.dtype))
    latents = jnp.broadcast_to(latents.astype(self.dtype), (x.shape[0],) + latents.shape[1:])
    for i in range(self.depth):
      latents = ResamplerBlock(self.heads, self.dim_head, self.ffn_ratio, self.dtype,
                               name=f'layers_{i}')(x, latents)
    latents = nn.Dense(self.output_dims, dtype=self.dtype, name='proj_out')(latents)
    return _layer_norm('norm_out', self.dtype)(latents)


def merge_params(unet_params: Any, ip_params: Any) -> dict:
  """The UNet's params with the IP-Adapter's to_k_ip/to_v_ip laid in beside each
  cross-attention: what ``unet.apply`` takes with ``ip_tokens``. Under jit this costs
  nothing; gradients reach each tree as usual (train one, keep the other frozen)."""
  flat = traverse_util.flatten_dict(unet_params)
  for path, value in traverse_util.flatten_dict(ip_params).items():
    if path in flat:
      raise ValueError(f'IP-Adapter param {"/".join(path)} is already in the UNet params.')
    flat[path] = value
  return traverse_util.unflatten_dict(flat)
