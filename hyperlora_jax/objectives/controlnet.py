"""``controlnet``: a ControlNet learns to steer the frozen UNet with each example's
condition image (a pose map), as diffusers' train_controlnet.py trains one.

The UNet, the text tower (and the VAE) are frozen; the gradients reach only the
ControlNet, whose residuals join the UNet call (`conditioning.control_residuals`) in
the loss and in sampling. With ``controlnet.from_unet`` it starts as diffusers'
``ControlNetModel.from_unet``: the UNet's encoder, zero convs at zero, so step 0 is the
base model exactly. A stage exports it as a diffusers ``controlnet/`` folder that later
stages' (and evaluation's) ``model.controlnet.folder`` loads frozen.
"""
import jax

from hyperlora_jax.convert import pipeline
from hyperlora_jax.models import controlnet, init_variables
from hyperlora_jax.objectives.conditioning import check_condition_size, control_residuals
from hyperlora_jax.objectives.base import (Objective, Spec, base_models, compute_dtype,
                                          diffusion_objective, latent_factor)


def build(config, rng) -> Objective:
  rng_base, rng_net = jax.random.split(rng)
  models, frozen = base_models(config, rng_base)
  control_config = controlnet.config_from_unet(
      models.unet_config, conditioning_embedding_out_channels=tuple(
          config.controlnet.conditioning_embedding_out_channels))
  module = controlnet.from_config(control_config, compute_dtype(config))
  check_condition_size(module, models.unet, latent_factor(models))
  if config.controlnet.from_unet:
    trainable = controlnet.params_from_unet(module, frozen['unet'], rng_net)
  else:
    trainable = init_variables(module, rng_net, *module.dummy_inputs())['params']
  scale = config.model.controlnet.scale

  def unet_inputs(trainable, frozen, inputs):
    del frozen
    return control_residuals(module, trainable, inputs['condition'], scale)

  def export_part(trainable, frozen, folder):
    del frozen
    pipeline.save_model(trainable, control_config, folder, pipeline.UNET_WEIGHTS)

  return diffusion_objective(SPEC, config, models, trainable, frozen,
                             lora=lambda trainable, frozen, inputs: None,
                             unet_inputs=unet_inputs, export_part=export_part)


SPEC = Spec('controlnet', build, part='controlnet', unet_inputs=('condition',))
