"""LoRA: applying factors inside the models.

A LoRA tree maps a target layer's path (its Flax param path joined by '/', e.g.
``down_blocks_1/attentions_0/transformer_blocks_0/attn2/to_q``) to its factors:
``down`` [batch?, r, d_in], ``up`` [batch?, d_out, r] and an optional ``scale``
(a scalar, or [batch] with per-sample factors). With a leading batch axis every sample
gets its own LoRA. ``up @ down`` is never formed: the delta is
``((x @ down^T) @ up^T) * scale``.
"""
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

LoRATree = Mapping[str, Mapping[str, Any]]


def lora_delta(x: jnp.ndarray, factors: Mapping[str, Any]) -> jnp.ndarray:
  """The LoRA contribution for inputs x [batch, ..., d_in]."""
  down = factors['down'].astype(x.dtype)
  up = factors['up'].astype(x.dtype)
  if down.ndim == 2:
    y = (x @ down.T) @ up.T
  else:
    y = jnp.einsum('b...i,bri->b...r', x, down)
    y = jnp.einsum('b...r,bor->b...o', y, up)
  scale = jnp.asarray(factors.get('scale', 1.0), x.dtype)
  if scale.ndim == 1:  # per-sample scale
    scale = scale.reshape((-1,) + (1,) * (x.ndim - 1))
  return y * scale


class Dense(nn.Dense):
  """nn.Dense that adds the LoRA delta stored under its own path in ``lora``."""

  @nn.compact
  def __call__(self, x: jnp.ndarray, lora: Optional[LoRATree] = None) -> jnp.ndarray:
    y = super().__call__(x)
    factors = lora.get('/'.join(self.path)) if lora else None
    if factors is None:
      return y
    return y + lora_delta(x.astype(y.dtype), factors)
