"""A diffusers Stable Diffusion folder <-> our modules and param pytrees.

The folder layout is diffusers' own: ``unet/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/`` and optionally ``vae/`` (without one, the model diffuses pixels, which
is what the tiny quickstart models do). The quickstart writes its own base model in
this layout, so tiny and real models take the same code path.
"""
import json
import os
from typing import Any, NamedTuple, Optional

import jax.numpy as jnp
from safetensors.numpy import save_file

from hyperlora_jax import diffusion
from hyperlora_jax.convert import core
from hyperlora_jax.convert import clip_folders
from hyperlora_jax.models import unet, vae

UNET_WEIGHTS = 'diffusion_pytorch_model.safetensors'
TEXT_WEIGHTS = 'model.safetensors'


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


def load_pipeline(folder: str, dtype: Any = jnp.float32, allow_pickle: bool = False) -> Pipeline:
  """Reads every component of a diffusers SD folder (safetensors, no torch)."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'No such diffusers pipeline folder: {folder}')
  for part in ('unet', 'text_encoder', 'tokenizer', 'scheduler'):
    if not os.path.isdir(os.path.join(folder, part)):
      raise FileNotFoundError(f'{folder} has no {part}/ folder; expected a diffusers '
                              'pipeline (unet/, text_encoder/, tokenizer/, scheduler/, vae/).')
  unet_module, unet_params, unet_config = core.load_flax_model(
      os.path.join(folder, 'unet'), lambda c: unet.from_config(c, dtype), allow_pickle=allow_pickle)
  text, text_params, text_config = clip_folders.load_text_model(
      os.path.join(folder, 'text_encoder'), dtype, allow_pickle)
  with open(os.path.join(folder, 'scheduler', 'scheduler_config.json')) as f:
    scheduler_config = json.load(f)
  vae_module = vae_params = None
  if os.path.isdir(os.path.join(folder, 'vae')):
    vae_module, vae_params, _ = core.load_flax_model(
        os.path.join(folder, 'vae'), lambda c: vae.from_config(c, dtype), allow_pickle=allow_pickle)
  return Pipeline(unet_module, unet_params, unet_config, text, text_params, text_config,
                  clip_folders.load_tokenizer(os.path.join(folder, 'tokenizer')),
                  diffusion.schedule_from_config(scheduler_config), scheduler_config,
                  vae_module, vae_params)


def save_model(params: Any, config: dict, folder: str, weights_name: str) -> None:
  """Writes a param tree with torch names (config.json + safetensors) to ``folder``."""
  os.makedirs(folder, exist_ok=True)
  save_file(core.flax_to_torch(params), os.path.join(folder, weights_name),
            metadata={'format': 'pt'})
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(dict(config), f, indent=2, sort_keys=True)


def save_pipeline(folder: str, unet_params: Any, unet_config: dict, text_params: Any,
                  text_config: dict, tokenizer_folder: str, scheduler_config: dict) -> None:
  """Writes a VAE-less diffusers folder that `load_pipeline` (and diffusers' model
  classes, component by component) read back."""
  import shutil
  save_model(unet_params, dict(unet_config, _class_name='UNet2DConditionModel'),
             os.path.join(folder, 'unet'), UNET_WEIGHTS)
  save_model(text_params, dict(text_config, architectures=['CLIPTextModel'],
                               model_type='clip_text_model'),
             os.path.join(folder, 'text_encoder'), TEXT_WEIGHTS)
  shutil.copytree(tokenizer_folder, os.path.join(folder, 'tokenizer'), dirs_exist_ok=True)
  os.makedirs(os.path.join(folder, 'scheduler'), exist_ok=True)
  with open(os.path.join(folder, 'scheduler', 'scheduler_config.json'), 'w') as f:
    json.dump(dict(scheduler_config), f, indent=2, sort_keys=True)
