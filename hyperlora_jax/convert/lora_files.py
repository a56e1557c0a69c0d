"""LoRA files and merged UNets for PyTorch tools: diffusers/peft, kohya, diffusers folders.

Our shared LoRA tree (see `hyperlora_jax.lora`) maps a Dense path to ``down`` [r, d_in],
``up`` [d_out, r] and a scalar ``scale``; its delta is ``scale * up @ down``. A pipeline's
tree holds UNet paths (bare), first-text-tower paths (``text_model/...``) and, for SDXL,
second-tower paths under ``pipeline.TEXT2_PREFIX`` (``text_encoder_2/text_model/...``).

Which file for which tool:

* **kohya** (`save_kohya_lora`) is the one for ComfyUI and A1111 (and kohya's
  sd-scripts); diffusers' ``load_lora_weights`` reads it too. Keys are
  ``lora_unet_<module, '.' -> '_'>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
  (scale alpha / r), text towers under ``lora_te_`` (SD 1.x/2.x) or ``lora_te1_`` /
  ``lora_te2_`` (SDXL). The UNet module names are what sd-scripts writes: diffusers'
  (``down_blocks_0_attentions_0_...``) for SD 1.x/2.x, whose UNet sd-scripts builds with
  diffusers' names, and the LDM/SGM ones (``input_blocks_4_1_transformer_blocks_0_
  attn1_to_q``, ``middle_block_1_...``, ``output_blocks_3_1_...``) for SDXL, whose UNet
  it builds in the original layout. ComfyUI maps both (``comfy/lora.py``
  model_lora_keys_unet: ``lora_unet_`` + every LDM weight name, and ``lora_unet_`` +
  every diffusers name through ``comfy/utils.py`` unet_to_diffusers) and scales by
  alpha / r, so every module of these files loads there at the right strength
  (tests/test_lora_files.py holds every key against those rules).
* **diffusers/peft** (`save_diffusers_lora`): ``unet.<torch module>.lora_A.weight`` =
  down and ``.lora_B.weight`` = up, text towers under ``text_encoder.`` /
  ``text_encoder_2.``; for ``StableDiffusion[XL]Pipeline.load_lora_weights`` and peft.
  No alpha is written (diffusers and peft then use scale 1), so the scale is folded into
  ``up``. **Not for ComfyUI**: it maps none of these files' UNet attention projections
  (to_q/k/v/out.0, the usual LoRA targets), for which it knows only kohya names, LDM
  names and the old ``unet.<...>.attn1.processor.to_q`` form, so an attention LoRA's
  UNet part is silently dropped there; it does map the other UNet layers (ff, proj_in/out,
  time_emb_proj as ``unet.<module>``) and the text towers (test_lora_files.py holds this).

Only numpy and safetensors are used: exporting needs no torch.
"""
import collections
import json
import os
import re
from typing import Any, Mapping, Optional

import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from hyperlora_jax import files
from hyperlora_jax import lora as lora_lib
from hyperlora_jax.convert import core
from hyperlora_jax.convert import pipeline
from hyperlora_jax.models import unet

# The Dense layers of models/unet.py and the CLIP text tower (Flax paths). proj_in/proj_out
# are Dense only with use_linear_projection (SD 2.x, SDXL); add_embedding is SDXL's.
_UNET_DENSE = re.compile(
    r'((down|up)_blocks_\d+|mid_block)/('
    r'attentions_\d+/(transformer_blocks_\d+/(attn[12]/(to_[qkv]|to_out_0)|ff/(net_0/proj|net_2))'
    r'|proj_in|proj_out)|resnets_\d+/time_emb_proj)|(time|add)_embedding/linear_[12]')
_TEXT_DENSE = re.compile(r'text_model/encoder/layers_\d+/(self_attn/([qkv]|out)_proj|mlp/fc[12])')
# Names with an underscore inside one torch module name; kohya's '_' separator hides them.
_MULTI_WORD = ('down_blocks', 'up_blocks', 'mid_block', 'transformer_blocks', 'to_q', 'to_k',
               'to_v', 'to_out', 'proj_in', 'proj_out', 'time_emb_proj', 'time_embedding',
               'add_embedding', 'linear_1', 'linear_2', 'text_model', 'self_attn', 'q_proj',
               'k_proj', 'v_proj', 'out_proj')
# kohya's prefix of each pipeline component, SD 1.x/2.x and SDXL.
_KOHYA_PREFIX = {'unet': 'lora_unet_', 'text_encoder': 'lora_te_'}
_KOHYA_PREFIX_XL = {'unet': 'lora_unet_', 'text_encoder': 'lora_te1_',
                    'text_encoder_2': 'lora_te2_'}
_KOHYA_COMPONENT = {'lora_unet_': 'unet', 'lora_te_': 'text_encoder', 'lora_te1_': 'text_encoder',
                    'lora_te2_': 'text_encoder_2'}
_PEFT_KEY = re.compile(r'(.+)\.lora_([AB])\.weight')
_KOHYA_KEY = re.compile(
    r'(lora_unet_|lora_te[12]?_)[^.]+\.(lora_down\.weight|lora_up\.weight|alpha)')
# diffusers' save_lora_weights stores the peft LoraConfig (lora_alpha, alpha_pattern) here.
_DIFFUSERS_METADATA = 'lora_adapter_metadata'
# A pipeline LoRA's components: the UNet, the text tower, SDXL's second tower.
_COMPONENTS = ('unet', 'text_encoder', 'text_encoder_2')
# LoRA kinds other than plain down/up factors, by a key part each writes (kohya/LyCORIS
# LoHa and LoKr, kohya's and peft's DoRA magnitudes): refused by name, not misread.
_NOT_PLAIN = {'hada_w1_a': 'LoHa', 'hada_w2_a': 'LoHa', 'lokr_w1': 'LoKr', 'lokr_w2': 'LoKr',
              'dora_scale': 'DoRA', 'lora_magnitude_vector': 'DoRA'}


def _is_pickle(head: bytes) -> bool:
  """torch.save's files: a zip archive (torch >= 1.6) or a raw pickle (PROTO opcode 2-5).
  A safetensors file's 9th byte opens its JSON header ('{'); its first 8 are a length."""
  return head.startswith(b'PK\x03\x04') or (
      head[:1] == b'\x80' and head[1:2] in (b'\x02', b'\x03', b'\x04', b'\x05')
      and head[8:9] != b'{')


def _component(path: str, origin: str = 'LoRA path') -> str:
  """'unet', 'text_encoder' or 'text_encoder_2' (diffusers' pipeline component) of a path."""
  if _UNET_DENSE.fullmatch(path):
    return 'unet'
  if _TEXT_DENSE.fullmatch(path):
    return 'text_encoder'
  if path.startswith(pipeline.TEXT2_PREFIX) and _TEXT_DENSE.fullmatch(
      path[len(pipeline.TEXT2_PREFIX):]):
    return 'text_encoder_2'
  raise ValueError(
      f'{origin} {path!r} is not a Dense layer of the UNet (attention q/k/v/out, ff, '
      'linear proj_in/proj_out, time_emb_proj, time/add_embedding) or of a CLIP text tower '
      f'([{pipeline.TEXT2_PREFIX}]text_model/encoder/layers_N/self_attn|mlp/...).')


def _local_path(path: str) -> str:
  """The path inside its component's own params."""
  return path.removeprefix(pipeline.TEXT2_PREFIX)


def _is_sdxl(unet_config: Optional[Mapping[str, Any]]) -> bool:
  return bool(unet_config) and unet_config.get('addition_embed_type') == 'text_time'


def _ldm_prefixes(unet_config: Mapping[str, Any]) -> dict[str, str]:
  """diffusers UNet module prefix -> its name in the original (LDM/SGM) UNet.

  The layout of ComfyUI's ``unet_to_diffusers`` and of kohya's SDXL UNet: input block 0
  is conv_in, then each down block's layers, then its downsampler, one input block each
  (down_blocks.{x}.attentions.{i} -> input_blocks.{3x+1+i}.1 with SDXL's two layers per
  block); resnet, attention, resnet of the mid block are middle_block.0/1/2; up block x
  has one output block per layer (up_blocks.{x}.attentions.{i} -> output_blocks.{3x+i}.1).
  The timestep and SDXL's added embeddings are time_embed.0/2 and label_emb.0.0/0.2.
  """
  model = unet.from_config(dict(unet_config))
  lpb, n = model.layers_per_block, len(model.block_out_channels)
  out = {'time_embedding.linear_1': 'time_embed.0', 'time_embedding.linear_2': 'time_embed.2',
         'add_embedding.linear_1': 'label_emb.0.0', 'add_embedding.linear_2': 'label_emb.0.2',
         'mid_block.resnets.0': 'middle_block.0', 'mid_block.attentions.0': 'middle_block.1',
         'mid_block.resnets.1': 'middle_block.2'}
  k = 1
  for x in range(n):
    for i in range(lpb[x]):
      out[f'down_blocks.{x}.resnets.{i}'] = f'input_blocks.{k}.0'
      out[f'down_blocks.{x}.attentions.{i}'] = f'input_blocks.{k}.1'
      k += 1
    k += 1  # the downsampler's block
  k = 0
  for x in range(n):
    for i in range(lpb[n - 1 - x] + 1):
      out[f'up_blocks.{x}.resnets.{i}'] = f'output_blocks.{k}.0'
      out[f'up_blocks.{x}.attentions.{i}'] = f'output_blocks.{k}.1'
      k += 1
  return out


# Inside a resnet the LDM name of time_emb_proj is emb_layers.1 (emb_layers.0 is a SiLU).
_LDM_INNER = {'time_emb_proj': 'emb_layers.1'}


def _ldm_name(module: str, prefixes: Mapping[str, str]) -> str:
  """The LDM name of a diffusers UNet module such as down_blocks.1.attentions.0.proj_in."""
  for prefix, ldm in prefixes.items():
    if module == prefix or module.startswith(prefix + '.'):
      rest = module[len(prefix):]
      for ours, theirs in _LDM_INNER.items():
        rest = re.sub(rf'\.{ours}$', '.' + theirs, rest)
      return ldm + rest
  raise ValueError(f'UNet module {module} has no LDM name.')


def _from_ldm(name: str, prefixes: Mapping[str, str]) -> Optional[str]:
  """The diffusers module of an underscored LDM name (input_blocks_4_1_..., no
  lora_unet_), with '_' separators still in its tail; None for other names."""
  for prefix, ldm in sorted(prefixes.items(), key=lambda kv: -len(kv[1])):
    flat = ldm.replace('.', '_')
    if name == flat or name.startswith(flat + '_'):
      rest = name[len(flat):]
      for ours, theirs in _LDM_INNER.items():
        rest = re.sub(rf'_{theirs.replace(".", "_")}$', '_' + ours, rest)
      return prefix.replace('.', '_') + rest
  return None


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
  """The module's name inside its diffusers component (text towers keep 'text_model.')."""
  return core.flax_path_to_torch_key(_local_path(path).split('/'))


def _header(factors: Mapping[str, Any], metadata: Optional[Mapping[str, str]]) -> dict:
  ranks = sorted({down.shape[0] for down, _, _ in factors.values()})
  header = {'format': 'pt', 'hyperlora_jax.ranks': json.dumps(ranks),
            'hyperlora_jax.targets': json.dumps(sorted(factors))}
  header.update({str(k): str(v) for k, v in (metadata or {}).items()})
  return header


def _write(state: Mapping[str, np.ndarray], path: str, header: Mapping[str, str]) -> None:
  """safetensors to a temporary name, then renamed: no half-written file at ``path``."""
  with files.atomic_file(path) as tmp:
    save_file(dict(state), tmp, metadata=dict(header))


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

  ``StableDiffusion[XL]Pipeline.load_lora_weights(path)`` loads it (text-tower layers
  into text_encoder / text_encoder_2); ``unet.load_lora_adapter(path, prefix=prefix)``
  loads the UNet part. Not for ComfyUI (see the module docstring): use the kohya file.

  Args:
    lora: shared LoRA tree (UNet and optionally text-tower paths).
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
      key = f'{component}.{_torch_module(p)}'
    else:
      raise ValueError(f'Text-tower path {p} needs prefixed keys; pass prefix="unet".')
    state[key + '.lora_A.weight'] = down
    state[key + '.lora_B.weight'] = (up * scale).astype(np.float32)
  _write(state, path, _header(factors, metadata))


def _kohya_names(paths, unet_config: Optional[Mapping[str, Any]] = None) -> dict[str, str]:
  """path -> the kohya module name `save_kohya_lora` writes for it.

  SD 1.x/2.x (no ``unet_config``, or one without SDXL's text_time conditioning):
  ``lora_unet_`` + diffusers names, ``lora_te_`` for the text tower. SDXL: ``lora_unet_`` +
  LDM names (`_ldm_prefixes`), ``lora_te1_`` / ``lora_te2_``: what kohya's sd-scripts
  writes for each, and what ComfyUI and diffusers map.
  """
  components = {p: _component(p) for p in paths}
  xl = _is_sdxl(unet_config)
  if not xl and 'text_encoder_2' in components.values():
    raise ValueError('A LoRA with second-text-tower layers is an SDXL one: pass the SDXL '
                     "UNet's config (unet_config=) for its kohya names.")
  prefixes = _ldm_prefixes(unet_config) if xl else None
  names = {}
  for p, component in components.items():
    module = _torch_module(p)
    if component == 'unet' and xl:
      module = _ldm_name(module, prefixes)
    names[p] = (_KOHYA_PREFIX_XL if xl else _KOHYA_PREFIX)[component] + module.replace('.', '_')
  return names


def save_kohya_lora(lora: lora_lib.LoRATree, path: str,
                    metadata: Optional[Mapping[str, str]] = None,
                    unet_config: Optional[Mapping[str, Any]] = None) -> None:
  """Writes a shared LoRA as a kohya safetensors file: the one for ComfyUI and A1111
  (diffusers' load_lora_weights reads it too).

  Module names by `_kohya_names`: pass the UNet's ``unet_config`` so an SDXL LoRA gets
  SDXL's (LDM) names; SD 1.x/2.x names need none. One alpha is written for every layer,
  the most common r * scale, and each layer's remaining factor scale * r / alpha is
  folded into its ``up``: diffusers 0.42 reads per-layer alphas of these files into an
  alpha_pattern keyed by non-module names and so would apply the most common alpha
  everywhere.
  """
  factors = _shared_factors(lora)
  names = _kohya_names(factors, unet_config)
  products = [down.shape[0] * scale for down, _, scale in factors.values()]
  nonzero = [v for v in products if v != 0]
  alpha = float(np.float32(collections.Counter(nonzero).most_common(1)[0][0] if nonzero else 1.0))
  state = {}
  for p, (down, up, scale) in factors.items():
    state[names[p] + '.lora_down.weight'] = down
    state[names[p] + '.lora_up.weight'] = (up * (scale * down.shape[0] / alpha)).astype(np.float32)
    state[names[p] + '.alpha'] = np.array(alpha, np.float32)
  _write(state, path, _header(factors, metadata))


def _kohya_to_path(name: str, prefixes: Optional[Mapping[str, str]]) -> str:
  """Our path of a kohya layer name: lora_unet_down_blocks_0_..._to_out_0, an LDM name
  (lora_unet_input_blocks_4_1_..., mapped by ``prefixes``) or a text-tower one."""
  kohya_prefix = next(p for p in _KOHYA_COMPONENT if name.startswith(p))
  component = _KOHYA_COMPONENT[kohya_prefix]
  module = name.removeprefix(kohya_prefix)
  if component == 'unet' and re.match(r'(input_blocks|middle_block|output_blocks|time_embed|'
                                      r'label_emb)_', module):
    diffusers = _from_ldm(module, prefixes) if prefixes else None
    if diffusers is None:
      raise ValueError(
          f'kohya layer {name} has an LDM (SDXL) name; ' + (
              'it is no module of this UNet.' if prefixes else
              "reading one needs the UNet's config: pass the pipeline "
              '(load_lora_file(path, pipe)).'))
    module = diffusers
  dotted = module.replace('_', '.')
  for word in _MULTI_WORD:
    dotted = re.sub(r'(?<![^.])' + re.escape(word.replace('_', '.')) + r'(?![^.])', word, dotted)
  path = '/'.join(core.torch_key_to_flax_path(dotted))
  if component == 'text_encoder_2':
    path = pipeline.TEXT2_PREFIX + path
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


def _read_kohya(state: Mapping[str, np.ndarray], prefixes: Optional[Mapping[str, str]]) -> dict:
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
    tree[_kohya_to_path(name, prefixes)] = {'down': down, 'up': up,
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
    if component not in _COMPONENTS:  # bare peft names: a UNet adapter
      component, module = 'unet', name
    # diffusers prefixes the metadata with the component, peft's own saves do not.
    config = {k[len(component) + 1:]: v for k, v in adapter.items()
              if k.startswith(component + '.')} or adapter
    if component != 'unet' and not module.startswith('text_model.'):
      module = 'text_model.' + module  # transformers >= 5 drops the tower prefix
    path = '/'.join(core.torch_key_to_flax_path(module))
    if component == 'text_encoder_2':
      path = pipeline.TEXT2_PREFIX + path
    if _component(path, f'peft layer {name} maps to') != component:
      raise ValueError(f'peft layer {name} maps to {path}, which is not a {component} layer.')
    down = _as_dense(factors['A'], name + '.lora_A.weight')
    up = _as_dense(factors['B'], name + '.lora_B.weight')
    tree[path] = {'down': down, 'up': up,
                  'scale': np.float32(_peft_scale(config, module, down.shape[0]))}
  return tree


def check_lora(lora: lora_lib.LoRATree, params: Mapping[str, Any], shown: int = 8) -> None:
  """Checks that every layer of a LoRA tree is a Dense layer of the model, of its shape.

  Args:
    lora: a LoRA tree (shared or per sample).
    params: component -> its param tree ('unet', 'text_encoder', 'text_encoder_2';
      `pipeline.param_trees(pipe, *_COMPONENTS)`); a bare UNet param tree also works.
    shown: how many of the misfits the error names.

  Raises:
    ValueError naming the first layers that do not fit (a LoRA for another base model,
    e.g. an SD 1.5 file on SDXL) and how many there are.
  """
  if 'unet' not in params:
    params = {'unet': params}
  flat = {c: traverse_util.flatten_dict(p, sep='/') for c, p in params.items()}
  misfits = []
  for path, f in lora.items():
    try:
      component = _component(path)
    except ValueError as e:
      misfits.append(str(e))
      continue
    if component not in flat:
      misfits.append(f'{path}: the model has no {component}')
      continue
    kernel = flat[component].get(_local_path(path) + '/kernel')
    d_in, d_out = np.shape(f['down'])[-1], np.shape(f['up'])[-2]
    if kernel is None:
      misfits.append(f'{path}: no such Dense layer in the {component}')
    elif (d_in, d_out) != tuple(np.shape(kernel)):
      misfits.append(f'{path}: LoRA {d_in} -> {d_out}, the layer {kernel.shape[0]} -> '
                     f'{kernel.shape[1]}')
  if misfits:
    raise ValueError(f'{len(misfits)} of the {len(lora)} LoRA layers do not fit this model '
                     '(a LoRA made for another base model?); the first:\n  '
                     + '\n  '.join(misfits[:shown]))


def _refuse_pickle(path: str) -> None:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No such LoRA file: {path}')
  with open(path, 'rb') as f:
    head = f.read(9)
  if _is_pickle(head):
    raise ValueError(f'{path} is a PyTorch pickle (.pt/.bin/.ckpt), refused: pickles can '
                     'run arbitrary code when read. Convert it to safetensors first.')


def load_lora_file(path: str, pipe: Optional[pipeline.Pipeline] = None) -> dict:
  """Reads a diffusers/peft or kohya LoRA file (either format, detected) as a shared tree.

  Refuses pickles and LoRA kinds that are not plain (LoHa, LoKr, DoRA), naming their
  keys; a truncated or non-safetensors file is a `core.CheckpointError` naming it.
  Honors kohya alphas and the peft config (lora_alpha, alpha_pattern, use_rslora) that
  diffusers stores in the header or peft in adapter_config.json beside the file; without
  them the scale is 1, as in diffusers. 1x1-conv factors (kohya's SD 1.x proj_in/proj_out)
  become Dense factors. With ``pipe`` (the base model it is for), kohya's LDM names
  (SDXL files) are mapped by its UNet's config, and every layer is checked against its
  params (`check_lora`), so a file for another base model fails naming what does not fit.
  """
  _refuse_pickle(path)
  state = core.read_safetensors(path)
  kinds = collections.defaultdict(list)
  for part, kind in _NOT_PLAIN.items():
    kinds[kind] += [k for k in state if part in k]
  kinds = {kind: keys for kind, keys in kinds.items() if keys}
  if kinds:
    raise ValueError(f'{path} is a {"/".join(sorted(kinds))} file, not a plain LoRA (down/up '
                     'factors): '
                     + '; '.join(f'{kind} keys e.g. {keys[:2]}' for kind, keys in kinds.items())
                     + '. Only plain LoRAs are read here.')
  with safe_open(path, 'np') as f:
    header = f.metadata() or {}
  if state and all(_KOHYA_KEY.fullmatch(k) for k in state):
    tree = _read_kohya(state, _ldm_prefixes(pipe.unet_config) if pipe else None)
  elif state and all(_PEFT_KEY.fullmatch(k) for k in state):
    tree = _read_peft(state, header, os.path.dirname(path))
  else:
    odd = sorted(k for k in state if not (_KOHYA_KEY.fullmatch(k) or _PEFT_KEY.fullmatch(k)))
    raise ValueError(
        f'{path} is not a diffusers/peft (*.lora_A.weight, *.lora_B.weight) or kohya '
        f'(lora_unet_*|lora_te[12]_*.lora_down.weight|lora_up.weight|alpha) LoRA file; '
        f'{len(odd)} of its {len(state)} keys fit neither, e.g. {odd[:5]}.')
  if pipe is not None:
    check_lora(tree, pipeline.param_trees(pipe, *_COMPONENTS))
  return tree


def save_merged_unet(unet_params: Any, unet_config: Mapping[str, Any], lora: lora_lib.LoRATree,
                     folder: str) -> None:
  """Writes the UNet with a shared LoRA merged in as a diffusers ``unet/`` folder (SD 1.x,
  2.x or SDXL).

  ``UNet2DConditionModel.from_pretrained(folder)`` loads it; config.json is
  ``unet_config`` unchanged.
  """
  text = [p for p in _shared_factors(lora) if _component(p) != 'unet']
  if text:
    raise ValueError(f'Text-tower LoRA layers cannot be merged into a UNet: {text}')
  check_lora(lora, unet_params)
  pipeline.save_model(lora_lib.merge(unet_params, lora), unet_config, folder,
                      pipeline.UNET_WEIGHTS)
