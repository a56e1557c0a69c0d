"""Name and layout mapping between PyTorch state dicts and our Flax param trees.

One rule serves every model: a torch key such as
``down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_q.weight`` names the Flax
path ``down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_q/kernel``. Only the
list containers in ``LIST_NAMES`` fold their index into the name (so ``linear_1`` of the
time embedding stays itself), which makes the mapping a bijection in both directions.
Leaves are transposed from torch's (out, in[, kh, kw]) to Flax's ([kh, kw,] in, out).
"""
import json
import os
import re
from typing import Any, Iterable, Mapping

import numpy as np
from flax import traverse_util

# Module lists in diffusers and transformers whose entries are addressed by index
# (ControlNet's zero convs and conditioning-embedding convs, the Sequential `ff` of
# IP-Adapter Plus' Resampler among them).
LIST_NAMES = ('down_blocks', 'up_blocks', 'resnets', 'attentions', 'downsamplers',
              'upsamplers', 'transformer_blocks', 'to_out', 'net', 'layers',
              'controlnet_down_blocks', 'blocks', 'ff')
_TO_FLAX = re.compile(r'(?<![^.])(' + '|'.join(LIST_NAMES) + r')\.(\d+)(?=\.|$)')
_TO_TORCH = re.compile(r'^(' + '|'.join(LIST_NAMES) + r')_(\d+)$')


class CheckpointError(ValueError):
  """A checkpoint does not fit the model: names every offending key."""


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Reads one .safetensors file as numpy arrays (bf16/fp16 are widened to fp32)."""
  from safetensors.numpy import load_file
  if not os.path.exists(path):
    raise FileNotFoundError(f'No such checkpoint file: {path}')
  try:
    state = load_file(path)
  except Exception as e:  # SafetensorError and friends do not name the file.
    raise CheckpointError(f'{path} is not a readable safetensors file (truncated or '
                          f'damaged?): {e}') from None
  return {k: np.asarray(v, np.float32) if v.dtype.kind == 'f' or v.dtype.name == 'bfloat16' else v
          for k, v in state.items()}


def read_torch_pickle(path: str) -> dict[str, np.ndarray]:
  """Reads a PyTorch pickle through torch's weights-only loader (needs torch)."""
  import torch
  state = torch.load(path, map_location='cpu', weights_only=True)
  return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


def read_model_folder(folder: str, allow_pickle: bool = False) -> tuple[dict, dict]:
  """Returns (config, state dict) of a diffusers/transformers model folder."""
  config_path = os.path.join(folder, 'config.json')
  if not os.path.exists(config_path):
    raise FileNotFoundError(f'No config.json in model folder {folder}')
  with open(config_path) as f:
    config = json.load(f)
  names = sorted(os.listdir(folder))
  shards = [n for n in names if n.endswith('.safetensors')]
  if shards:
    state = {}
    for name in shards:
      state.update(read_safetensors(os.path.join(folder, name)))
    return config, state
  pickles = [n for n in names if n.endswith('.bin')]
  if pickles and not allow_pickle:
    raise CheckpointError(
        f'{folder} holds only pickle weights ({", ".join(pickles)}); pickles can run '
        'arbitrary code. Convert them to safetensors, or pass allow_pickle=True to read '
        "them with torch's weights-only loader.")
  if not pickles:
    raise FileNotFoundError(f'No .safetensors (or .bin) weights in {folder}')
  state = {}
  for name in pickles:
    state.update(read_torch_pickle(os.path.join(folder, name)))
  return config, state


def torch_key_to_flax_path(key: str) -> tuple[str, ...]:
  return tuple(_TO_FLAX.sub(r'\1_\2', key).split('.'))


def flax_path_to_torch_key(path: Iterable[str]) -> str:
  return '.'.join(_TO_TORCH.sub(r'\1.\2', p) for p in path)


def _to_flax_leaf(array: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == 'kernel':
    return array.T if array.ndim == 2 else np.transpose(array, (2, 3, 1, 0))
  return array


def _to_torch_leaf(array: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == 'kernel':
    return array.T if array.ndim == 2 else np.transpose(array, (3, 2, 0, 1))
  return array


def torch_to_flax(state: Mapping[str, np.ndarray], target: Any,
                  ignore: Iterable[str] = ()) -> dict:
  """Converts a torch state dict to a Flax param tree shaped like ``target``.

  Args:
    state: torch key -> array.
    target: the Flax param tree (arrays or ShapeDtypeStructs) the model expects.
    ignore: regexes of torch keys that are not parameters (buffers such as position_ids).

  Raises:
    CheckpointError naming every missing, unexpected and misshaped key; nothing is
    returned half-loaded.
  """
  expected = traverse_util.flatten_dict(target)
  ignore = [re.compile(p) for p in ignore]
  out, unexpected, misshaped = {}, [], []
  for key, array in state.items():
    if any(p.search(key) for p in ignore):
      continue
    *module, leaf = torch_key_to_flax_path(key)
    module = tuple(module)
    if leaf == 'weight':  # Linear/Conv -> kernel, norms -> scale, Embedding -> embedding.
      leaf = next((c for c in ('kernel', 'scale', 'embedding') if module + (c,) in expected),
                  'kernel')
    path = module + (leaf,)
    if path not in expected:
      unexpected.append(key)
      continue
    value = _to_flax_leaf(np.asarray(array), leaf)
    if tuple(value.shape) != tuple(expected[path].shape):
      misshaped.append(f'{key}: checkpoint {tuple(np.shape(array))} -> {tuple(value.shape)}, '
                       f'model expects {tuple(expected[path].shape)} at {"/".join(path)}')
      continue
    out[path] = value.astype(expected[path].dtype)
  missing = ['/'.join(p) + f' (torch key {flax_path_to_torch_key(p[:-1])}.*)'
             for p in expected if p not in out]
  problems = []
  for title, items in (('missing', missing), ('unexpected', unexpected),
                       ('misshaped', misshaped)):
    if items:
      problems.append(f'{len(items)} {title}:\n  ' + '\n  '.join(sorted(items)))
  if problems:
    raise CheckpointError('Checkpoint does not match the model.\n' + '\n'.join(problems))
  return traverse_util.unflatten_dict(out)


def flax_to_torch(params: Any) -> dict[str, np.ndarray]:
  """The inverse of ``torch_to_flax``: a Flax param tree as a torch-named state dict."""
  out = {}
  for path, value in traverse_util.flatten_dict(params).items():
    *module, leaf = path
    torch_leaf = 'weight' if leaf in ('kernel', 'scale', 'embedding') else leaf
    key = flax_path_to_torch_key(module) + '.' + torch_leaf
    out[key] = np.ascontiguousarray(_to_torch_leaf(np.asarray(value, np.float32), leaf))
  return out


def load_flax_model(folder: str, build, ignore: Iterable[str] = (),
                    allow_pickle: bool = False, prefix: str = ''):
  """Builds a Flax module from a model folder's config.json and loads its weights.

  Args:
    folder: a diffusers/transformers model folder (config.json + weights).
    build: config dict -> Flax module; the module's ``dummy_inputs()`` gives the
      arguments ``init`` needs to trace its parameter shapes.
    ignore: regexes of torch keys that are buffers, not parameters.
    allow_pickle: read ``.bin`` pickles (weights-only) when no safetensors exist.
    prefix: keep only torch keys under this prefix (stripped), e.g. 'text_model.'.

  Returns:
    (module, params, config).
  """
  import jax
  config, state = read_model_folder(folder, allow_pickle=allow_pickle)
  module = build(config)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *module.dummy_inputs()))
  if prefix:
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
  params = torch_to_flax(state, shapes['params'], ignore=ignore)
  return module, params, config
