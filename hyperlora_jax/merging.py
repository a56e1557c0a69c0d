"""Merging a content LoRA and a style LoRA into one plain LoRA: sum, average, ZipLoRA,
LoRA.rar, behind one call, ``merge(content, style, method, **opts)``.

Every method gives each layer's two LoRAs one coefficient per column (input feature j
of the layer), m_c and m_s [d_in], and the merged delta is ``dW_c diag(m_c) + dW_s
diag(m_s)``. Scaling the columns of ``up @ down`` scales the columns of ``down``, so the
merge is exactly the plain LoRA ``up = [up_c up_s]``, ``down = [down_c m_c; down_s m_s]``
of rank r_c + r_s (`combine`): what the LoRA files hold, with no approximation.

* ``sum``: m = 1; ``average``: m_c = weight, m_s = 1 - weight.
* ``ziplora`` (Shah et al. 2023, the public ziplora-pytorch's loss): m_c, m_s of every
  common layer optimized from 1 so that the merged model's outputs stay close to each
  LoRA's own on its own inputs, plus ``similarity`` * mean |m_c * m_s| (the mergers'
  overlap), ``steps`` Adam steps in one compiled ``lax.fori_loop`` (``compiled=False``:
  the same step from a Python loop, for the benchmark).
* ``lorarar`` (Shenaj et al. 2024): a trained `models.merger.Merger` predicts m_c, m_s
  of the layers it was trained for (to_q and to_out by default) from the two LoRAs'
  columns in one forward pass; the other layers (to_k, to_v) are summed.

LoRA trees are the `hyperlora_jax.lora` layout (shared: one LoRA; or per sample, with a
leading pair axis, as the merger's training merges a batch of pairs). ``predict(tree,
inputs, base) -> outputs`` is the frozen base model (params ``base``, an argument, not
a constant of the compiled program) with a LoRA, e.g. the UNet's noise prediction on
noised latents; the caller builds it (merging knows no model or file).
"""
import functools
import re
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from hyperlora_jax import lora as lora_lib
from hyperlora_jax.models import merger as merger_lib

METHODS = ('sum', 'average', 'ziplora', 'lorarar')
# LoRA.rar's merged layers: the rest of a pair's layers are summed.
MERGER_LAYERS = r'(to_q|to_out_0)$'


class TrainedMerger(NamedTuple):
  """A merger module (its layers' paths and shapes: what it was trained for) and params."""
  module: merger_lib.Merger
  params: Any


def plain(tree: Mapping[str, Mapping[str, Any]]) -> dict:
  return {p: lora_lib.to_plain(f) for p, f in tree.items()}


def pair_layers(content, style, allow_partial: bool = False) -> tuple:
  """The layers both LoRAs adapt, in `content`'s order. Layers of one LoRA only are an
  error naming them (two LoRAs for other base models or target sets) unless
  ``allow_partial``; a common layer of other shapes (d_in, d_out) always is."""
  common = [p for p in content if p in style]
  misshaped = [f'{p}: content {_dims(content[p])}, style {_dims(style[p])}'
               for p in common if _dims(content[p]) != _dims(style[p])]
  if misshaped:
    raise ValueError(f'{len(misshaped)} layers of the two LoRAs have other shapes (LoRAs for '
                     'other base models?): ' + '; '.join(misshaped[:5]))
  only = {'content': [p for p in content if p not in style],
          'style': [p for p in style if p not in content]}
  if not common:
    raise ValueError('The two LoRAs have no layer in common: LoRAs for other base models '
                     f'or layer sets (content e.g. {only["content"][:3]}, style e.g. '
                     f'{only["style"][:3]}).')
  if (only['content'] or only['style']) and not allow_partial:
    raise ValueError(
        'The two LoRAs adapt other layers: only in the content LoRA '
        f'{len(only["content"])} ({only["content"][:3]}), only in the style LoRA '
        f'{len(only["style"])} ({only["style"][:3]}). --allow_partial (allow_partial=True) '
        f'merges the {len(common)} common layers and keeps the others as they are.')
  return tuple(common)


def _dims(factors) -> tuple:
  return int(jnp.shape(factors['down'])[-1]), int(jnp.shape(factors['up'])[-2])


def combine(content, style, coefficients: Mapping[str, tuple], allow_partial=False) -> dict:
  """The merged plain LoRA: every common layer's [up_c up_s], [down_c m_c; down_s m_s]
  (a layer without coefficients: m = 1, the sum); layers of one LoRA only (with
  ``allow_partial``) are that LoRA's own factors. Shared or per-pair trees (a shared
  LoRA is repeated along the pairs of a per-pair one, as `lora.stack` does)."""
  content, style = plain(content), plain(style)
  common = pair_layers(content, style, allow_partial)
  out = {p: f for tree in (content, style) for p, f in tree.items() if p not in common}
  for p in common:
    c, s = content[p], style[p]
    if p in coefficients:
      m_c, m_s = coefficients[p]
      c = dict(c, down=c['down'] * m_c[..., None, :])
      s = dict(s, down=s['down'] * m_s[..., None, :])
    out[p] = lora_lib.stack({p: c}, {p: s})[p]
  return out


def columns(factors) -> jnp.ndarray:
  """The delta's columns [..., d_in, d_out] of plain factors (column j: feature j's)."""
  return jnp.einsum('...or,...ri->...io', factors['up'], factors['down'])


def merger_coefficients(merger: TrainedMerger, content, style) -> dict:
  """LoRA.rar: the trained merger's coefficients {path: (m_c, m_s)} for its layers."""
  content, style = plain(content), plain(style)
  paths = merger.module.paths
  missing = [p for p in paths if p not in content or p not in style]
  shapes = dict(zip(paths, merger.module.shapes))
  misshaped = [f'{p}: merger {shapes[p]}, LoRAs {_dims(content[p])}' for p in paths
               if p not in missing and _dims(content[p]) != tuple(shapes[p])]
  if missing or misshaped:
    raise ValueError(
        f'The merger was trained for other layers: of its {len(paths)} layers, '
        f'{len(missing)} are not in both LoRAs (e.g. {missing[:3]}) and {len(misshaped)} '
        f'have other shapes ({misshaped[:3]}). Use a merger trained on LoRAs of this base '
        'model and these targets.')
  x = [jnp.concatenate([columns(content[p]), columns(style[p])], axis=-1) for p in paths]
  out = merger.module.apply({'params': merger.params}, x)
  return {p: (m[..., 0], m[..., 1]) for p, m in zip(paths, out)}


def merger_paths(content, style, layers: str = MERGER_LAYERS) -> tuple:
  """The common layers a merger merges (``layers``: a regex over paths)."""
  pattern = re.compile(layers)
  paths = tuple(p for p in content if p in style and pattern.search(p))
  if not paths:
    raise ValueError(f'No layer of both LoRAs matches the merger layers {layers!r}.')
  return paths


def similarity_loss(coefficients: Mapping[str, tuple]) -> jnp.ndarray:
  """ZipLoRA's overlap of the two mergers: mean over layers of mean |m_c * m_s|."""
  return jnp.mean(jnp.stack([jnp.mean(jnp.abs(m_c * m_s)) for m_c, m_s in
                             coefficients.values()]))


def ziplora_loss(coefficients, content, style, predict: Callable, base, inputs: Mapping,
                 targets: Mapping, similarity: float = 0.01):
  """(loss, metrics) of merged coefficients: the merged model's outputs against each
  LoRA's own (``targets['content']`` = predict(content, inputs['content'], base), the
  style), as mean squared errors, + ``similarity`` * `similarity_loss`."""
  merged = combine(content, style, coefficients, allow_partial=True)
  err = {k: jnp.mean(jnp.square(predict(merged, inputs[k], base).astype(jnp.float32)
                                - targets[k])) for k in ('content', 'style')}
  overlap = similarity_loss(coefficients)
  return err['content'] + err['style'] + similarity * overlap, dict(
      content_loss=err['content'], style_loss=err['style'], similarity=overlap)


def lora_targets(content, style, predict: Callable, base, inputs: Mapping) -> dict:
  """Each LoRA's own outputs on its own inputs: what the merged model should keep."""
  return {k: jax.lax.stop_gradient(predict(plain(tree), inputs[k], base).astype(jnp.float32))
          for k, tree in (('content', content), ('style', style))}


def ziplora(content, style, predict: Callable, base, inputs: Mapping, *, steps: int = 100,
            lr: float = 1e-2, similarity: float = 0.01, compiled: bool = True,
            allow_partial: bool = False) -> dict:
  """ZipLoRA's per-pair optimization: {path: (m_c, m_s)} of every common layer, from 1.

  ``inputs``: {'content': ..., 'style': ...}, what ``predict`` takes for each LoRA's
  prompts. ``compiled``: the ``steps`` Adam steps as one ``lax.fori_loop`` (else the same
  jitted step called ``steps`` times from Python). Both are compiled once per
  ``predict`` and shapes: later pairs of the same shapes reuse the program."""
  content, style = plain(content), plain(style)
  common = pair_layers(content, style, allow_partial)
  content = {p: content[p] for p in common}
  style = {p: style[p] for p in common}
  opts = dict(predict=predict, lr=lr, similarity=similarity)
  carry = _ziplora_start(content, style, base, inputs, **opts)
  if compiled:
    return _ziplora_loop(carry, content, style, base, inputs, steps=steps, **opts)[0]
  for _ in range(steps):
    carry = _ziplora_step(carry, content, style, base, inputs, **opts)
  return carry[0]


_STATIC = ('predict', 'lr', 'similarity')


@functools.partial(jax.jit, static_argnames=_STATIC)
def _ziplora_start(content, style, base, inputs, *, predict, lr, similarity):
  del similarity
  m = {p: (jnp.ones(_dims(f)[0]), jnp.ones(_dims(f)[0])) for p, f in content.items()}
  return m, optax.adam(lr).init(m), lora_targets(content, style, predict, base, inputs)


def _update(carry, content, style, base, inputs, predict, lr, similarity):
  m, state, targets = carry
  grads = jax.grad(lambda m: ziplora_loss(m, content, style, predict, base, inputs, targets,
                                          similarity)[0])(m)
  updates, state = optax.adam(lr).update(grads, state, m)
  return optax.apply_updates(m, updates), state, targets


@functools.partial(jax.jit, static_argnames=_STATIC)
def _ziplora_step(carry, content, style, base, inputs, *, predict, lr, similarity):
  return _update(carry, content, style, base, inputs, predict, lr, similarity)


@functools.partial(jax.jit, static_argnames=('steps',) + _STATIC)
def _ziplora_loop(carry, content, style, base, inputs, *, steps, predict, lr, similarity):
  return jax.lax.fori_loop(0, steps, lambda _, c: _update(c, content, style, base, inputs,
                                                          predict, lr, similarity), carry)


def merge(content, style, method: str = 'sum', *, weight: float = 0.5,
          merger: Optional[TrainedMerger] = None, predict: Optional[Callable] = None,
          base=None, inputs: Optional[Mapping] = None, allow_partial: bool = False,
          **ziplora_opts) -> dict:
  """The merged plain LoRA of `content` and `style` by ``method`` (`METHODS`).

  weight: 'average''s content weight. merger: 'lorarar''s trained merger. predict, base,
  inputs (+ `ziplora`'s steps, lr, similarity, compiled): 'ziplora''s model and inputs.
  """
  content, style = plain(content), plain(style)
  common = pair_layers(content, style, allow_partial)
  if method == 'sum':
    coefficients = {}
  elif method == 'average':
    coefficients = {p: (jnp.full(_dims(content[p])[0], weight),
                        jnp.full(_dims(content[p])[0], 1 - weight)) for p in common}
  elif method == 'ziplora':
    if predict is None or base is None or inputs is None:
      raise ValueError("method='ziplora' optimizes through the base model: it needs "
                       'predict and inputs (the CLI: --base).')
    coefficients = ziplora(content, style, predict, base, inputs, allow_partial=allow_partial,
                           **ziplora_opts)
  elif method == 'lorarar':
    if merger is None:
      raise ValueError("method='lorarar' needs a trained merger (the CLI: --merger=RUN).")
    coefficients = merger_coefficients(merger, content, style)
  else:
    raise ValueError(f'Unknown merge method {method!r}; one of {METHODS}.')
  return combine(content, style, coefficients, allow_partial)
