"""``ip_adapter``: IP-Adapter (Ye et al. 2023), the tuning-free baseline: image tokens of
each example's context image reach every cross-attention through to_k_ip/to_v_ip.

The UNet, the text tower (and the VAE) and the CLIP image encoder are frozen; the
gradients reach the image projection (IP-Adapter Plus' Resampler over the encoder's
penultimate hidden states, or the plain ImageProjection of its image embedding) and
to_k_ip/to_v_ip, which start as each cross-attention's to_k/to_v (the paper's init).
The tokens are in both branches of classifier-free guidance, as a predicted LoRA is
(`conditioning`), so the model learns them without image dropout. A stage exports the
adapter in the layout diffusers' load_ip_adapter takes (ip-adapter.safetensors) with
its image encoder (image_encoder/), which later stages' ``model.ip_adapter`` loads
frozen: HyperLoRA and IP-Adapter in one UNet call.
"""
import os

import jax

from hyperlora_jax.convert import clip_folders, ip_adapter_files
from hyperlora_jax.models import clip, init_variables, ip_adapter
from hyperlora_jax.objectives.conditioning import image_features, image_tokens
from hyperlora_jax.objectives.base import (Objective, Spec, base_models, compute_dtype,
                                          diffusion_objective)

WEIGHTS, IMAGE_ENCODER = 'ip-adapter.safetensors', 'image_encoder'


def _image_encoder(config, rng):
  """(module, params): the CLIP vision folder's, or a random tower shaped by
  ip_adapter.vit (drawn from the run's seed, so a restore rebuilds it)."""
  cfg = config.ip_adapter
  dtype = compute_dtype(config)
  if cfg.image_encoder:
    module, params, _ = clip_folders.load_vision_model(cfg.image_encoder, dtype)
    return module, params
  module = clip.vision_from_config(cfg.vit.to_dict(), dtype)
  return module, init_variables(module, rng, *module.dummy_inputs())['params']


def _projection(config, encoder, cross_attention_dim: int):
  cfg, dtype = config.ip_adapter, compute_dtype(config)
  if cfg.kind == 'plus':
    return ip_adapter.Resampler(
        embed_dims=encoder.hidden_size, output_dims=cross_attention_dim,
        hidden_dims=cfg.hidden, depth=cfg.depth, heads=cfg.heads, dim_head=64,
        num_queries=cfg.num_tokens, dtype=dtype)
  if cfg.kind == 'plain':
    if encoder.projection_dim is None:
      raise ValueError("ip_adapter.kind='plain' reads the image embedding: the image "
                       'encoder needs its visual projection.')
    return ip_adapter.ImageProjection(encoder.projection_dim, cross_attention_dim,
                                      cfg.num_tokens, dtype)
  raise ValueError(f"Unknown ip_adapter.kind {cfg.kind!r}; one of 'plus', 'plain'.")


def build(config, rng) -> Objective:
  rng_base, rng_encoder, rng_projection = jax.random.split(rng, 3)
  models, frozen = base_models(config, rng_base)
  encoder, frozen['image_encoder'] = _image_encoder(config, rng_encoder)
  projection = _projection(config, encoder, models.unet.cross_attention_dim)
  features = jax.eval_shape(lambda p, x: image_features(
      encoder, p, projection, x), frozen['image_encoder'], jax.ShapeDtypeStruct(
          (1, config.data.resolution, config.data.resolution, 3), 'float32'))
  trainable = {
      'projection': init_variables(projection, rng_projection, jax.numpy.zeros(
          features.shape))['params'],
      'unet': ip_adapter_files.ip_params_from_unet(frozen['unet'])}
  scale = config.model.ip_adapter.scale

  def unet_inputs(trainable, frozen, inputs):
    return image_tokens(encoder, frozen['image_encoder'], projection,
                                     trainable['projection'], trainable['unet'],
                                     inputs['context'], scale)

  def export_part(trainable, frozen, folder):
    """ip-adapter.safetensors and image_encoder/ (the add-on's two config keys)."""
    os.makedirs(folder, exist_ok=True)
    ip_adapter_files.save_ip_adapter(os.path.join(folder, WEIGHTS), projection,
                                     trainable['projection'], trainable['unet'],
                                     frozen['unet'])
    clip_folders.save_vision_model(frozen['image_encoder'], encoder,
                                   os.path.join(folder, IMAGE_ENCODER))

  return diffusion_objective(SPEC, config, models, trainable, frozen,
                             lora=lambda trainable, frozen, inputs: None,
                             unet_inputs=unet_inputs, export_part=export_part)


SPEC = Spec('ip_adapter', build, part='ip_adapter', unet_inputs=('context',))
