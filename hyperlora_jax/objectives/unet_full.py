"""``unet_full``: the UNet and the text tower(s) themselves (pretraining the quickstart's
tiny base model from scratch, or full fine-tuning); a stage exports the result as a
diffusers folder that later stages load as their base model."""
import jax

from hyperlora_jax.objectives.base import (BASE_PARTS, Objective, Spec, base_models,
                                          diffusion_objective)


def build(config, rng) -> Objective:
  rng_base, _ = jax.random.split(rng)  # As the other objectives split theirs.
  models, frozen = base_models(config, rng_base)
  trainable = {k: frozen.pop(k) for k in BASE_PARTS if k in frozen}
  return diffusion_objective(
      SPEC, config, models, trainable, frozen, lora=lambda trainable, frozen, inputs: None,
      base=lambda trainable, frozen: trainable)


SPEC = Spec('unet_full', build, trains_base=True)
