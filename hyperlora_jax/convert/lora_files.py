"""LoRA files and merged UNets for PyTorch tools: diffusers/peft, kohya/A1111, diffusers folders.

Our shared LoRA tree (see `hyperlora_jax.lora`) maps a Dense path to ``down`` [r, d_in],
``up`` [d_out, r] and a scalar ``scale``; its delta is ``scale * up @ down``. The files:

* diffusers/peft: ``unet.<torch module>.lora_A.weight`` = down and ``.lora_B.weight`` = up,
  text-tower layers under ``text_encoder.``. The files carry no alpha: diffusers, peft and
  ComfyUI then all use alpha = r (scale 1), so the scale is folded into ``up``.
* kohya/A1111: ``lora_unet_<torch module, '.' -> '_'>.lora_down.weight`` / ``.lora_up.weight``
  / ``.alpha`` with scale alpha / r, and ``lora_te_text_model_...`` for the text tower. The
  module names are diffusers' (``down_blocks_0_attentions_0_...``), which is what kohya's
  sd-scripts writes for SD 1.x/2.x and what diffusers' ``_convert_unet_lora_key``, ComfyUI
  and A1111 map; the LDM names (``input_blocks_1_1_...``) are SDXL's and not written.

Only numpy and safetensors are used: exporting needs no torch.
"""
import collections
import json
import os
import re
from typing import Any, Mapping, Optional

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from hyperlora_jax import lora as lora_lib
from hyperlora_jax.convert import core
from hyperlora_jax.convert import pipeline

# The Dense layers of models/unet.py and the CLIP text tower (Flax paths). proj_in/proj_out
# are Dense only with use_linear_projection (SD 2.x).
_UNET_DENSE = re.compile(
    r'((down|up)_blocks_\d+|mid_block)/('
    r'attentions_\d+/(transformer_blocks_\d+/(attn[12]/(to_[qkv]|to_out_0)|ff/(net_0/proj|net_2))'
    r'|proj_in|proj_out)|resnets_\d+/time_emb_proj)|time_embedding/linear_[12]')
_TEXT_DENSE = re.compile(r'text_model/encoder/layers_\d+/(self_attn/([qkv]|out)_proj|mlp/fc[12])')
# Names with an underscore inside one torch module name; kohya's '_' separator hides them.
_MULTI_WORD = ('down_blocks', 'up_blocks', 'mid_block', 'transformer_blocks', 'to_q', 'to_k',
               'to_v', 'to_out', 'proj_in', 'proj_out', 'time_emb_proj', 'time_embedding',
               'linear_1', 'linear_2', 'text_model', 'self_attn', 'q_proj', 'k_proj', 'v_proj',
               'out_proj')
_KOHYA_PREFIX = {'unet': 'lora_unet_', 'text_encoder': 'lora_te_'}
_PEFT_KEY = re.compile(r'(.+)\.lora_([AB])\.weight')
_KOHYA_KEY = re.compile(r'(lora_unet_|lora_te_)[^.]+\.(lora_down\.weight|lora_up\.weight|alpha)')
# diffusers' save_lora_weights stores the peft LoraConfig (lora_alpha, alpha_pattern) here.
_DIFFUSERS_METADATA = 'lora_adapter_metadata'


def _component(path: str, origin: str = 'LoRA path') -> str:
  """'unet' or 'text_encoder' (diffusers' pipeline component) of a LoRA path."""
  if _UNET_DENSE.fullmatch(path):
    return 'unet'
  if _TEXT_DENSE.fullmatch(path):
    return 'text_encoder'
  raise ValueError(
      f'{origin} {path!r} is not a Dense layer of the UNet (attention q/k/v/out, ff, '
      'linear proj_in/proj_out, time_emb_proj, time_embedding) or of the CLIP text tower '
      '(text_model/encoder/layers_N/self_attn|mlp/...).')


def _shared_factors(lora: lora_lib.LoRATree) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
  """Validates a shared LoRA tree: path -> (down [r, d_in], up [d_out, r], scale)."""
  if not lora:
    raise ValueError('The LoRA tree is empty.')
  out = {}
  for path, f in lora.items():
    _component(path)
    down = np.asarray(f['down'], np.float32)
    up = np.asarray(f['up'], np.float32)
    scale = np.asarray(f.get('scale', 1.0), np.float64)
    if down.ndim == 3 or scale.ndim == 1:
      raise ValueError(f'Per-sample LoRA at {path} (down {down.shape}, scale {scale.shape}): '
                       'files hold one LoRA; export each sample with select_sample(lora, i).')
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0] or scale.ndim:
      raise ValueError(f'LoRA at {path} must have down [r, d_in], up [d_out, r] and a scalar '
                       f'scale; got down {down.shape}, up {up.shape}, scale {scale.shape}.')
    out[path] = (down, up, float(scale))
  return out


def _torch_module(path: str) -> str:
  """The module's name inside its diffusers component (the text tower keeps 'text_model.')."""
  return core.flax_path_to_torch_key(path.split('/'))


def _header(factors: Mapping[str, Any], metadata: Optional[Mapping[str, str]]) -> dict:
  ranks = sorted({down.shape[0] for down, _, _ in factors.values()})
  header = {'format': 'pt', 'hyperlora_jax.ranks': json.dumps(ranks),
            'hyperlora_jax.targets': json.dumps(sorted(factors))}
  header.update({str(k): str(v) for k, v in (metadata or {}).items()})
  return header


def select_sample(lora: lora_lib.LoRATree, i: int) -> dict:
  """Sample ``i`` of a per-sample LoRA tree as a shared tree (scale [B] -> scalar)."""
  out = {}
  for path, f in lora.items():
    down = np.asarray(f['down'])
    if down.ndim != 3:
      raise ValueError(f'LoRA at {path} is not per-sample (down {down.shape}, expected '
                       '[batch, r, d_in]).')
    if not -down.shape[0] <= i < down.shape[0]:  # jax arrays would clamp silently
      raise IndexError(f'Sample {i} out of range for a LoRA of batch {down.shape[0]}.')
    scale = np.asarray(f.get('scale', 1.0))
    out[path] = {'down': down[i], 'up': np.asarray(f['up'])[i],
                 'scale': scale[i] if scale.ndim else scale}
  return out


def save_diffusers_lora(lora: lora_lib.LoRATree, path: str, prefix: Optional[str] = 'unet',
                        metadata: Optional[Mapping[str, str]] = None) -> None:
  """Writes a shared LoRA as a diffusers/peft safetensors file.

  ``StableDiffusionPipeline.load_lora_weights(path)`` loads it (text-tower layers into the
  text encoder); ``unet.load_lora_adapter(path, prefix=prefix)`` loads the UNet part.

  Args:
    lora: shared LoRA tree (UNet and optionally CLIP text-tower paths).
    path: the .safetensors file to write.
    prefix: key prefix of the UNet layers; None writes bare peft names (UNet-only trees).
    metadata: extra string entries for the safetensors header (e.g. the source checkpoint).
  """
  factors = _shared_factors(lora)
  state = {}
  for p, (down, up, scale) in factors.items():
    component = _component(p)
    if component == 'unet':
      key = f'{prefix}.{_torch_module(p)}' if prefix else _torch_module(p)
    elif prefix:
      key = f'text_encoder.{_torch_module(p)}'
    else:
      raise ValueError(f'Text-tower path {p} needs prefixed keys; pass prefix="unet".')
    state[key + '.lora_A.weight'] = down
    state[key + '.lora_B.weight'] = (up * scale).astype(np.float32)
  save_file(state, path, metadata=_header(factors, metadata))


def save_kohya_lora(lora: lora_lib.LoRATree, path: str,
                    metadata: Optional[Mapping[str, str]] = None) -> None:
  """Writes a shared LoRA as a kohya/A1111 safetensors file (ComfyUI, A1111, diffusers).

  One alpha is written for every layer, the most common r * scale, and each layer's
  remaining factor scale * r / alpha is folded into its ``up``: diffusers 0.42 reads
  per-layer alphas of these files into an alpha_pattern keyed by non-module names and so
  would apply the most common alpha everywhere.
  """
  factors = _shared_factors(lora)
  products = [down.shape[0] * scale for down, _, scale in factors.values()]
  nonzero = [v for v in products if v != 0]
  alpha = float(np.float32(collections.Counter(nonzero).most_common(1)[0][0] if nonzero else 1.0))
  state = {}
  for p, (down, up, scale) in factors.items():
    name = _KOHYA_PREFIX[_component(p)] + _torch_module(p).replace('.', '_')
    state[name + '.lora_down.weight'] = down
    state[name + '.lora_up.weight'] = (up * (scale * down.shape[0] / alpha)).astype(np.float32)
    state[name + '.alpha'] = np.array(alpha, np.float32)
  save_file(state, path, metadata=_header(factors, metadata))


def _kohya_to_path(name: str) -> str:
  """Flax path of a kohya layer name such as lora_unet_down_blocks_0_..._to_out_0."""
  component = 'unet' if name.startswith('lora_unet_') else 'text_encoder'
  dotted = name.removeprefix(_KOHYA_PREFIX[component]).replace('_', '.')
  for word in _MULTI_WORD:
    dotted = re.sub(r'(?<![^.])' + re.escape(word.replace('_', '.')) + r'(?![^.])', word, dotted)
  path = '/'.join(core.torch_key_to_flax_path(dotted))
  if _component(path, f'kohya layer {name} maps to') != component:
    raise ValueError(f'kohya layer {name} maps to {path}, which is not a {component} layer.')
  return path


def _as_dense(array: np.ndarray, key: str) -> np.ndarray:
  """LoRA factors of a 1x1 conv (kohya's SD 1.x proj_in/proj_out) are Dense factors."""
  if array.ndim == 4 and array.shape[2:] == (1, 1):
    return array[:, :, 0, 0]
  if array.ndim != 2:
    raise ValueError(f'{key} has shape {array.shape}: only Dense (and 1x1 conv) LoRA factors '
                     'are supported.')
  return array


def _read_kohya(state: Mapping[str, np.ndarray]) -> dict:
  layers = collections.defaultdict(dict)
  for key, value in state.items():
    name, _, leaf = key.partition('.')
    layers[name][leaf] = value
  tree = {}
  for name, leaves in layers.items():
    if 'lora_down.weight' not in leaves or 'lora_up.weight' not in leaves:
      raise ValueError(f'kohya layer {name} lacks lora_down or lora_up (has {sorted(leaves)}).')
    down = _as_dense(leaves['lora_down.weight'], name + '.lora_down.weight')
    up = _as_dense(leaves['lora_up.weight'], name + '.lora_up.weight')
    # kohya: a missing alpha means alpha = r, i.e. scale 1.
    alpha = float(leaves['alpha']) if 'alpha' in leaves else down.shape[0]
    tree[_kohya_to_path(name)] = {'down': down, 'up': up,
                                  'scale': np.float32(alpha / down.shape[0])}
  return tree


def _peft_scale(config: Mapping[str, Any], module: str, rank: int) -> float:
  """peft's scaling for one module: alpha (from alpha_pattern or lora_alpha) / r."""
  alpha = config.get('lora_alpha', rank)
  for pattern, value in (config.get('alpha_pattern') or {}).items():
    if re.match(rf'(.*\.)?({pattern})$', module):  # peft's get_pattern_key rule
      alpha = value
      break
  return alpha / (np.sqrt(rank) if config.get('use_rslora') else rank)


def _read_peft(state: Mapping[str, np.ndarray], header: Mapping[str, str], folder: str) -> dict:
  adapter = json.loads(header.get(_DIFFUSERS_METADATA) or '{}')
  config_path = os.path.join(folder, 'adapter_config.json')
  if not adapter and os.path.exists(config_path):  # a peft save_pretrained folder
    with open(config_path) as f:
      adapter = json.load(f)
  layers = collections.defaultdict(dict)
  for key, value in state.items():
    name, which = _PEFT_KEY.fullmatch(key).groups()
    layers[name.removeprefix('base_model.model.')][which] = value
  tree = {}
  for name, factors in layers.items():
    if set(factors) != {'A', 'B'}:
      raise ValueError(f'peft layer {name} lacks lora_A or lora_B.')
    component, _, module = name.partition('.')
    if component not in ('unet', 'text_encoder'):  # bare peft names: a UNet adapter
      component, module = 'unet', name
    # diffusers prefixes the metadata with the component, peft's own saves do not.
    config = {k[len(component) + 1:]: v for k, v in adapter.items()
              if k.startswith(component + '.')} or adapter
    if component == 'text_encoder' and not module.startswith('text_model.'):
      module = 'text_model.' + module  # transformers >= 5 drops the tower prefix
    path = '/'.join(core.torch_key_to_flax_path(module))
    if _component(path, f'peft layer {name} maps to') != component:
      raise ValueError(f'peft layer {name} maps to {path}, which is not a {component} layer.')
    down = _as_dense(factors['A'], name + '.lora_A.weight')
    up = _as_dense(factors['B'], name + '.lora_B.weight')
    tree[path] = {'down': down, 'up': up,
                  'scale': np.float32(_peft_scale(config, module, down.shape[0]))}
  return tree


def load_lora_file(path: str) -> dict:
  """Reads a diffusers/peft or kohya LoRA file (either format, detected) as a shared tree.

  Honors kohya alphas and the peft config (lora_alpha, alpha_pattern, use_rslora) that
  diffusers stores in the header or peft in adapter_config.json beside the file; without
  them the scale is 1, as in diffusers. 1x1-conv
  factors (kohya's SD 1.x proj_in/proj_out) become Dense factors.
  """
  state = core.read_safetensors(path)
  with safe_open(path, 'np') as f:
    header = f.metadata() or {}
  if state and all(_KOHYA_KEY.fullmatch(k) for k in state):
    return _read_kohya(state)
  if state and all(_PEFT_KEY.fullmatch(k) for k in state):
    return _read_peft(state, header, os.path.dirname(path))
  odd = sorted(k for k in state if not (_KOHYA_KEY.fullmatch(k) or _PEFT_KEY.fullmatch(k)))
  raise ValueError(
      f'{path} is not a diffusers/peft (*.lora_A.weight, *.lora_B.weight) or kohya '
      f'(lora_unet_*|lora_te_*.lora_down.weight|lora_up.weight|alpha) LoRA file; '
      f'{len(odd)} of its {len(state)} keys fit neither, e.g. {odd[:5]}.')


def save_merged_unet(unet_params: Any, unet_config: Mapping[str, Any], lora: lora_lib.LoRATree,
                     folder: str) -> None:
  """Writes the UNet with a shared LoRA merged in as a diffusers ``unet/`` folder.

  ``UNet2DConditionModel.from_pretrained(folder)`` loads it; config.json is
  ``unet_config`` unchanged.
  """
  text = [p for p in _shared_factors(lora) if _component(p) != 'unet']
  if text:
    raise ValueError(f'Text-tower LoRA layers cannot be merged into a UNet: {text}')
  pipeline.save_model(lora_lib.merge(unet_params, lora), unet_config, folder,
                      pipeline.UNET_WEIGHTS)
