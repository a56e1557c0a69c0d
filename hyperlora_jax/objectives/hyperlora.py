"""``hyperlora``: a hypernetwork predicts a LoRA per sample from its context image.

The UNet, the text tower (and the VAE) are frozen; the gradients reach only the
hypernetwork and its gamma. A frozen encoder (hypernet.encoder.trainable=False) and the
frozen random matrices of LiDB / VeRA (the 'aux' collection, rebuilt from the seed in
the config) ride in the frozen tree.
"""
import jax
import jax.numpy as jnp

from hyperlora_jax.convert import clip_folders
from hyperlora_jax.models import hypernet
from hyperlora_jax.objectives.base import (Objective, Spec, base_models, compute_dtype,
                                          diffusion_objective)


def clip_tower(config):
  """(module, params) of a pretrained CLIP vision tower for 'clip' encoders, else Nones."""
  enc = config.hypernet.encoder
  if enc.kind != 'clip':
    return None, None
  if not enc.pretrained:
    raise ValueError('config.hypernet.encoder.pretrained is not set: the clip encoder '
                     'needs a local transformers CLIP (vision) folder.')
  module, params, _ = clip_folders.load_vision_model(enc.pretrained,
                                                     compute_dtype(config))
  return module, params


def variables(trainable, frozen) -> dict:
  """The hypernetwork's variables: trained params, a frozen encoder's params and the
  frozen collections."""
  held = frozen['hypernet']
  return {**{k: v for k, v in held.items() if k != 'params'},
          'params': {**trainable, **held.get('params', {})}}


def build(config, rng) -> Objective:
  rng_base, rng_net = jax.random.split(rng)
  tower_module, tower = clip_tower(config)
  models, frozen = base_models(
      config, rng_base, lambda targets: hypernet.build(config.hypernet, targets, tower_module))
  net = models.hypernet
  init = jax.jit(net.init)(rng_net, jnp.zeros(
      (1, config.data.resolution, config.data.resolution, 3)))
  trainable = dict(init['params'])
  frozen['hypernet'] = {k: v for k, v in init.items() if k != 'params'}
  if tower is not None:
    trainable['encoder'] = {'tower': tower}
  if not config.hypernet.encoder.trainable:
    frozen['hypernet']['params'] = {'encoder': trainable.pop('encoder')}

  def lora(trainable, frozen, inputs):
    return net.apply(variables(trainable, frozen), inputs['context'])

  return diffusion_objective(
      SPEC, config, models, trainable, frozen, lora=lora,
      metrics=lambda trainable: {'gamma': trainable['gamma']},
      hypernet_variables=variables)


SPEC = Spec('hyperlora', build, lora_kind='predicted', lora_inputs=('context',))
