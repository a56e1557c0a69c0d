"""IP-Adapter files (``ip-adapter*.safetensors`` / ``.bin``) -> our projection + UNet params.

The layout is the original IP-Adapter release's, which diffusers' ``load_ip_adapter``
takes: ``image_proj.*`` (the image projection) and ``ip_adapter.N.to_k_ip.weight`` /
``ip_adapter.N.to_v_ip.weight``. N numbers the UNet's attention processors in diffusers'
module order (down blocks, up blocks, mid block; attn1 then attn2 in each transformer
block) and only the cross-attentions carry weights, so the i-th cross-attention is
N = 2 i + 1 (diffusers' ``_convert_ip_adapter_attn_to_diffusers``). `save_ip_adapter`
writes that layout (what the ``ip_adapter`` objective trains), which diffusers and
`load_ip_adapter` read.
"""
import os
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from hyperlora_jax import files
from hyperlora_jax.convert import core
from hyperlora_jax.models import ip_adapter

# The original Resampler's names -> diffusers' (IPAdapterPlusImageProjection).
_PLUS_RENAMES = ((r'^layers\.(\d+)\.0\.norm1\.', r'layers.\1.ln0.'),
                 (r'^layers\.(\d+)\.0\.norm2\.', r'layers.\1.ln1.'),
                 (r'^layers\.(\d+)\.0\.to_q\.', r'layers.\1.attn.to_q.'),
                 (r'^layers\.(\d+)\.0\.to_out\.', r'layers.\1.attn.to_out.0.'),
                 (r'^layers\.(\d+)\.1\.0\.', r'layers.\1.ff.0.'),
                 (r'^layers\.(\d+)\.1\.1\.', r'layers.\1.ff.1.net.0.proj.'),
                 (r'^layers\.(\d+)\.1\.3\.', r'layers.\1.ff.1.net.2.'))
_TO_KV = re.compile(r'^layers\.(\d+)\.0\.to_kv\.weight$')
# diffusers' names -> the original's, for writing (the inverse of _PLUS_RENAMES).
_PLUS_ORIGINAL = ((r'^layers\.(\d+)\.ln0\.', r'layers.\1.0.norm1.'),
                  (r'^layers\.(\d+)\.ln1\.', r'layers.\1.0.norm2.'),
                  (r'^layers\.(\d+)\.attn\.to_q\.', r'layers.\1.0.to_q.'),
                  (r'^layers\.(\d+)\.attn\.to_out\.0\.', r'layers.\1.0.to_out.'),
                  (r'^layers\.(\d+)\.ff\.0\.', r'layers.\1.1.0.'),
                  (r'^layers\.(\d+)\.ff\.1\.net\.0\.proj\.', r'layers.\1.1.1.'),
                  (r'^layers\.(\d+)\.ff\.1\.net\.2\.', r'layers.\1.1.3.'))


class IPAdapter(NamedTuple):
  projection: Any  # ip_adapter.ImageProjection | ip_adapter.Resampler
  projection_params: Any
  unet_params: Any  # to_k_ip/to_v_ip beside each cross-attention: ip_adapter.merge_params


def read_ip_adapter_file(path: str, allow_pickle: bool = False) -> dict[str, dict]:
  """{'image_proj': {...}, 'ip_adapter': {...}} of a .safetensors (flat, prefixed keys)
  or .bin (a pickled dict of the two, read by torch's weights-only loader) file."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'No such IP-Adapter file: {path}')
  if path.endswith('.safetensors'):
    flat = core.read_safetensors(path)
    parts = {part: {k[len(part) + 1:]: v for k, v in flat.items() if k.startswith(part + '.')}
             for part in ('image_proj', 'ip_adapter')}
    other = sorted(k for k in flat if not k.startswith(('image_proj.', 'ip_adapter.')))
  elif not allow_pickle:
    raise core.CheckpointError(f'{path} is a pickle, which can run arbitrary code. Convert '
                               'it to safetensors, or pass allow_pickle=True to read it '
                               "with torch's weights-only loader.")
  else:
    import torch
    state = torch.load(path, map_location='cpu', weights_only=True)
    other = sorted(k for k in state if k not in ('image_proj', 'ip_adapter'))
    parts = {part: {k: v.float().numpy() for k, v in state.get(part, {}).items()}
             for part in ('image_proj', 'ip_adapter')}
  empty = [part for part, state in parts.items() if not state]
  if empty or other:
    problems = [f'no {part}.* keys' for part in empty]
    problems += [f'unexpected keys {other[:5]}'] if other else []
    raise core.CheckpointError(f'{path} is not an IP-Adapter file: ' + '; '.join(problems))
  return parts


def cross_attention_paths(unet_params: Any) -> list[tuple[str, ...]]:
  """The UNet's cross-attention modules in diffusers' attn_processors order."""
  paths = [p[:-2] for p in traverse_util.flatten_dict(unet_params)
           if p[-3:] == ('attn2', 'to_k', 'kernel')]
  rank = {'down_blocks': 0, 'up_blocks': 1, 'mid_block': 2}
  return sorted(paths, key=lambda p: (rank[re.sub(r'_\d+$', '', p[0])], _natural('/'.join(p))))


def build_projection(state: dict, dtype: Any = jnp.float32):
  """The projection module an ``image_proj`` state dict describes, and the state dict
  in diffusers' names (which `core.torch_to_flax` maps with its one rule)."""
  if 'proj.weight' in state and 'norm.weight' in state:  # IP-Adapter
    cross = state['norm.weight'].shape[0]
    module = ip_adapter.ImageProjection(
        image_embed_dim=state['proj.weight'].shape[1], cross_attention_dim=cross,
        num_tokens=state['proj.weight'].shape[0] // cross, dtype=dtype)
    return module, {k.replace('proj.', 'image_embeds.', 1) if k.startswith('proj.') else k: v
                    for k, v in state.items()}
  if 'latents' in state and 'proj_in.weight' in state:  # IP-Adapter Plus
    renamed = {}
    for key, value in state.items():
      kv = _TO_KV.match(key)
      if kv:  # one [2 inner, hidden] matrix in the original, to_k and to_v in diffusers
        renamed[f'layers.{kv[1]}.attn.to_k.weight'], renamed[f'layers.{kv[1]}.attn.to_v.weight'] = (
            np.split(value, 2, axis=0))
        continue
      for pattern, replacement in _PLUS_RENAMES:
        key = re.sub(pattern, replacement, key)
      renamed[key] = value
    hidden = state['latents'].shape[2]
    depth = len({k.split('.')[1] for k in renamed if k.startswith('layers.')})
    module = ip_adapter.Resampler(
        embed_dims=state['proj_in.weight'].shape[1], output_dims=state['proj_out.weight'].shape[0],
        hidden_dims=hidden, depth=depth,
        heads=renamed['layers.0.attn.to_q.weight'].shape[0] // 64,  # diffusers' dim_head
        num_queries=state['latents'].shape[1],
        ffn_ratio=renamed['layers.0.ff.1.net.0.proj.weight'].shape[0] // hidden, dtype=dtype)
    return module, renamed
  kind = ('IP-Adapter Full' if 'proj.3.weight' in state else 'IP-Adapter FaceID Plus'
          if 'perceiver_resampler.proj_in.weight' in state else 'IP-Adapter FaceID'
          if 'norm.weight' in state else 'unknown')
  raise core.CheckpointError(f'image_proj of kind {kind} is not supported (only IP-Adapter\'s '
                             'ImageProjection and IP-Adapter Plus\' Resampler); its keys: '
                             f'{sorted(state)[:8]}')


def load_ip_adapter(path: str, unet_params: Any, dtype: Any = jnp.float32,
                    allow_pickle: bool = False) -> IPAdapter:
  """Reads an IP-Adapter file for a UNet whose params (or their shapes) are given.

  Raises CheckpointError when the file does not fit: a projection whose tokens are not
  the UNet's cross_attention_dim, ip_adapter.N keys for cross-attentions the UNet does
  not have (or missing, or misshaped), each named. Nothing is returned half-loaded.
  """
  parts = read_ip_adapter_file(path, allow_pickle)
  projection, proj_state = build_projection(parts['image_proj'], dtype)
  targets = cross_attention_paths(unet_params)
  if not targets:
    raise core.CheckpointError('The UNet has no cross-attention for IP-Adapter weights.')
  flat_unet = traverse_util.flatten_dict(unet_params)
  cross = flat_unet[targets[0] + ('to_k', 'kernel')].shape[0]
  proj_shapes = jax.eval_shape(lambda: projection.init(jax.random.key(0),
                                                       *projection.dummy_inputs()))['params']
  tokens = jax.eval_shape(lambda p: projection.apply({'params': p}, *projection.dummy_inputs()),
                          proj_shapes)
  if tokens.shape[-1] != cross:
    raise core.CheckpointError(f'{path}: its image projection makes {tokens.shape[-1]}-dim '
                               f"tokens; this UNet's cross-attentions take {cross}.")
  try:
    proj_params = core.torch_to_flax(proj_state, proj_shapes)
  except core.CheckpointError as e:
    raise core.CheckpointError(f'{path}: image_proj does not match its kind '
                               f'({type(projection).__name__}).\n{e}') from None

  # The file's own key for each of the UNet's to_k_ip/to_v_ip, shaped like to_k/to_v.
  wanted = {f'{2 * i + 1}.{name}_ip.weight': (target, name)
            for i, target in enumerate(targets) for name in ('to_k', 'to_v')}
  flat, missing, misshaped = {}, [], []
  for key, (target, name) in wanted.items():
    kernel = flat_unet[target + (name, 'kernel')]  # [cross, inner]; torch's is transposed
    where = f'{tuple(kernel.shape[::-1])} for {"/".join(target)}'
    value = parts['ip_adapter'].get(key)
    if value is None:
      missing.append(f'ip_adapter.{key} {where}')
    elif value.shape != kernel.shape[::-1]:
      misshaped.append(f'ip_adapter.{key}: {tuple(value.shape)}, expected {where}')
    else:
      flat[target + (name + '_ip', 'kernel')] = np.asarray(value.T, kernel.dtype)
  unexpected = [f'ip_adapter.{k}' for k in parts['ip_adapter'] if k not in wanted]
  problems = [f'{len(items)} {title}:\n  ' + '\n  '.join(sorted(items, key=_natural))
              for title, items in (('missing', missing), ('misshaped', misshaped),
                                   ('unexpected', unexpected)) if items]
  if problems:
    found = sorted({int(k.split('.')[0]) for k in parts['ip_adapter'] if k[0].isdigit()})
    raise core.CheckpointError('\n'.join([
        f'{path} does not fit this UNet: it has weights for {len(found)} cross-attentions '
        f'(ip_adapter.N for N in {found}), the UNet has {len(targets)} '
        f'(N = 1, 3, ..., {2 * len(targets) - 1}).'] + problems))
  return IPAdapter(projection, proj_params, traverse_util.unflatten_dict(flat))


def save_ip_adapter(path: str, projection, projection_params: Any, unet_ip_params: Any,
                    unet_params: Any) -> None:
  """Writes an IP-Adapter as a .safetensors file in the original release's layout
  (`read_ip_adapter_file`'s): ``image_proj.*`` and ``ip_adapter.{2 i + 1}.to_k_ip.weight``
  / ``to_v_ip.weight`` over the UNet's cross-attentions in diffusers' order, so diffusers'
  load_ip_adapter and `load_ip_adapter` read it. ``unet_ip_params`` is the to_k_ip/to_v_ip
  tree `ip_adapter.merge_params` takes, ``unet_params`` the UNet's (or their shapes)."""
  state = {k.lstrip('.'): v for k, v in core.flax_to_torch(projection_params).items()}
  if isinstance(projection, ip_adapter.ImageProjection):
    state = {re.sub(r'^image_embeds\.', 'proj.', k): v for k, v in state.items()}
  else:
    for i in range(projection.depth):  # one to_kv matrix in the original
      state[f'layers.{i}.0.to_kv.weight'] = np.concatenate(
          [state.pop(f'layers.{i}.attn.to_k.weight'), state.pop(f'layers.{i}.attn.to_v.weight')])
    renamed = {}
    for key, value in state.items():
      for pattern, replacement in _PLUS_ORIGINAL:
        key = re.sub(pattern, replacement, key)
      renamed[key] = value
    state = renamed
  flat = traverse_util.flatten_dict(unet_ip_params)
  out = {f'image_proj.{k}': v for k, v in state.items()}
  for i, target in enumerate(cross_attention_paths(unet_params)):
    for name in ('to_k_ip', 'to_v_ip'):
      out[f'ip_adapter.{2 * i + 1}.{name}.weight'] = np.ascontiguousarray(
          np.asarray(flat[target + (name, 'kernel')], np.float32).T)
  with files.atomic_file(path) as tmp:
    save_file(out, tmp, metadata={'format': 'pt'})


def ip_params_from_unet(unet_params: Any) -> dict:
  """to_k_ip/to_v_ip beside every cross-attention, equal to its to_k/to_v: how the
  IP-Adapter paper starts them (the image attention first reads as the text one does)."""
  flat = traverse_util.flatten_dict(unet_params)
  out = {}
  for target in cross_attention_paths(unet_params):
    for name in ('to_k', 'to_v'):
      out[target + (name + '_ip', 'kernel')] = flat[target + (name, 'kernel')]
  return traverse_util.unflatten_dict(out)


def _natural(key: str):
  return [int(s) if s.isdigit() else s for s in re.split(r'(\d+)', key)]
