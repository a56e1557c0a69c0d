"""What a UNet call takes beside the text and the LoRA: ControlNet residuals from a
condition image, IP-Adapter tokens from an image, per sample.

An objective's ``unet_inputs(trainable, frozen, inputs)`` returns `UNetInputs` (or
None): params laid over the UNet's (IP-Adapter's to_k_ip/to_v_ip) and a per-step
function ``step(x, t, text) -> UNet keyword arguments``. What is computed once per sample
(the image tokens) happens when ``unet_inputs`` is called, outside the sampler's loop;
what depends on the noisy latents (the ControlNet) happens in ``step``. `denoiser` makes
the one UNet call that the loss and the sampler both use, so a LoRA, a condition image
and image tokens reach the UNet the same way in training and in sampling. Under
classifier-free guidance the sampler gives ``unet_inputs`` each sample's inputs twice
(`tile`), as it does the LoRA's factors: the subject and the pose reach both branches and
guidance amplifies the text alone.

Add-ons (`load_addons`): a frozen ControlNet (``model.controlnet.folder``, a diffusers
``controlnet/`` folder) or IP-Adapter (``model.ip_adapter``: weights in the layout
diffusers' load_ip_adapter takes, and its CLIP image encoder) that any objective's runs
train and sample with, by config; evaluation attaches them to a finished run the same
way (`runs.restore(..., attach=...)`), since they change no trained param.
"""
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from hyperlora_jax.convert import clip_folders, controlnet_folders, ip_adapter_files
from hyperlora_jax.models import clip, controlnet, ip_adapter

# The config sections of the add-ons, and the objective whose runs train each part.
ADDONS = ('controlnet', 'ip_adapter')


class UNetInputs(NamedTuple):
  params: Optional[Any]  # laid over the UNet's params (`ip_adapter.merge_params`)
  step: Callable  # (x, t, text: the UNet's text keyword arguments) -> more of them


class Addon(NamedTuple):
  """A frozen part every UNet call of a run takes: ``inputs(frozen, batch)`` ->
  UNetInputs, computed from the batch keys ``keys``."""
  name: str
  keys: tuple
  inputs: Callable


def tile(inputs: dict, n: int) -> dict:
  """Each sample's inputs n times along the batch (the CFG batch [uncond; cond])."""
  return {k: jnp.concatenate([v] * n) for k, v in inputs.items()}


def combine(*parts: Optional[UNetInputs]) -> Optional[UNetInputs]:
  """Several parts' inputs as one (each argument of the UNet call from one part)."""
  parts = [p for p in parts if p is not None]
  if len(parts) <= 1:
    return parts[0] if parts else None
  overlays = [p.params for p in parts if p.params]
  params = overlays[0] if overlays else None
  for more in overlays[1:]:
    params = ip_adapter.merge_params(params, more)

  def step(x, t, text):
    out = {}
    for part in parts:
      kwargs = part.step(x, t, text)
      if set(kwargs) & set(out):
        raise ValueError(f'Two parts of the run give the UNet {sorted(set(kwargs) & set(out))}.')
      out.update(kwargs)
    return out

  return UNetInputs(params, step)


def denoiser(unet_module, unet_params, lora, text: dict, extra: Optional[UNetInputs]):
  """The UNet as ``(x, t) -> prediction``: the loss's and the sampler's one call.

  text: the UNet's text keyword arguments (`encode_prompts`' plus `time_ids`').
  extra: `UNetInputs` of the run (ControlNet residuals, IP-Adapter tokens), or None.
  """
  params = unet_params
  if extra is not None and extra.params:
    params = ip_adapter.merge_params(unet_params, extra.params)

  def fn(x, t):
    more = extra.step(x, t, text) if extra is not None else {}
    return unet_module.apply({'params': params}, x, t, lora=lora, **text, **more)
  return fn


# ---------------------------------------------------------------- ControlNet


def control_residuals(module, params, condition, scale) -> UNetInputs:
  """A ControlNet's residuals for condition images [B, H, W, C] in [-1, 1] (the data's
  range; the ControlNet gets [0, 1], as diffusers' pipelines feed it), times `scale`."""
  condition = (condition.astype(jnp.float32) + 1) / 2

  def step(x, t, text):
    down, mid = module.apply({'params': params}, x, t, text['context'], condition,
                             conditioning_scale=scale)
    return {'down_block_additional_residuals': down, 'mid_block_additional_residual': mid}
  return UNetInputs(None, step)


def check_condition_size(module, unet_module, latent_factor: int) -> None:
  """Raises ValueError when the ControlNet does not fit the UNet, or does not embed
  condition images (at the images' size) down to the UNet's latents."""
  controlnet.check_fits_unet(module, unet_module)
  if module.condition_factor != latent_factor:
    raise ValueError(
        f'The ControlNet embeds condition images {module.condition_factor}x smaller per '
        f'side (conditioning_embedding_out_channels '
        f'{tuple(module.conditioning_embedding_out_channels)}), but the UNet\'s latents are '
        f'{latent_factor}x smaller than the images: it needs '
        f'{latent_factor.bit_length()} conditioning embedding channels, one more than the '
        'halvings.')


# ---------------------------------------------------------------- IP-Adapter


def image_features(encoder, encoder_params, projection, images):
  """What the IP-Adapter projection reads from images [B, H, W, 3] in [-1, 1]: the
  Resampler (IP-Adapter Plus) the CLIP encoder's penultimate hidden states, the plain
  ImageProjection its projected image embedding (as diffusers' pipelines encode them)."""
  pixels = clip.preprocess_images((images.astype(jnp.float32) + 1) / 2, encoder.image_size)
  out = encoder.apply({'params': encoder_params}, pixels)
  if isinstance(projection, ip_adapter.Resampler):
    return out.hidden_states[-2]
  return out.image_embeds


def image_tokens(encoder, encoder_params, projection, projection_params, unet_ip_params,
                 images, scale) -> UNetInputs:
  """IP-Adapter's inputs: image tokens, computed once per sample, and to_k_ip/to_v_ip."""
  features = jax.lax.stop_gradient(image_features(encoder, encoder_params, projection, images))
  tokens = projection.apply({'params': projection_params}, features)
  return UNetInputs(unet_ip_params, lambda x, t, text: {'ip_tokens': tokens, 'ip_scale': scale})


# ---------------------------------------------------------------- add-ons


def load_addons(config, models, frozen, latent_factor: int, dtype) -> tuple:
  """The add-ons the config names (`ADDONS`), their params put into ``frozen``."""
  out = []
  control = config.model.controlnet
  if control.folder:
    module, params, _ = controlnet_folders.load_controlnet(control.folder, models.unet, dtype)
    check_condition_size(module, models.unet, latent_factor)
    frozen['controlnet'] = params
    out.append(Addon('controlnet', ('condition',), lambda frozen, batch: control_residuals(
        module, frozen['controlnet'], batch['condition'], control.scale)))
  ip = config.model.ip_adapter
  if ip.weights or ip.image_encoder:
    if not (ip.weights and ip.image_encoder):
      raise ValueError('config.model.ip_adapter needs both weights (an IP-Adapter file) and '
                       'image_encoder (its CLIP vision folder); got '
                       f'weights={ip.weights!r}, image_encoder={ip.image_encoder!r}.')
    encoder, encoder_params, _ = clip_folders.load_vision_model(ip.image_encoder, dtype)
    adapter = ip_adapter_files.load_ip_adapter(ip.weights, frozen['unet'], dtype)
    frozen['ip_adapter'] = {'image_encoder': encoder_params,
                            'projection': adapter.projection_params, 'unet': adapter.unet_params}
    out.append(Addon('ip_adapter', ('context',), lambda frozen, batch: image_tokens(
        encoder, frozen['ip_adapter']['image_encoder'], adapter.projection,
        frozen['ip_adapter']['projection'], frozen['ip_adapter']['unet'], batch['context'],
        ip.scale)))
  return tuple(out)
