"""``hyperlora``: a hypernetwork predicts a LoRA per sample from its context image.

The UNet, the text tower (and the VAE) are frozen; the gradients reach only the
hypernetwork and its gamma. A frozen encoder (hypernet.encoder.trainable=False) and the
frozen random matrices of LiDB / VeRA (the 'aux' collection, rebuilt from the seed in
the config) ride in the frozen tree.

The loss is ``alpha * diffusion + beta * weight-space`` (HyperDreamBooth eq. 2,
config.hypernet.loss): the weight-space term is the mean squared difference between the
raw numbers the hypernetwork predicts (plain or LiDB) and the pre-optimized ones of each
example's subject, read from a target-weights dataset (`convert.target_weights`, written
by a lora_bank run) into the frozen tree at start. beta = 0 is the diffusion loss alone.
"""
import jax
import jax.numpy as jnp

from hyperlora_jax import lora as lora_lib
from hyperlora_jax.convert import clip_folders, target_weights
from hyperlora_jax.data import pipeline as data_pipeline
from hyperlora_jax.models import hypernet, init_variables
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
  init = init_variables(net, rng_net, jnp.zeros(
      (1, config.data.resolution, config.data.resolution, 3)))
  trainable = dict(init['params'])
  frozen['hypernet'] = {k: v for k, v in init.items() if k != 'params'}
  if tower is not None:
    trainable['encoder'] = {'tower': tower}
  if not config.hypernet.encoder.trainable:
    frozen['hypernet']['params'] = {'encoder': trainable.pop('encoder')}

  def lora(trainable, frozen, inputs):
    return net.apply(variables(trainable, frozen), inputs['context'])

  weighted = weighted_loss(config, models, frozen, variables, net)
  return diffusion_objective(
      SPEC, config, models, trainable, frozen, lora=lora,
      metrics=lambda trainable: {'gamma': trainable['gamma']},
      hypernet_variables=variables, lora_and_loss=weighted,
      loss_inputs=('subject',) if config.hypernet.loss.beta else ())


def weighted_loss(config, models, frozen, variables, net):
  """`diffusion_objective`'s lora_and_loss for alpha * diffusion + beta * weight-space,
  or None for the diffusion loss alone (alpha 1, beta 0). With beta, the target weights
  of the training split's subjects go into ``frozen['weight_targets']``."""
  alpha, beta = config.hypernet.loss.alpha, config.hypernet.loss.beta
  if alpha == 1.0 and not beta:
    return None
  if beta:
    if not config.hypernet.loss.targets:
      raise ValueError('config.hypernet.loss.beta > 0 needs hypernet.loss.targets: the '
                       'folder of a lora_bank run (pre-optimized target weights).')
    frozen['weight_targets'] = target_weights.load(
        config.hypernet.loss.targets, data_pipeline.subject_keys(config.data, 'train'),
        lora_lib.raw_fields(config.hypernet.param), models.targets)

  def lora_and_loss(trainable, frozen, batch):
    tree, raw = net.apply(variables(trainable, frozen), batch['context'], with_raw=True)
    if not beta:
      return tree, lambda diffusion: alpha * diffusion, {}
    squares = [jnp.square(r.astype(jnp.float32) - t[batch['subject']])
               for r, t in zip(raw, frozen['weight_targets'])]
    weight = sum(x.sum() for x in squares) / sum(x.size for x in squares)
    return tree, lambda diffusion: alpha * diffusion + beta * weight, {'weight_loss': weight}

  return lora_and_loss


SPEC = Spec('hyperlora', build, lora_kind='predicted', lora_inputs=('context',))
