"""A diffusers ``controlnet/`` folder (config.json + diffusion_pytorch_model.safetensors)
-> our ControlNetModel and params, by `core`'s one rule."""
from typing import Any, Optional

import jax.numpy as jnp

from hyperlora_jax.convert import core
from hyperlora_jax.models import controlnet
from hyperlora_jax.models import unet as unet_lib


def load_controlnet(folder: str, unet: Optional[unet_lib.UNet] = None,
                    dtype: Any = jnp.float32, allow_pickle: bool = False):
  """(module, params, config) of a diffusers ControlNet folder.

  With ``unet`` (the module whose call takes the residuals), a ControlNet made for
  another UNet is refused, naming the settings that differ, before any weight is
  converted; missing, unexpected and misshaped keys are named by `core.torch_to_flax`.
  """
  def build(config):
    module = controlnet.from_config(config, dtype)
    if unet is not None:
      try:
        controlnet.check_fits_unet(module, unet)
      except ValueError as e:
        raise core.CheckpointError(f'{folder}: {e}') from None
    return module
  return core.load_flax_model(folder, build, allow_pickle=allow_pickle)
