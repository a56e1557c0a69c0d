r"""Sampling: context images + prompts -> images, with the LoRA a run predicts.

  python -m hyperlora_jax.sample --workdir=RUN --context=item.png \
      --prompt="a figure on the left, pink background, wearing S*" --out=DIR
  python -m hyperlora_jax.sample --pretrained=SD_FOLDER --prompt="a cat" --out=DIR
  python -m hyperlora_jax.sample --workdir=RUN --context=item.png --prompt=... \
      --controlnet=CONTROLNET_FOLDER --condition=pose.png --out=DIR   # pose guidance

Every (context, prompt) pair becomes one image <out>/<context>_<prompt #>.png;
grid.png shows one row per context image: the context, then each prompt.
--save_lora also writes each context's predicted LoRA as a diffusers file.

`generate(run, context, prompts)` is the library entry: one jit-compiled call
runs the run's LoRA (its objective's ``lora``: the hypernetwork of a hyperlora
run), the text tower, the whole sampler loop (a lax.scan) and the VAE decoder.
Each image of a batch gets its own predicted LoRA, the run's shared LoRA or
none, in both CFG branches; and, where the run has them (its objective's
``unet_inputs``: a ControlNet, an IP-Adapter, its own or added), its own
ControlNet residuals from its condition image (`generate`'s ``inputs``) at every
step and its own image tokens, in both branches too.
"""
import functools
import os
import re
from typing import Any, Mapping, NamedTuple

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from hyperlora_jax import cli
from hyperlora_jax import diffusion
from hyperlora_jax import files
from hyperlora_jax import lora as lora_lib
from hyperlora_jax import objectives
from hyperlora_jax import runs
from hyperlora_jax.convert import lora_files
from hyperlora_jax.data import images as image_io
from hyperlora_jax.models import vae


class _Static(NamedTuple):
  """Everything the compiled sampler specializes on (hashable: jit static)."""
  unet: Any
  text_towers: tuple
  vae: Any
  zero_uncond: bool  # SDXL: the empty prompt's embeddings are zeros.
  lora: Any  # the objective's (trainable, frozen, inputs) -> tree, or None: no LoRA
  base: Any  # the objective's (trainable, frozen) -> {'unet', 'text'[, 'text2']}
  unet_inputs: Any  # the objective's (trainable, frozen, inputs) -> UNetInputs, or None
  unet_input_keys: tuple
  latent_shape: tuple
  resolution: int
  num_steps: int
  sampler: str
  guided: bool


def given_lora(trainable, frozen, inputs):
  """The ``lora`` of a `generate` call given its LoRA tree (``inputs['lora']``)."""
  del trainable, frozen
  return inputs['lora']


def _scaled(tree, gamma):
  return {p: dict(f, scale=jnp.asarray(f.get('scale', 1.0)) * gamma)
          for p, f in tree.items()}


@functools.partial(jax.jit, static_argnums=0)
def _sample(static: _Static, params, frozen, schedule, ids, inputs, seed, image_ids,
            guidance, lora_scale):
  base = static.base(params, frozen)
  lora = None
  if static.lora is not None:
    lora = _scaled(static.lora(params, frozen, inputs), lora_scale)
    if static.guided:  # The per-sample factors for the [uncond; cond] batch.
      lora = lora_lib.tile_samples(lora, 2)
  # ids: per text tower, [uncond; cond] prompts when guided. The LoRA tree's text-tower
  # layers adapt the text towers, its UNet layers the UNet.
  cond = objectives.encode_prompts(static.text_towers, base, ids, lora)
  if static.guided and static.zero_uncond:
    n = ids[0].shape[0] // 2
    cond = jax.tree.map(lambda c: c.at[:n].set(0), cond)
  extra = objectives.time_ids(static.unet, static.resolution)
  more = None
  if static.unet_inputs is not None:
    per_sample = {k: inputs[k] for k in static.unet_input_keys}
    more = static.unet_inputs(params, frozen, objectives.tile(per_sample, 2)
                              if static.guided else per_sample)
  unet = objectives.denoiser(static.unet, base['unet'], lora, dict(cond, **extra), more)
  # Noise from (seed, image id): an image does not depend on its batch.
  key = jax.random.key(seed)
  noise = jax.vmap(lambda i: jax.random.normal(
      jax.random.fold_in(key, i), static.latent_shape))(image_ids)
  x = diffusion.sample(unet, schedule, noise, static.num_steps, static.sampler,
                       guidance if static.guided else None)
  if static.vae is not None:
    x = vae.decode_latents(static.vae, frozen['vae'], x)
  return jnp.clip(x.astype(jnp.float32), -1.0, 1.0)


def _latent_shape(models, resolution: int) -> tuple:
  factor = runs.latent_factor(models)
  if resolution % factor:
    raise ValueError(f'Resolution {resolution} is not a multiple of the VAE '
                     f'downsampling factor {factor}.')
  return (resolution // factor, resolution // factor, models.unet_config['in_channels'])


def generate(run: runs.Run, context, prompts, *, num_steps=25, guidance=3.0,
             sampler='ddim', seed=0, lora_scale=1.0, use_lora=True, image_ids=None,
             resolution=None, inputs=None, lora=None) -> jax.Array:
  """Images [B, H, W, 3] in [-1, 1] from a run (`runs.restore` / `runs.from_pretrained`).

  Args:
    run: the run; its objective says which LoRA it applies.
    context: [B, H, W, 3] in [-1, 1], one per image, for runs whose LoRA is
      predicted from context images (ignored otherwise, may be None); or a mapping
      of the run's LoRA inputs (`Spec.lora_inputs`, B rows each), e.g. the sets of
      `runs.inputs_from_files`.
    prompts: B strings (or one, for every image).
    num_steps, sampler: the diffusion sampler ('ddim' | 'dpmpp_2m').
    guidance: classifier-free guidance scale, the empty prompt being the
      unconditional one; None or 1 samples the conditional model alone.
    seed: noise seed; image i's noise comes from (seed, image_ids[i]).
    lora_scale: multiplies every LoRA delta (0 = the base model); or {part: scale}
      for a LoRA of parts (`Spec.lora_parts`, e.g. {'id': 1, 'base': 0}; parts not
      named keep 1).
    use_lora: False samples the base model (or a unet_full run's own UNet).
    image_ids: [B] ints (default 0..B-1), e.g. dataset indices so that an
      example gets the same noise whatever batch it is generated in.
    resolution: output side (default config.data.resolution).
    inputs: what else the run's LoRA and UNet inputs are computed from, one row per
      image (`Spec.lora_inputs`, `Objective.unet_input_keys`): e.g. a lora_bank run's
      'subject' ints [B], a basis run's context sets ('context' [B, N, H, W, 3] with
      'set_mask'), 'condition' [B, H, W, 3] in [-1, 1] (the pose maps a ControlNet
      reads); `context`, if given, is its 'context' (image tokens come from it too).
    lora: a LoRA tree to apply instead of the run's own (shared, or per sample with
      B rows), e.g. a slider's (`slider`).
  """
  models, spec = run.objective.models, run.spec
  if num_steps < 1:
    raise ValueError(f'num_steps={num_steps}: the sampler needs >= 1 step.')
  given = dict(inputs or {}, **({} if context is None else {'context': context}))
  rows = len(next(iter(given.values()))) if given else None
  if isinstance(prompts, str):
    prompts = [prompts] * (rows or 1)
  prompts = list(prompts)
  use_lora = use_lora and (spec.lora_kind is not None or lora is not None)
  part_scales = None
  if isinstance(lora_scale, Mapping):
    part_scales, lora_scale = runs.check_parts(spec, lora_scale), 1.0
  lora_fn = given_lora if lora is not None else run.objective.lora
  needed = ((spec.lora_inputs if use_lora and lora is None else ())
            + run.objective.unet_input_keys)
  inputs = {}
  for key in dict.fromkeys(needed):
    got = given.get(key)
    if got is None or len(got) != len(prompts):
      what = 'context images' if key == 'context' else f'{key!r} inputs'
      raise ValueError(f'{len(prompts)} prompts need as many {what} for this '
                       f'{spec.name} run; got {"none" if got is None else len(got)}.')
    inputs[key] = jnp.asarray(got)
  if lora is not None:
    inputs['lora'] = lora
  elif use_lora and part_scales is not None:
    inputs['part_scales'] = {k: jnp.full((len(prompts),), v, jnp.float32)
                             for k, v in part_scales.items()}
  guided = guidance is not None and guidance != 1.0
  ids = objectives.tokenize(models, prompts)
  if guided:
    ids = tuple(np.concatenate([np.repeat(u, len(prompts), 0), i])
                for u, i in zip(objectives.tokenize(models, ['']), ids))
  resolution = resolution or run.config.data.resolution
  static = _Static(models.unet, models.text_towers, models.vae, models.zero_uncond,
                   lora_fn if use_lora else None, run.objective.base,
                   run.objective.unet_inputs, run.objective.unet_input_keys,
                   _latent_shape(models, resolution), resolution, num_steps, sampler, guided)
  if image_ids is None:
    image_ids = np.arange(len(prompts))
  return _sample(static, run.params, run.objective.frozen, models.schedule,
                 tuple(jnp.asarray(i) for i in ids), inputs, jnp.asarray(seed, jnp.uint32),
                 jnp.asarray(image_ids, jnp.uint32),
                 jnp.asarray(guidance or 1.0, jnp.float32),
                 jnp.asarray(lora_scale, jnp.float32))


def parse_lora_scale(text: str):
  """--lora_scale: '0.8' (every delta) or 'id=1,base=0.5' (per part of the LoRA)."""
  try:
    if '=' not in text:
      return float(text)
    return {k.strip(): float(v) for k, v in (p.split('=') for p in text.split(','))}
  except ValueError:
    raise ValueError(f"--lora_scale={text!r}: a number, or part=number pairs such as "
                     "'id=1,base=0.5'.") from None


# ---------------------------------------------------------------- CLI


def _flags():
  flags.DEFINE_string('workdir', None, 'A training run (config.json, checkpoints/).')
  flags.DEFINE_string('pretrained', None, 'A diffusers folder: the base model, no LoRA.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).')
  flags.DEFINE_string('context', None, 'Context image or folder of images.')
  flags.DEFINE_string('condition', None, 'For runs with a ControlNet (their own or '
                      '--controlnet): a condition image (a pose map) for every output, or '
                      'a folder of one per --context image, in name order.')
  flags.DEFINE_string('controlnet', None, 'A diffusers controlnet/ folder to sample the '
                      'run with, frozen (pose guidance; needs --condition).')
  flags.DEFINE_multi_string('prompt', None, 'Prompt(s); repeat for several.')
  flags.DEFINE_integer('num_steps', 25, 'Sampler steps.')
  flags.DEFINE_float('guidance', 3.0, 'Classifier-free guidance scale.')
  flags.DEFINE_integer('seed', 0, 'Noise seed.')
  flags.DEFINE_enum('sampler', 'ddim', diffusion.SAMPLERS, 'Sampler.')
  flags.DEFINE_string('lora_scale', '1.0', "Multiplies the LoRA delta; or per part of a "
                      "LoRA that has parts: 'id=1,base=0' (the ID-LoRA alone).")
  flags.DEFINE_bool('as_set', False, 'The --context images are one subject\'s set: one '
                    'LoRA from all of them (runs that read sets: hyperlora_basis).')
  flags.DEFINE_integer('resolution', None, 'Image side (default: the run\'s).')
  flags.DEFINE_integer('batch_size', 8, 'Images per compiled call.')
  flags.DEFINE_bool('save_lora', False, 'Also write each predicted LoRA '
                    '(diffusers/peft format) to <out>/lora_<context>.safetensors.')
  flags.DEFINE_string('out', None, 'Output folder.')
  cli.define_compilation_cache_flag()
  flags.mark_flags_as_required(['prompt', 'out'])


def _slug(text: str) -> str:
  return re.sub(r'[^A-Za-z0-9]+', '_', text).strip('_')[:40]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  cli.check_flags(positive=('num_steps', 'batch_size', 'resolution'),
                  non_negative=('step',))
  cli.check_output(f.out)
  cli.use_compilation_cache(f.compilation_cache)
  if bool(f.workdir) == bool(f.pretrained):
    raise ValueError('Give exactly one of --workdir (a training run) and '
                     '--pretrained (a diffusers folder).')
  if f.pretrained and (f.context or f.save_lora):
    raise ValueError('A --pretrained base model has no LoRA: --context and '
                     '--save_lora need a hyperlora --workdir.')
  lora_scale = parse_lora_scale(f.lora_scale)
  paths = image_io.image_files(f.context) if f.context else []  # Fails before the restore.
  attach = {'controlnet': {'folder': f.controlnet}} if f.controlnet else None
  run = (runs.restore(f.workdir, f.step, attach=attach) if f.workdir
         else runs.from_pretrained(f.pretrained, f.resolution, attach=attach))
  resolution = f.resolution or run.config.data.resolution
  needs_condition = 'condition' in run.objective.unet_input_keys
  if needs_condition != bool(f.condition):
    raise ValueError(f'A {run.spec.name} run with a ControlNet needs --condition.'
                     if needs_condition else '--condition is for runs with a ControlNet '
                     '(their own, or --controlnet).')
  needs_context = 'context' in run.spec.lora_inputs + run.objective.unet_input_keys
  if needs_context != bool(f.context):
    raise ValueError(
        f'A {run.spec.name} run needs --context.' if needs_context
        else f'--context is only for runs that predict their LoRA from context images; '
        f'this is a {run.spec.name} run.')
  if f.save_lora and run.spec.lora_kind is None:
    raise ValueError(f'--save_lora: a {run.spec.name} run has no LoRA.')
  if isinstance(lora_scale, dict):
    runs.check_parts(run.spec, lora_scale)
  if f.context:
    contexts, names = runs.inputs_from_files(run, paths, f.as_set, resolution)
  else:
    contexts, names = None, ['image']
  conditions = None
  if f.condition:
    conditions = image_io.load_images(f.condition, resolution)[0]
    if len(conditions) == 1:
      conditions = np.repeat(conditions, len(names), 0)
    elif len(conditions) != len(names):
      raise ValueError(f'--condition has {len(conditions)} images for {len(names)} context '
                       'images: give one, or one per context image.')
  pairs = [(c, p) for c in range(len(names)) for p in range(len(f.prompt))]
  images = []
  for start in range(0, len(pairs), f.batch_size):
    chunk = pairs[start:start + f.batch_size]
    rows = [c for c, _ in chunk]
    inputs = {} if contexts is None else {k: v[rows] for k, v in contexts.items()}
    if conditions is not None:
      inputs['condition'] = conditions[rows]
    images.append(generate(
        run, None, [f.prompt[p] for _, p in chunk], inputs=inputs, num_steps=f.num_steps,
        guidance=f.guidance, sampler=f.sampler, seed=f.seed,
        lora_scale=lora_scale, image_ids=np.arange(start, start + len(chunk)),
        resolution=resolution))
  images = image_io.to_uint8(np.concatenate(images)).reshape(
      len(names), len(f.prompt), resolution, resolution, 3)
  for c, name in enumerate(names):
    for p, prompt in enumerate(f.prompt):
      files.save_image(Image.fromarray(images[c, p]),
                       os.path.join(f.out, f'{name}_{p}_{_slug(prompt)}.png'))
  cells, labels = images, list(f.prompt)
  if contexts is not None:
    shown = contexts['context'] if contexts['context'].ndim == 4 else contexts['context'][:, 0]
    cells = np.concatenate([image_io.to_uint8(shown)[:, None], images], axis=1)
    labels = ['context'] + labels
  files.save_image(image_io.grid(cells, labels), os.path.join(f.out, 'grid.png'))
  if f.save_lora:
    loras = runs.plain_loras(runs.lora(
        run, contexts, lora_scale if isinstance(lora_scale, dict) else None))
    for name, tree in zip(names, loras):
      lora_files.save_diffusers_lora(
          tree, os.path.join(f.out, f'lora_{name}.safetensors'),
          metadata={'hyperlora_jax.source': f.workdir})
  print(f'Wrote {images.shape[0] * images.shape[1]} images and grid.png to '
        f'{f.out}')


def run():
  """The console script (`hyperlora-sample`)."""
  _flags()
  cli.run(__name__, cli.main_with_errors(main))


if __name__ == '__main__':
  run()
