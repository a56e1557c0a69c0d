"""A diffusers Stable Diffusion (1.x / 2.x / XL) folder <-> our modules and param pytrees.

The folder layout is diffusers' own: ``unet/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``, optionally ``vae/`` (without one, the model diffuses pixels, which is
what the tiny quickstart models do) and, for SDXL, ``text_encoder_2/`` and
``tokenizer_2/``. The kind comes from the folder's own configs: a UNet with
``addition_embed_type='text_time'`` is SDXL and needs the second tower. The quickstart
writes its own base model in this layout, so tiny and real models take the same path.

`encode_prompts` and `time_ids` give the UNet's conditioning the way each kind's
diffusers pipeline computes it, so callers never branch on the kind.
"""
import json
import os
import shutil
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from hyperlora_jax import diffusion
from hyperlora_jax import files
from hyperlora_jax.convert import core
from hyperlora_jax.convert import clip_folders
from hyperlora_jax.models import clip, unet, vae

UNET_WEIGHTS = 'diffusion_pytorch_model.safetensors'
TEXT_WEIGHTS = 'model.safetensors'
# LoRA-tree paths of SDXL's second text tower carry this prefix (the first tower's are
# its own 'text_model/...' paths, the UNet's are bare), so one tree holds a whole
# pipeline's LoRA as diffusers' files do.
TEXT2_PREFIX = 'text_encoder_2/'
_SD_PARTS = ('unet', 'text_encoder', 'tokenizer', 'scheduler')
_SDXL_PARTS = ('text_encoder_2', 'tokenizer_2')


class Pipeline(NamedTuple):
  unet: Any
  unet_params: Any
  unet_config: dict
  text: Any
  text_params: Any
  text_config: dict
  tokenizer: Any
  schedule: diffusion.Schedule
  scheduler_config: dict
  vae: Optional[Any] = None
  vae_params: Optional[Any] = None
  # SDXL: the second text tower (CLIPTextModelWithProjection) and its tokenizer.
  text2: Optional[Any] = None
  text2_params: Optional[Any] = None
  text2_config: Optional[dict] = None
  tokenizer2: Optional[Any] = None
  # diffusers' SDXL option: classifier-free guidance's empty negative prompt is zeros
  # (context and text_embeds), not the encoded ''.
  force_zeros_for_empty_prompt: bool = False

  @property
  def kind(self) -> str:
    return 'sdxl' if self.text2 is not None else 'sd'

  @property
  def text_towers(self) -> tuple:
    return (self.text,) if self.text2 is None else (self.text, self.text2)

  @property
  def text_tower_params(self) -> tuple:
    return (self.text_params,) if self.text2 is None else (self.text_params, self.text2_params)

  @property
  def tokenizers(self) -> tuple:
    return (self.tokenizer,) if self.text2 is None else (self.tokenizer, self.tokenizer2)


def param_trees(pipe: Pipeline, unet='unet', text='text', text2='text2', vae='') -> dict:
  """The pipeline's param trees under the given names: the UNet's, the text tower's, SDXL's
  second tower's (when it has one) and, when `vae` names it, the VAE's (when it has one).
  The defaults are the objectives' names (their frozen trees, `base`); a LoRA file's
  components are diffusers' ('text_encoder', 'text_encoder_2')."""
  trees = {unet: pipe.unet_params, text: pipe.text_params}
  if pipe.text2 is not None:
    trees[text2] = pipe.text2_params
  if vae and pipe.vae is not None:
    trees[vae] = pipe.vae_params
  return trees


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def model_kind(folder: str) -> str:
  """'sdxl' or 'sd' from a diffusers folder's own configs; names a missing or
  mismatched part (an SDXL UNet without text_encoder_2/, a second tower beside a
  UNet that has no use for it)."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'No such diffusers pipeline folder: {folder}')
  has = lambda part: os.path.isdir(os.path.join(folder, part))
  unet_config = os.path.join(folder, 'unet', 'config.json')
  xl = os.path.exists(unet_config) and \
      _read_json(unet_config).get('addition_embed_type') == 'text_time'
  parts = _SD_PARTS + (_SDXL_PARTS if xl else ())
  missing = [p + '/' for p in parts if not has(p)]
  if missing:
    why = (" its unet/config.json says addition_embed_type='text_time' (SDXL), which "
           'takes both text towers' if xl else '')
    raise FileNotFoundError(
        f'{folder} has no {", ".join(missing)} folder;{why or " expected"} a diffusers '
        f'pipeline ({", ".join(p + "/" for p in parts)}, vae/).'
        + (' SDXL refiners (text_encoder_2/ only) are not supported.' if xl else ''))
  extra = [p + '/' for p in _SDXL_PARTS if has(p)]
  if not xl and extra:
    raise ValueError(f'{folder} has {", ".join(extra)} (an SDXL part) but its UNet has no '
                     "SDXL added conditioning (addition_embed_type='text_time').")
  return 'sdxl' if xl else 'sd'


def _check_widths(unet_module, texts: Sequence[Any], folder: str) -> None:
  """The UNet's context width is the towers' widths together; SDXL's pooled input is
  the second tower's projection."""
  widths = [t.hidden_size for t in texts]
  if unet_module.cross_attention_dim != sum(widths):
    raise ValueError(f'{folder}: the UNet cross_attention_dim {unet_module.cross_attention_dim}'
                     f' != text tower hidden sizes {" + ".join(map(str, widths))}.')
  if len(texts) == 2 and texts[1].projection_dim != unet_module.pooled_text_dim:
    raise ValueError(
        f'{folder}: text_encoder_2 projects to {texts[1].projection_dim} (needs architectures '
        '["CLIPTextModelWithProjection"]), but the UNet takes a pooled text embedding of '
        f'{unet_module.pooled_text_dim} (projection_class_embeddings_input_dim - '
        f'{unet.NUM_TIME_IDS} x addition_time_embed_dim).')


def load_pipeline(folder: str, dtype: Any = jnp.float32, allow_pickle: bool = False) -> Pipeline:
  """Reads every component of a diffusers SD or SDXL folder (safetensors, no torch)."""
  kind = model_kind(folder)
  part = lambda name: os.path.join(folder, name)
  unet_module, unet_params, unet_config = core.load_flax_model(
      part('unet'), lambda c: unet.from_config(c, dtype), allow_pickle=allow_pickle)
  text, text_params, text_config = clip_folders.load_text_model(
      part('text_encoder'), dtype, allow_pickle)
  xl = {}
  if kind == 'sdxl':
    text2, text2_params, text2_config = clip_folders.load_text_model(
        part('text_encoder_2'), dtype, allow_pickle)
    index = part('model_index.json')
    xl = dict(text2=text2, text2_params=text2_params, text2_config=text2_config,
              tokenizer2=clip_folders.load_tokenizer(part('tokenizer_2')),
              force_zeros_for_empty_prompt=(_read_json(index) if os.path.exists(index) else {})
              .get('force_zeros_for_empty_prompt', True))  # diffusers' default
  _check_widths(unet_module, (text,) + ((xl['text2'],) if xl else ()), folder)
  scheduler_config = _read_json(os.path.join(part('scheduler'), 'scheduler_config.json'))
  vae_module = vae_params = None
  if os.path.isdir(part('vae')):
    vae_module, vae_params, _ = core.load_flax_model(
        part('vae'), lambda c: vae.from_config(c, dtype), allow_pickle=allow_pickle)
  return Pipeline(unet_module, unet_params, unet_config, text, text_params, text_config,
                  clip_folders.load_tokenizer(part('tokenizer')),
                  diffusion.schedule_from_config(scheduler_config), scheduler_config,
                  vae_module, vae_params, **xl)


def tokenize_prompts(tokenizers: Sequence[Any], prompts) -> tuple[np.ndarray, ...]:
  """Token ids of ``prompts`` for each tower's tokenizer (`Pipeline.tokenizers`), padded
  to each one's model_max_length as diffusers' pipelines do."""
  return tuple(clip.tokenize(t, prompts) for t in tokenizers)


def split_text_lora(lora: Optional[dict], towers: int) -> tuple:
  """Each text tower's part of a pipeline LoRA tree (the second's without TEXT2_PREFIX)."""
  if not lora:
    return (None,) * towers
  first = {p: f for p, f in lora.items() if p.startswith('text_model/')}
  second = {p[len(TEXT2_PREFIX):]: f for p, f in lora.items() if p.startswith(TEXT2_PREFIX)}
  if second and towers < 2:
    raise ValueError(f'The LoRA adapts a second text tower ({next(iter(second))} under '
                     f'{TEXT2_PREFIX}), but this pipeline has one.')
  return (first or None, second or None)[:towers]


def encode_prompts(towers: Sequence[Any], params: Sequence[Any], ids: Sequence[jax.Array],
                   lora: Optional[dict] = None) -> dict:
  """The text conditioning of the UNet, as keyword arguments of its call.

  One tower (SD 1.x/2.x, StableDiffusionPipeline): ``{'context': last_hidden_state}``.
  Two (StableDiffusionXLPipeline.encode_prompt, clip_skip=None): ``context`` is both
  towers' penultimate hidden states (no final layer norm) concatenated, ``text_embeds``
  the second tower's projected pooled output. Add `time_ids`' result for the UNet's
  micro-conditioning. For classifier-free guidance's empty negative prompt a pipeline
  with ``force_zeros_for_empty_prompt`` uses ``jax.tree.map(jnp.zeros_like, cond)``.

  Args:
    towers, params: `Pipeline.text_towers` and `Pipeline.text_tower_params`.
    ids: one [B, L] token id array per tower (`tokenize_prompts`).
    lora: optional pipeline LoRA tree; its text-tower paths adapt the towers.
  """
  if not len(towers) == len(params) == len(ids):
    raise ValueError(f'{len(towers)} text towers, {len(params)} param trees and '
                     f'{len(ids)} token id arrays: give one of each per tower.')
  outs = [t.apply({'params': p}, i, lora=tree)
          for t, p, i, tree in zip(towers, params, ids, split_text_lora(lora, len(towers)))]
  if len(outs) == 1:
    return {'context': outs[0].last_hidden_state}
  return {'context': jnp.concatenate([o.hidden_states[-2] for o in outs], axis=-1),
          'text_embeds': outs[-1].text_embeds}


def time_ids(unet_module, size: Sequence[int], crop_top_left: Sequence[int] = (0, 0),
             original_size: Optional[Sequence[int]] = None) -> dict:
  """SDXL's micro-conditioning as UNet keyword arguments; {} for UNets without it.

  diffusers' StableDiffusionXLPipeline._get_add_time_ids: (original height, width,
  crop top, left, target height, width); the original size defaults to the target
  ``size`` (the image's pixels, not the latents'), the crop to (0, 0).
  """
  if not unet_module.addition_time_embed_dim:
    return {}
  ids = tuple(original_size or size) + tuple(crop_top_left) + tuple(size)
  if len(ids) != unet.NUM_TIME_IDS:
    raise ValueError(f'SDXL time ids need (height, width) sizes and a (top, left) crop; '
                     f'got {ids}.')
  return {'time_ids': jnp.asarray(ids, jnp.float32)}


def save_model(params: Any, config: dict, folder: str, weights_name: str) -> None:
  """Writes a param tree with torch names (config.json + safetensors) to ``folder``,
  through a temporary folder (`files.atomic_folder`): an interrupted write never leaves
  a folder that looks complete."""
  with files.atomic_folder(folder) as tmp:
    save_file(core.flax_to_torch(params), os.path.join(tmp, weights_name),
              metadata={'format': 'pt'})
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
      json.dump(dict(config), f, indent=2, sort_keys=True)


def _save_text(params: Any, config: dict, folder: str, projection: bool) -> None:
  architecture = 'CLIPTextModelWithProjection' if projection else 'CLIPTextModel'
  save_model(params, dict(config, architectures=[architecture], model_type='clip_text_model'),
             folder, TEXT_WEIGHTS)


def save_pipeline(folder: str, unet_params: Any, unet_config: dict, text_params: Any,
                  text_config: dict, tokenizer_folder: str, scheduler_config: dict,
                  text2_params: Any = None, text2_config: Optional[dict] = None,
                  tokenizer2_folder: Optional[str] = None) -> None:
  """Writes a VAE-less diffusers folder that `load_pipeline` (and diffusers' model
  classes, component by component) read back; with ``text2_*`` and
  ``tokenizer2_folder``, SDXL's text_encoder_2/ and tokenizer_2/ too."""
  xl = (text2_params, text2_config, tokenizer2_folder)
  if any(x is not None for x in xl) and not all(x is not None for x in xl):
    raise ValueError('An SDXL folder needs text2_params, text2_config and tokenizer2_folder.')
  with files.atomic_folder(folder) as tmp:  # All parts or none.
    save_model(unet_params, dict(unet_config, _class_name='UNet2DConditionModel'),
               os.path.join(tmp, 'unet'), UNET_WEIGHTS)
    _save_text(text_params, text_config, os.path.join(tmp, 'text_encoder'), False)
    shutil.copytree(tokenizer_folder, os.path.join(tmp, 'tokenizer'))
    if text2_params is not None:
      _save_text(text2_params, text2_config, os.path.join(tmp, 'text_encoder_2'), True)
      shutil.copytree(tokenizer2_folder, os.path.join(tmp, 'tokenizer_2'))
    os.makedirs(os.path.join(tmp, 'scheduler'))
    with open(os.path.join(tmp, 'scheduler', 'scheduler_config.json'), 'w') as f:
      json.dump(dict(scheduler_config), f, indent=2, sort_keys=True)
