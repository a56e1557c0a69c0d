"""LoRA.rar's merger: per target layer, two coefficients for every column of two LoRAs.

The input of layer l is its two deltas' columns side by side, [d_in, 2 d_out] (column j
of ``up @ down`` is what input feature j adds to the output); each layer has its own
Linear(2 d_out -> hidden) -> ReLU -> Linear(hidden -> 2), applied to every column, and
returns [d_in, 2]: the content and style coefficients of each column (Shenaj et al.
2024, the public LoRA.rar code's shape). Layers of equal (d_in, d_out) run as one einsum
over a stacked leading axis. The output is 1 + the last Linear, whose kernel starts at
zero: an untrained merger is the direct sum, and training moves it from there.
"""
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


def groups(shapes: Sequence[tuple[int, int]]) -> tuple:
  """((d_in, d_out), the indices of the layers of that shape), in first-seen order."""
  out = {}
  for i, shape in enumerate(shapes):
    out.setdefault(tuple(shape), []).append(i)
  return tuple((shape, tuple(ids)) for shape, ids in out.items())


class Merger(nn.Module):
  """``Merger(shapes)(columns) -> coefficients``: one [..., d_in, 2 d_out] array per
  layer in, one [..., d_in, 2] array per layer out (leading axes: pairs)."""
  paths: tuple  # the merged layers (LoRA tree paths): what it was trained for
  shapes: tuple  # their ((d_in, d_out), ...), in order
  hidden: int = 128

  @nn.compact
  def __call__(self, columns: Sequence[jnp.ndarray]) -> list:
    out = [None] * len(columns)
    for g, ((_, d_out), ids) in enumerate(groups(self.shapes)):
      n = len(ids)
      w0 = self.param(f'group_{g}_kernel_0', nn.initializers.lecun_normal(batch_axis=(0,)),
                      (n, 2 * d_out, self.hidden))
      b0 = self.param(f'group_{g}_bias_0', nn.initializers.zeros, (n, self.hidden))
      w1 = self.param(f'group_{g}_kernel_1', nn.initializers.zeros, (n, self.hidden, 2))
      b1 = self.param(f'group_{g}_bias_1', nn.initializers.zeros, (n, 2))
      x = jnp.stack([columns[i] for i in ids])  # [n, ..., d_in, 2 d_out]
      lead = (1,) * (x.ndim - 2)
      h = nn.relu(jnp.einsum('n...ci,nih->n...ch', x, w0) + b0.reshape((n,) + lead + (-1,)))
      y = 1 + jnp.einsum('n...ch,nho->n...co', h, w1) + b1.reshape((n,) + lead + (2,))
      for k, i in enumerate(ids):
        out[i] = y[k]
    return out
