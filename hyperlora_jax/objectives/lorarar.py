"""``lorarar``: LoRA.rar's merger (`models.merger.Merger`), trained on a LoRA zoo's pairs.

The trainable params are the merger's; the frozen ones the base model's and the zoo's
LoRAs: config.merger.content and config.merger.style are two lora_bank runs' folders
(a content bank grouped by item, a style bank by style: `preoptimize`), every subject
of each in its raw rows. Each step pairs every example of the batch with a random
content LoRA and a random style LoRA of the zoo, merges each pair with the merger's
coefficients (`merging.merger_coefficients`, per pair) and takes ZipLoRA's loss through
the frozen base (`merging.ziplora_loss`): on the batch's noised images and prompts, the
merged model's output close to the content LoRA's alone and to the style LoRA's alone,
+ config.merger.similarity * mean |m_c m_s|. Nothing per pair is optimized: one forward
of the trained merger merges an unseen pair.

A run's LoRA is the merge of a pair: ``lora(trainable, frozen, {'content': i, 'style':
j})`` with zoo indices i, j [B] (`Spec.lora_inputs`), so sampling takes it as it takes
any per-sample LoRA.
"""

import jax
import jax.numpy as jnp
import numpy as np

from hyperlora_jax import diffusion
from hyperlora_jax import lora as lora_lib
from hyperlora_jax import merging
from hyperlora_jax.convert import target_weights
from hyperlora_jax.models import init_variables, merger as merger_lib
from hyperlora_jax.objectives.lora_bank import raw_lora
from hyperlora_jax.objectives.base import (Objective, Spec, base_models, latents,
                                          frozen_base, predictor, tokenize)


def zoo_keys(folder: str) -> tuple:
  """The subjects of a lora_bank run's folder (its index), in their row order."""
  return tuple(target_weights.read_index(folder)['identities'])


def build(config, rng) -> Objective:
  models, frozen = base_models(config, rng)
  raw = raw_lora(config.bank.param, models.targets)
  fields = lora_lib.raw_fields(config.bank.param)
  for side in ('content', 'style'):
    folder = config.merger[side]
    if not folder:
      raise ValueError(f'config.merger.{side} is not set: the folder of a lora_bank run '
                       f'(the zoo\'s {side} LoRAs).')
    frozen[side] = [jnp.asarray(g) for g in target_weights.load(
        folder, zoo_keys(folder), fields, models.targets)]
  shapes = [jnp.zeros((1,) + np.shape(g)[1:]) for g in frozen['content']]
  frozen['bank'] = dict(init_variables(raw, rng, shapes))
  paths = merging.merger_paths({t.path: t for t in models.targets},
                               {t.path: t for t in models.targets}, config.merger.layers)
  dims = {t.path: (t.d_in, t.d_out) for t in models.targets}
  net = merger_lib.Merger(paths, tuple(dims[p] for p in paths), config.merger.hidden)
  columns = [jnp.zeros((1, dims[p][0], 2 * dims[p][1])) for p in paths]
  trainable = init_variables(net, jax.random.fold_in(rng, 1), columns)['params']
  models = models._replace(hypernet=net)
  predict = predictor(models, config.data.resolution)
  uncond_ids = [jnp.asarray(i[0]) for i in tokenize(models, [''])]

  def loras(frozen, inputs):
    """The content and style LoRAs of the pairs (zoo rows `inputs['content'|'style']`)."""
    return tuple(raw.apply(frozen['bank'], [g[inputs[side]] for g in frozen[side]])
                 for side in ('content', 'style'))

  def merged(trainable, frozen, inputs):
    content, style = loras(frozen, inputs)
    coefficients = merging.merger_coefficients(
        merging.TrainedMerger(net, trainable), content, style)
    return content, style, coefficients

  def lora(trainable, frozen, inputs):
    content, style, coefficients = merged(trainable, frozen, inputs)
    return merging.combine(content, style, coefficients)

  def loss_fn(trainable, frozen, batch, rng):
    rng_pair, rng_drop, rng_t, rng_noise, rng_vae = jax.random.split(rng, 5)
    n = batch['input_ids'][0].shape[0]
    pick_c, pick_s = jax.random.split(rng_pair)
    pairs = {'content': jax.random.randint(pick_c, (n,), 0, frozen['content'][0].shape[0]),
             'style': jax.random.randint(pick_s, (n,), 0, frozen['style'][0].shape[0])}
    content, style, coefficients = merged(trainable, frozen, pairs)
    drop = jax.random.bernoulli(rng_drop, config.model.prompt_dropout, (n,))
    ids = tuple(jnp.where(drop[:, None], u[None], i)
                for u, i in zip(uncond_ids, batch['input_ids']))
    x0 = latents(models, frozen.get('vae'), batch['target'], rng_vae)
    t = diffusion.random_timesteps(rng_t, models.schedule, n)
    x = diffusion.add_noise(models.schedule, x0, jax.random.normal(rng_noise, x0.shape), t)
    inputs = {side: {'x': x, 't': t, 'input_ids': ids} for side in ('content', 'style')}
    base = frozen_base(None, frozen)
    targets = merging.lora_targets(content, style, predict, base, inputs)
    loss, metrics = merging.ziplora_loss(coefficients, content, style, predict, base, inputs,
                                         targets, config.merger.similarity)
    return loss, metrics

  def prepare(batch):
    prompts = [p.decode() if isinstance(p, bytes) else str(p) for p in batch['prompt']]
    return {'input_ids': tokenize(models, prompts),
            'target': np.asarray(batch['target'], np.float32)}

  return Objective(SPEC, models, trainable, frozen, loss_fn, prepare, lora, frozen_base,
                   hypernet_variables=lambda trainable, frozen: {'params': trainable})


SPEC = Spec('lorarar', build, lora_kind='predicted', lora_inputs=('content', 'style'))
