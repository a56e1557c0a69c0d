"""LoRA: applying factors inside the models.

A LoRA tree maps a target layer's path (its Flax param path joined by '/', e.g.
``down_blocks_1/attentions_0/transformer_blocks_0/attn2/to_q``) to its factors:
``down`` [batch?, r, d_in], ``up`` [batch?, d_out, r] and an optional ``scale``
(a scalar, or [batch] with per-sample factors). With a leading batch axis every sample
gets its own LoRA. ``up @ down`` is never formed: the delta is
``((x @ down^T) @ up^T) * scale``.
"""
import dataclasses
import re
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
from flax import traverse_util

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


# ---------------------------------------------------------------- which layers
@dataclasses.dataclass(frozen=True)
class Target:
  """One LoRA-adapted Dense layer: its path in the params and its kernel's dims."""
  path: str
  d_in: int
  d_out: int


# Named target sets; a config may also give any regex over '/'-joined Dense paths.
TARGET_SETS = {
    'cross_attn': r'attn2/(to_q|to_k|to_v|to_out_0)$',
    'self_attn': r'attn1/(to_q|to_k|to_v|to_out_0)$',
    'ff': r'ff/(net_0/proj|net_2)$',
    'text_attn': r'self_attn/(q_proj|k_proj|v_proj|out_proj)$',
}


def _natural_key(path: str):
  return [int(s) if s.isdigit() else s for s in re.split(r'(\d+)', path)]


def find_targets(params: Any, targets: str | Sequence[str]) -> tuple[Target, ...]:
  """The Dense layers whose path matches any of ``targets`` (set names or regexes).

  The order is the natural order of the paths (down blocks, mid, up blocks), stable
  across runs and checkpoints, so it can index a decoder's token sequence.
  """
  if isinstance(targets, str):
    targets = [t.strip() for t in targets.split(',') if t.strip()]
  patterns = [re.compile(TARGET_SETS.get(t, t)) for t in targets]
  found = []
  for path, kernel in traverse_util.flatten_dict(params, sep='/').items():
    if not path.endswith('/kernel') or len(kernel.shape) != 2:
      continue
    layer = path[:-len('/kernel')]
    if any(p.search(layer) for p in patterns):
      found.append(Target(layer, int(kernel.shape[0]), int(kernel.shape[1])))
  if not found:
    raise ValueError(f'No Dense layer matches LoRA targets {list(targets)}.')
  return tuple(sorted(found, key=lambda t: _natural_key(t.path)))


# ---------------------------------------------------------------- merging
def merge(params: Any, lora: LoRATree) -> Any:
  """Folds a shared (unbatched) LoRA into the Dense kernels: W += scale * down^T up^T."""
  flat = traverse_util.flatten_dict(params, sep='/')
  for path, f in lora.items():
    if f['down'].ndim != 2:
      raise ValueError(f'Cannot merge a per-sample LoRA (at {path}); pick one sample.')
    key = path + '/kernel'
    if key not in flat:
      raise KeyError(f'LoRA target {path} is not a Dense layer of these params.')
    delta = (f['down'].T @ f['up'].T) * jnp.asarray(f.get('scale', 1.0))
    flat[key] = flat[key] + delta.astype(flat[key].dtype)
  return traverse_util.unflatten_dict(flat, sep='/')
