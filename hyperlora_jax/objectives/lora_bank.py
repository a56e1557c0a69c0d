"""``lora_bank``: one LoRA per subject, N subjects' factors stacked [N, ...], trained at once.

The trainable params are the raw numbers of config.bank.param's parameterization for N
subjects, one row each: plain rank-r factors, or LiDB's trained cores over the frozen aux
matrices; the very numbers a hypernetwork of that parameterization predicts, turned into
LoRAs by the same code (`models.hypernet.RawLoRA`). ``lora(trainable, frozen, inputs)``
gathers each sample's subject (``inputs['subject']``, an int in [0, N)) into a per-sample
LoRA tree, so one step of the diffusion loss trains every subject of its batch. Up
factors start at zero: every subject starts at the base model. With ``fixed`` (a
per-subject LoRA tree, leading axis N) each subject's LoRA is added to its fixed one, so
the bank is a rank-relaxed fine-tuning of e.g. a hypernetwork's predictions.

`train.fit` trains a bank in one compiled call with every subject in every step
(`subject_batch` draws one image per subject): pre-optimization's target weights
(`preoptimize`), fast fine-tuning (`finetune`) and a LoRA zoo are all that call.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from hyperlora_jax import lora as lora_lib
from hyperlora_jax.models import hypernet, init_variables, vae
from hyperlora_jax.objectives.base import (Models, Objective, Spec, base_models,
                                          diffusion_objective, tokenize)


def build(config, rng) -> Objective:
  rng_base, rng_bank = jax.random.split(rng)
  models, frozen = base_models(config, rng_base)
  return bank(config, models, frozen, rng_bank, config.bank.subjects_per_step)


def raw_lora(param_config, targets) -> hypernet.RawLoRA:
  """The module that turns a bank's raw rows into LoRAs (plain or LiDB only)."""
  lora_lib.raw_fields(param_config)  # Refuses parameterizations without own factors.
  return hypernet.RawLoRA(tuple(targets), lora_lib.parameterization(param_config, targets))


def init_raw(rng, module: hypernet.RawLoRA, num_subjects: int) -> dict:
  """Fresh rows, every subject the same: down numbers N(0, 1) (the parameterization
  scales them by fan-in), up numbers zero, so each LoRA starts at zero, and fitted rows
  differ only by what their subjects' images taught them (what a hypernetwork can
  predict; per-subject random downs would be noise in its weight-space loss)."""
  groups = hypernet.group_targets(module.targets)
  shapes = hypernet.raw_shapes(module.parameterization, module.targets)
  out = {}
  for g, ((dims, _), (count, size)) in enumerate(zip(groups, shapes)):
    down = module.parameterization.down_size(*dims)
    row = jnp.concatenate([jax.random.normal(jax.random.fold_in(rng, g), (count, down)),
                           jnp.zeros((count, size - down))], axis=-1)
    out[f'group_{g}'] = jnp.broadcast_to(row, (num_subjects, count, size))
  return out


def groups(raw: dict) -> list:
  """A bank's rows as the list of raw groups, in target-group order."""
  return [raw[f'group_{g}'] for g in range(len(raw))]


def bank(config, models: Models, frozen: dict, rng, num_subjects: int, fixed=None,
         subject_key: str = 'subject') -> Objective:
  """The lora_bank Objective over an already loaded base (`models`, `frozen`: its
  'unet', 'text'[, 'text2', 'vae'] params), for `num_subjects` subjects; `fixed`: a
  per-subject LoRA tree [num_subjects, ...] each subject's LoRA is added to.
  `subject_key`: the input holding each sample's row (the bank's `Spec.lora_inputs`),
  e.g. 'index' for a bank fine-tuned on a split's first examples, one each."""
  module = raw_lora(config.bank.param, models.targets)
  trainable = init_raw(rng, module, num_subjects)
  shapes = [jnp.zeros((1,) + v.shape[1:]) for v in groups(trainable)]
  frozen = dict(frozen, bank=dict(init_variables(module, rng, shapes)))
  if fixed is not None:
    frozen['fixed'] = {p: lora_lib.to_plain(f) for p, f in fixed.items()}

  def lora(trainable, frozen, inputs):
    subject = inputs[subject_key]
    tree = module.apply(frozen['bank'], [r[subject] for r in groups(trainable)])
    if 'fixed' not in frozen:
      return tree
    return lora_lib.stack({p: {k: v[subject] for k, v in f.items()}
                           for p, f in frozen['fixed'].items()}, tree)

  spec = SPEC if subject_key == 'subject' else dataclasses.replace(
      SPEC, lora_inputs=(subject_key,))
  return diffusion_objective(spec, config, models, trainable, frozen, lora=lora)


def subject_data(models: Models, images, prompts, k: int | None = None) -> dict:
  """What `subject_batch` draws from (numpy): 'target' [N, k, H, W, 3] (subject n's
  images[n], the rest up to k repeating its last; k: at least the most any subject has,
  by default that), 'count' [N], and per text tower 'input_ids' [N, k, L] of prompts[n]
  (one per image). A fixed k keeps the shapes, and so the compiled fit, of every shard."""
  most = max(len(x) for x in images)
  k = k or most
  if k < most:
    raise ValueError(f'k={k} images per subject, fewer than a subject has ({most}).')
  pad = lambda x: np.concatenate([x, np.repeat(x[-1:], k - len(x), axis=0)])
  ids = tokenize(models, [p for ps in prompts for p in list(ps) + [ps[-1]] * (k - len(ps))])
  return {'target': np.stack([pad(np.asarray(x, np.float32)) for x in images]),
          'count': np.array([len(x) for x in images], np.int32),
          'input_ids': tuple(i.reshape((len(images), k) + i.shape[1:]) for i in ids)}


def cache_latents(models: Models, frozen: dict, data: dict) -> dict:
  """`subject_data` with its images replaced by their latents ('latents', the VAE
  posterior's mean), encoded once here, one image at a time, instead of in every step
  (kohya's cache_latents); pixel-space models' data is returned as it is."""
  if models.vae is None:
    return data
  images = jnp.asarray(data['target'])
  latents = _encode_each(models.vae, frozen['vae'], images.reshape((-1,) + images.shape[2:]))
  return {**{k: v for k, v in data.items() if k != 'target'},
          'latents': latents.reshape(images.shape[:2] + latents.shape[1:])}


@functools.partial(jax.jit, static_argnums=0)
def _encode_each(module, params, images):
  return jax.lax.map(lambda image: vae.encode_latents(module, params, image[None])[0], images)


def subject_batch(data, rng, key: str = 'subject') -> dict:
  """One training batch of a bank: one image (or its cached latents) of every subject,
  drawn uniformly among its own (`subject_data`); sample n is subject n (under `key`,
  the bank's subject_key)."""
  n = data['count'].shape[0]
  pick = jnp.floor(jax.random.uniform(rng, (n,)) * data['count']).astype(jnp.int32)
  rows = jnp.arange(n)
  images = 'latents' if 'latents' in data else 'target'
  return {images: data[images][rows, pick], key: rows,
          'input_ids': tuple(i[rows, pick] for i in data['input_ids'])}


SPEC = Spec('lora_bank', build, lora_kind='predicted', lora_inputs=('subject',),
            per_subject=True)
