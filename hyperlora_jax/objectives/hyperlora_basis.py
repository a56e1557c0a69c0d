"""``hyperlora_basis``: ByteDance HyperLoRA's training recipe, which makes its ID/Base
split mean something (Li et al. 2025; their code publishes inference only).

The network (`models.id_base`) predicts an ID-LoRA and a Base-LoRA from a subject's set
of context images. ``config.basis.stage`` says what a run trains (`TRAINABLE`, over
the hypernetwork's param paths; ``train.init_from`` starts it from an earlier stage):

  'base'      stage 1, the Base-LoRA: its branch sees the contexts with their identity
              region hidden (blurred; filled on the synthetic task), the ID branch is
              bypassed, prompts have no trigger. Trains the Base branch.
  'id_clip'   stage 2, the ID-LoRA from the image encoder's (CLIP) tokens, Base frozen,
              the three conditions in one loss (`CONDITIONS`, mixed by
              basis.conditions). Trains the ID branch but its identity layers.
  'id_embed'  stage 3: the ID resampler also attends to an identity encoder's tokens
              (precomputed embeddings or a conv net over the region's crop); trains
              that encoder, the resampler's id_* layers and the ID bases; the image
              encoder branch stays frozen. The same three conditions.
  'joint'     one stage, end to end (the comparison): everything trains, both parts
              on, the plain diffusion loss with the trigger.

The three conditions (each sample of a batch draws one): with the trigger, ID + Base
reconstruct the target; without it, the ID-LoRA alone matches the base model's
prediction, and ID + Base match the Base-LoRA's (both targets computed on the same
noisy input, without gradient). Sampling and export scale each part by
``inputs['part_scales']`` ({'id', 'base'}: `Spec.lora_parts`).
"""
import json
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import traverse_util

from hyperlora_jax import checkpoint
from hyperlora_jax import defaults
from hyperlora_jax import diffusion
from hyperlora_jax import sharding
from hyperlora_jax.data import subjects
from hyperlora_jax.models import id_base, init_variables
from hyperlora_jax.objectives.base import (Objective, Spec, base_models, encode_prompts,
                                          frozen_base, latents, time_ids, tokenize)
from hyperlora_jax.objectives.hyperlora import clip_tower

# What each stage trains: a regex over '/'-joined hypernetwork param paths ('encoder/' is
# the ID branch's image encoder, or both branches' with basis.encoders='shared').
TRAINABLE = {
    'base': r'^(base_encoder/|base_decoder/|parameterization/base_|gamma_base$)',
    'id_clip': r'^(encoder/|id_decoder/(?!id_)|parameterization/id_|gamma_id$)',
    'id_embed': r'^(identity/|id_decoder/id_|parameterization/id_|gamma_id$)',
    'joint': r'',
}
# stage -> (the parts its network computes, the ID branch reads identity tokens, loss)
STAGES = {'base': (('base',), False, 'plain'), 'id_clip': (id_base.PARTS, False, 'conditions'),
          'id_embed': (id_base.PARTS, True, 'conditions'), 'joint': (id_base.PARTS, True, 'plain')}
# The three conditions: (prompt with the trigger, the student's {id, base} scales, the
# teacher's: None = the diffusion target itself).
CONDITIONS = ((True, (1, 1), None), (False, (1, 0), (0, 0)), (False, (1, 1), (0, 1)))
# What an earlier run must share with this one for its params to start this one's.
ARCHITECTURE = ('model.targets', 'hypernet.encoder.kind', 'hypernet.encoder.channels',
                'hypernet.encoder.layer', 'hypernet.decoder.', 'hypernet.param.kind',
                'hypernet.param.rank', 'hypernet.param.num_id', 'hypernet.param.num_base',
                'hypernet.param.mix', 'hypernet.param.base_rank', 'basis.encoders',
                'basis.identity.', 'data.id_embed_dim')


def trigger(config) -> str:
  return config.basis.trigger or subjects.default_trigger(config.data)


def trainable_pattern(config) -> str:
  """The regex of the hypernetwork params a run trains (basis.trainable overrides the
  stage's); a shared encoder trains with the Base branch (stage 1), not stage 2."""
  basis = config.basis
  if basis.trainable:
    return basis.trainable
  if basis.stage not in TRAINABLE:
    raise ValueError(f'Unknown basis.stage {basis.stage!r}; one of {sorted(TRAINABLE)}.')
  pattern = TRAINABLE[basis.stage]
  if basis.encoders == 'shared':
    pattern = {'base': pattern.replace('^(base_encoder/', '^(encoder/'),
               'id_clip': pattern.replace('^(encoder/|', '^(')}.get(basis.stage, pattern)
  return pattern


def _trained(config, paths):
  """The paths among `paths` a run of `config` trains (a frozen image encoder never)."""
  pattern = re.compile(trainable_pattern(config))
  frozen = () if config.hypernet.encoder.trainable else ('encoder/', 'base_encoder/')
  return [p for p in paths if pattern.search(p) and not p.startswith(frozen)]


def _flat_config(config) -> dict:
  """Key path -> value, as the config's JSON holds it (tuples are lists there)."""
  return traverse_util.flatten_dict(json.loads(config.to_json_best_effort()), sep='.')


def _check_architecture(config, other, where: str) -> None:
  mine, theirs = _flat_config(config), _flat_config(other)
  keys = sorted(k for k in set(mine) | set(theirs)
                if any(k == a or (a.endswith('.') and k.startswith(a)) for a in ARCHITECTURE))
  differ = [f'{k}: {theirs.get(k)} there, {mine.get(k)} here' for k in keys
            if mine.get(k) != theirs.get(k)]
  if differ:
    raise ValueError(f'train.init_from={where} trained another hypernetwork:\n  '
                     + '\n  '.join(differ))


def _run_params(config, workdir: str, step: int, shapes: dict) -> dict:
  """The flat hypernetwork params a finished run of this objective ended with: those it
  trained (its checkpoint), over those it started from (its own init_from, again)."""
  directory = epath.Path(workdir) / 'checkpoints'
  if not directory.exists():
    raise FileNotFoundError(f'train.init_from={workdir}: no training run there (no '
                            'checkpoints/).')
  step, saved = checkpoint.restore_config(directory, None if step < 0 else step)
  saved = defaults.fill(ml_collections.ConfigDict(saved))
  if saved.objective != SPEC.name:
    raise ValueError(f'train.init_from={workdir} is a {saved.objective} run, not a '
                     f'{SPEC.name} one.')
  _check_architecture(config, saved, workdir)
  flat = {}
  if saved.train.init_from:
    flat.update(_run_params(config, saved.train.init_from, saved.train.init_step, shapes))
  repl = sharding.replicated(sharding.make_mesh(-1, 1))
  abstract = {p: jax.ShapeDtypeStruct(shapes[p], np.float32, sharding=repl)
              for p in _trained(saved, shapes)}
  _, params = checkpoint.restore_params(directory, traverse_util.unflatten_dict(
      abstract, sep='/'), step)
  flat.update(traverse_util.flatten_dict(jax.device_get(params), sep='/'))
  return flat


def _dummy_inputs(config) -> dict:
  r, embed = config.data.resolution, config.data.id_embed_dim
  return {'context': jnp.zeros((1, 1, r, r, 3)), 'set_mask': jnp.ones((1, 1), bool),
          'region': jnp.array([[[0.0, 0.0, r, r]]]), 'id_embed': jnp.zeros(
              (1, 1, embed if config.basis.identity.kind == 'precomputed' else 0))}


def _check_trigger(models, word: str) -> None:
  """The trigger fits every tokenizer, each word a token it knows."""
  for tokenizer in models.tokenizers:
    ids = tokenizer(word, add_special_tokens=False)['input_ids']
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
      raise ValueError(f'basis.trigger={word!r}: the tokenizer has no token for some of it '
                       '(a from-scratch model knows only the synthetic task\'s words).')
    if len(ids) + 2 > tokenizer.model_max_length:
      raise ValueError(f'basis.trigger={word!r} is {len(ids)} tokens; with the start and '
                       f'end tokens that exceeds the tokenizer\'s max_length '
                       f'{tokenizer.model_max_length}.')


def build(config, rng) -> Objective:
  basis = config.basis
  if not config.data.set_size:
    raise ValueError(f'{SPEC.name} reads a set of context images per subject: set '
                     'data.set_size (e.g. 4).')
  trainable_pattern(config)  # An unknown stage fails here, naming the stages.
  parts, use_identity, loss_kind = STAGES[basis.stage]
  mix = np.asarray(basis.conditions, np.float32)
  if loss_kind == 'conditions' and (mix.shape != (3,) or (mix < 0).any() or not mix.sum()):
    raise ValueError(f'basis.conditions={tuple(basis.conditions)}: three non-negative '
                     'weights, not all zero.')
  rng_base, rng_net = jax.random.split(rng)
  tower_module, tower = clip_tower(config)
  models, frozen = base_models(config, rng_base,
                               lambda targets: id_base.build(config, targets, tower_module))
  net, word = models.hypernet, trigger(config)
  _check_trigger(models, word)
  init = init_variables(net, rng_net, _dummy_inputs(config))
  params = traverse_util.flatten_dict(dict(init['params']), sep='/')
  if tower is not None:
    for name in ('encoder', 'base_encoder')[:2 if basis.encoders == 'separate' else 1]:
      params.update(traverse_util.flatten_dict({name: {'tower': tower}}, sep='/'))
  if config.train.init_from:
    shapes = {p: np.shape(v) for p, v in params.items()}
    loaded = _run_params(config, config.train.init_from, config.train.init_step, shapes)
    params.update({p: jnp.asarray(v) for p, v in loaded.items()})
  trained = set(_trained(config, params))
  if not trained:
    raise ValueError(f'basis.trainable={trainable_pattern(config)!r} matches no param of '
                     'the hypernetwork.')
  trainable = traverse_util.unflatten_dict({p: params[p] for p in trained}, sep='/')
  frozen['hypernet'] = {'params': traverse_util.unflatten_dict(
      {p: v for p, v in params.items() if p not in trained}, sep='/')}
  mid_parts = net.parameterization.mid_parts()

  def variables(trainable, frozen):
    held = traverse_util.flatten_dict(frozen['hypernet']['params'], sep='/')
    held.update(traverse_util.flatten_dict(trainable, sep='/'))
    return {'params': traverse_util.unflatten_dict(held, sep='/')}

  def predict(trainable, frozen, inputs):
    return net.apply(variables(trainable, frozen), inputs, parts=parts,
                     use_identity=use_identity)

  def lora(trainable, frozen, inputs):
    tree = predict(trainable, frozen, inputs)
    scales = inputs.get('part_scales')
    return tree if scales is None else id_base.scale_parts(tree, mid_parts, scales)

  uncond_ids = [jnp.asarray(i[0]) for i in tokenize(models, [''])]
  extra = time_ids(models.unet, config.data.resolution)
  schedule = models.schedule

  def loss_fn(trainable, frozen, batch, rng):
    params = frozen_base(trainable, frozen)
    tree = predict(trainable, frozen, batch)
    b = batch['target'].shape[0]
    rng_c, rng_drop, rng_t, rng_noise, rng_vae = jax.random.split(rng, 5)
    cond = (jax.random.choice(rng_c, 3, (b,), p=jnp.asarray(mix / mix.sum()))
            if loss_kind == 'conditions' else jnp.zeros((b,), jnp.int32))
    table = lambda column: jnp.asarray([c[column] if c[column] is not None else (0, 0)
                                        for c in CONDITIONS], jnp.float32)[cond]
    with_word = jnp.asarray([c[0] for c in CONDITIONS])[cond]
    if basis.stage == 'base':  # The Base-LoRA knows no identity: no trigger.
      with_word = jnp.zeros_like(with_word)
    drop = jax.random.bernoulli(rng_drop, config.model.prompt_dropout, (b,))
    ids = [jnp.where(drop[:, None], u[None], jnp.where(with_word[:, None], w, p))
           for u, w, p in zip(uncond_ids, batch['input_ids'], batch['plain_ids'])]
    x0 = latents(models, frozen.get('vae'), batch['target'], rng_vae)
    t = diffusion.random_timesteps(rng_t, schedule, b)
    noise = jax.random.normal(rng_noise, x0.shape, x0.dtype)
    xt = diffusion.add_noise(schedule, x0, noise, t)

    def unet(scales):
      scaled = id_base.scale_parts(tree, mid_parts, {'id': scales[:, 0], 'base': scales[:, 1]})
      cond_kwargs = encode_prompts(models.text_towers, params, ids, scaled)
      return models.unet.apply({'params': params['unet']}, xt, t, lora=scaled,
                               **cond_kwargs, **extra).astype(jnp.float32)

    pred = unet(table(1))
    target = diffusion.training_target(schedule, x0, noise, t).astype(jnp.float32)
    if loss_kind == 'conditions':
      teacher = jax.lax.stop_gradient(unet(table(2)))
      target = jnp.where((cond == 0)[:, None, None, None], target, teacher)
    losses = diffusion.diffusion_loss(pred, target, t, schedule, config.model.min_snr_gamma)
    held = variables(trainable, frozen)['params']
    metrics = {'diffusion_loss': losses.mean(), 'gamma_id': held['gamma_id'],
               'gamma_base': held['gamma_base']}
    if loss_kind == 'conditions':
      for c in range(3):  # Each condition's mean loss (0 where none was drawn).
        hit = (cond == c).astype(jnp.float32)
        metrics[f'condition_{c}_loss'] = (losses * hit).sum() / jnp.maximum(hit.sum(), 1)
    return losses.mean(), metrics

  token_cache = {}

  def ids_of(prompts):
    missing = sorted(set(prompts) - set(token_cache))
    if missing:
      token_cache.update(zip(missing, zip(*tokenize(models, missing))))
    return tuple(np.stack(ids) for ids in zip(*(token_cache[p] for p in prompts)))

  def prepare(batch):
    """Tokenizes each prompt with and without the trigger; keeps the set's arrays."""
    missing = [k for k in subjects.LORA_INPUTS if k not in batch]
    if missing:
      raise ValueError(f'The batch has no {", ".join(missing)}: {SPEC.name} needs sets '
                       '(data.set_size).')
    empty = ~np.asarray(batch['set_mask']).any(axis=1) & np.asarray(batch.get(
        'valid', True))
    if empty.any():
      ids = np.asarray(batch['id'])[empty].tolist()
      raise ValueError(f'A set with zero images: examples {ids}.')
    prompts = [p.decode() if isinstance(p, bytes) else str(p) for p in batch['prompt']]
    out = {'input_ids': ids_of([subjects.with_trigger(p, word) for p in prompts]),
           'plain_ids': ids_of([subjects.without_trigger(p, word) for p in prompts]),
           'target': np.asarray(batch['target'], np.float32)}
    out.update({k: np.asarray(batch[k]) for k in subjects.LORA_INPUTS})
    return out

  embed_dim = (config.data.id_embed_dim if basis.identity.kind == 'precomputed'
               and use_identity else None)

  def read_inputs(paths, resolution, as_set=False):
    return subjects.read_context_files(paths, resolution, as_set, embed_dim)

  return Objective(SPEC, models, trainable, frozen, loss_fn, prepare, lora, frozen_base,
                   read_inputs=read_inputs)


SPEC = Spec('hyperlora_basis', build, lora_kind='predicted', lora_inputs=subjects.LORA_INPUTS,
            lora_parts=id_base.PARTS, starts_itself=True)
