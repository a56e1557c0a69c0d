"""``unet_lora``: one shared plain LoRA on the UNet (the single-LoRA baseline, or per-image
fine-tuning when the data holds one image), scaled by lora.alpha / lora.rank."""
import jax

from hyperlora_jax import lora as lora_lib
from hyperlora_jax.objectives.base import Objective, Spec, base_models, diffusion_objective


def build(config, rng) -> Objective:
  rng_base, rng_lora = jax.random.split(rng)
  models, frozen = base_models(config, rng_base)
  trainable = lora_lib.init_plain(rng_lora, models.targets, config.lora.rank)
  scale = config.lora.alpha / config.lora.rank

  def lora(trainable, frozen, inputs):
    del frozen, inputs
    return {p: dict(f, scale=scale) for p, f in trainable.items()}

  return diffusion_objective(SPEC, config, models, trainable, frozen, lora=lora)


SPEC = Spec('unet_lora', build, lora_kind='shared')
