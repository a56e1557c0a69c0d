r"""Sampling: context images + prompts -> images, with the LoRA a run predicts.

  python -m hyperlora_jax.sample --workdir=RUN --context=item.png \
      --prompt="a figure on the left, pink background, wearing S*" --out=DIR
  python -m hyperlora_jax.sample --pretrained=SD_FOLDER --prompt="a cat" --out=DIR

Every (context, prompt) pair becomes one image <out>/<context>_<prompt #>.png;
grid.png shows one row per context image: the context, then each prompt.
--save_lora also writes each context's predicted LoRA as a diffusers file.

`generate` is the library entry: one jit-compiled call runs the hypernetwork,
the text tower, the whole sampler loop (a lax.scan) and the VAE decoder. Each
image of a batch gets its own predicted LoRA (hyperlora runs), the run's
shared LoRA (unet_lora runs) or none, in both CFG branches.
"""
import functools
import os
import re
import sys
from typing import Any, NamedTuple, Optional, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image, ImageDraw

from hyperlora_jax import diffusion
from hyperlora_jax import lora as lora_lib
from hyperlora_jax.models import clip, vae

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp')
# Rank of each LoRA-tree leaf without a batch axis: one more means per sample.
_SHARED_NDIM = {'down': 2, 'up': 2, 'mid': 1, 'out': 1, 'scale': 0}


class _Static(NamedTuple):
  """Everything the compiled sampler specializes on (hashable: jit static)."""
  unet: Any
  text: Any
  vae: Any
  hypernet: Any
  latent_shape: tuple
  num_steps: int
  sampler: str
  guided: bool


def hypernet_variables(objective, params) -> dict:
  """The hypernetwork's variables: trained params plus frozen collections and
  a frozen encoder, assembled as the hyperlora objective's loss does."""
  frozen = objective.frozen['hypernet']
  return {**{k: v for k, v in frozen.items() if k != 'params'},
          'params': {**params, **frozen.get('params', {})}}


def _base_params(config, objective, params):
  """(unet, text) params: the trained ones of a unet_full run, else frozen."""
  if config.objective == 'unet_full':
    return params['unet'], params['text']
  return objective.frozen['unet'], objective.frozen['text']


def _shared_lora(config, params) -> dict:
  """A unet_lora run's trainable params with the scale alpha / rank."""
  scale = config.lora.alpha / config.lora.rank
  return {p: dict(f, scale=scale) for p, f in params.items()}


def predict_lora(config, objective, params, context=None) -> dict:
  """The LoRA tree a run applies: per sample (hyperlora, from `context`
  [B, H, W, 3] in [-1, 1]) or shared (unet_lora). unet_full runs have none."""
  if config.objective == 'hyperlora':
    if context is None:
      raise ValueError('A hyperlora run predicts its LoRA from context images; '
                       'none were given.')
    return _predict(objective.models.hypernet,
                    hypernet_variables(objective, params), jnp.asarray(context))
  if config.objective == 'unet_lora':
    return _shared_lora(config, params)
  raise ValueError(f'A {config.objective} run has no LoRA.')


@functools.partial(jax.jit, static_argnums=0)
def _predict(hypernet, variables, context):
  return hypernet.apply(variables, context)


def plain_loras(tree) -> list:
  """Plain (down, up, scale 1) shared trees, one per sample of a per-sample
  tree or one for a shared tree: what LoRA files hold (lora.to_plain folds
  LiDB, basis and VeRA factors; the rank is then down.shape[0])."""
  plain = jax.tree.map(np.asarray, {p: lora_lib.to_plain(f) for p, f in tree.items()})
  # Shared bases with per-sample coefficients (basis, VeRA) fold into a
  # per-sample down or up only: the other factor stays shared.
  sizes = {v.shape[0] for f in plain.values() for v in f.values() if v.ndim == 3}
  if not sizes:
    return [plain]
  return [{p: {k: v[i] if v.ndim == 3 else v for k, v in f.items()}
           for p, f in plain.items()} for i in range(sizes.pop())]


def _scaled(tree, gamma):
  return {p: dict(f, scale=jnp.asarray(f.get('scale', 1.0)) * gamma)
          for p, f in tree.items()}


def _doubled(tree):
  """The per-sample leaves repeated for the (uncond, cond) CFG batch."""
  return {p: {k: jnp.concatenate([v, v]) if v.ndim > _SHARED_NDIM[k] else v
              for k, v in f.items()} for p, f in tree.items()}


@functools.partial(jax.jit, static_argnums=0)
def _sample(static: _Static, weights, schedule, ids, context, seed, image_ids,
            guidance, lora_scale):
  lora = weights['lora']
  if static.hypernet is not None:
    lora = static.hypernet.apply(weights['hypernet'], context)
  if lora is not None:
    lora = _scaled(lora, lora_scale)
    if static.guided:
      lora = _doubled(lora)
  tokens = static.text.apply({'params': weights['text']}, ids).last_hidden_state
  unet = lambda x, t: static.unet.apply(
      {'params': weights['unet']}, x, t, tokens, lora=lora)
  # Noise from (seed, image id): an image does not depend on its batch.
  key = jax.random.key(seed)
  noise = jax.vmap(lambda i: jax.random.normal(
      jax.random.fold_in(key, i), static.latent_shape))(image_ids)
  x = diffusion.sample(unet, schedule, noise, static.num_steps, static.sampler,
                       guidance if static.guided else None)
  if static.vae is not None:
    x = vae.decode_latents(static.vae, weights['vae'], x)
  return jnp.clip(x.astype(jnp.float32), -1.0, 1.0)


def _latent_shape(objective, resolution: int) -> tuple:
  models = objective.models
  channels = models.unet_config['in_channels']
  if models.vae is None:
    return (resolution, resolution, channels)
  factor = 2 ** (len(models.vae.block_out_channels) - 1)
  if resolution % factor:
    raise ValueError(f'Resolution {resolution} is not a multiple of the VAE '
                     f'downsampling factor {factor}.')
  return (resolution // factor, resolution // factor, channels)


def generate(config, objective, params, context, prompts, *, num_steps=25,
             guidance=3.0, sampler='ddim', seed=0, lora_scale=1.0,
             use_lora=True, image_ids=None, resolution=None) -> jax.Array:
  """Images [B, H, W, 3] in [-1, 1] from a run's models and params.

  Args:
    config: the run's config (its objective and lora sections matter here).
    objective: `objectives.build`'s Objective (models and frozen params).
    params: the run's trainable params.
    context: [B, H, W, 3] in [-1, 1], one per image (hyperlora with LoRA;
      ignored otherwise, may be None).
    prompts: B strings (or one, for every image).
    num_steps, sampler: the diffusion sampler ('ddim' | 'dpmpp_2m').
    guidance: classifier-free guidance scale, the empty prompt being the
      unconditional one; None or 1 samples the conditional model alone.
    seed: noise seed; image i's noise comes from (seed, image_ids[i]).
    lora_scale: multiplies every LoRA delta (0 = the base model).
    use_lora: False samples the base model (or a unet_full run's own UNet).
    image_ids: [B] ints (default 0..B-1), e.g. dataset indices so that an
      example gets the same noise whatever batch it is generated in.
    resolution: output side (default config.data.resolution).
  """
  models = objective.models
  if isinstance(prompts, str):
    prompts = [prompts] * (len(context) if context is not None else 1)
  prompts = list(prompts)
  hyper = use_lora and config.objective == 'hyperlora'
  if hyper and (context is None or len(context) != len(prompts)):
    raise ValueError(f'{len(prompts)} prompts need as many context images; got '
                     f'{"none" if context is None else len(context)}.')
  unet_params, text_params = _base_params(config, objective, params)
  weights = dict(unet=unet_params, text=text_params,
                 vae=objective.frozen.get('vae'),
                 hypernet=hypernet_variables(objective, params) if hyper else None,
                 lora=_shared_lora(config, params)
                 if use_lora and config.objective == 'unet_lora' else None)
  guided = guidance is not None and guidance != 1.0
  ids = clip.tokenize(models.tokenizer, prompts, models.max_length)
  if guided:
    uncond = clip.tokenize(models.tokenizer, [''], models.max_length)
    ids = np.concatenate([np.repeat(uncond, len(prompts), 0), ids])
  static = _Static(models.unet, models.text, models.vae,
                   models.hypernet if hyper else None,
                   _latent_shape(objective, resolution or config.data.resolution),
                   num_steps, sampler, guided)
  if image_ids is None:
    image_ids = np.arange(len(prompts))
  return _sample(static, weights, models.schedule, jnp.asarray(ids),
                 jnp.asarray(context) if hyper else None,
                 jnp.asarray(seed, jnp.uint32),
                 jnp.asarray(image_ids, jnp.uint32),
                 jnp.asarray(guidance or 1.0, jnp.float32),
                 jnp.asarray(lora_scale, jnp.float32))


# ---------------------------------------------------------------- images


def to_uint8(images) -> np.ndarray:
  return np.asarray(np.round((np.asarray(images) + 1) * 127.5).clip(0, 255),
                    np.uint8)


def image_files(path: str) -> list:
  """The image file, or the folder's images (sorted), each checked readable."""
  if os.path.isdir(path):
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
      raise FileNotFoundError(f'No images ({", ".join(IMAGE_EXTENSIONS)}) in '
                              f'the folder {path}.')
  elif os.path.exists(path):
    files = [path]
  else:
    raise FileNotFoundError(f'No such context image or folder: {path}')
  for f in files:
    try:
      with Image.open(f) as image:
        image.verify()
    except (OSError, SyntaxError) as e:  # What PIL raises for bad files.
      raise ValueError(f'Cannot read the image {f}: {e}') from e
  return files


def load_images(path: str, resolution: int):
  """(images [N, R, R, 3] in [-1, 1], names) from an image file or a folder,
  preprocessed like the training data (shorter side to R, center crop)."""
  # The data pipeline's own preprocessing, so a context matches training's.
  from hyperlora_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  files = image_files(path)
  images = []
  for f in files:
    with open(f, 'rb') as fh:
      images.append(pipeline._fit(fh.read(), resolution))  # pylint: disable=protected-access
  names = [os.path.splitext(os.path.basename(f))[0] for f in files]
  return np.stack(images).astype(np.float32) / 127.5 - 1.0, names


def grid(cells, labels: Sequence[str] = (), min_cell: int = 96) -> Image.Image:
  """One picture from cells [rows, cols, H, W, 3] in [-1, 1] (or uint8),
  each enlarged (nearest) to at least `min_cell` pixels, under column labels."""
  cells = np.asarray(cells)
  if cells.dtype != np.uint8:
    cells = to_uint8(cells)
  rows, cols, h, w, _ = cells.shape
  k = max(1, -(-min_cell // max(h, w)))
  cells = cells.repeat(k, axis=2).repeat(k, axis=3)
  h, w, top, pad = h * k, w * k, 14 if labels else 0, 2
  canvas = Image.new('RGB', (cols * (w + pad) + pad, top + rows * (h + pad) + pad),
                     'white')
  draw = ImageDraw.Draw(canvas)
  for j, label in enumerate(labels):
    draw.text((pad + j * (w + pad), 1), label[:w // 6], fill='black')
  for i in range(rows):
    for j in range(cols):
      canvas.paste(Image.fromarray(cells[i, j]),
                   (pad + j * (w + pad), top + pad + i * (h + pad)))
  return canvas


# ---------------------------------------------------------------- CLI


def pretrained_run(folder: str, resolution: Optional[int] = None):
  """(config, objective, params) of a diffusers folder's base model alone."""
  from hyperlora_jax import objectives  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(dict(
      objective='unet_full', seed=0, data=dict(resolution=resolution or 0),
      model=dict(pretrained=folder, targets='cross_attn'),
      train=dict(compute_dtype='float32')))
  objective = objectives.build(config, jax.random.key(0))
  if not resolution:
    size = objective.models.unet_config.get('sample_size')
    if not size:
      raise ValueError(f'{folder}/unet/config.json sets no sample_size: give '
                       '--resolution.')
    vae_module = objective.models.vae
    factor = 2 ** (len(vae_module.block_out_channels) - 1) if vae_module else 1
    config.data.resolution = size * factor
  return config, objective._replace(trainable=None), objective.trainable


def main_with_errors(main):
  """Runs a CLI main; a user error (missing file, bad value) ends the program
  with its one-line message instead of a traceback."""
  def wrapped(argv):
    try:
      main(argv)
    except (FileNotFoundError, ValueError) as e:
      sys.exit(f'Error: {e}')
  return wrapped


def _flags():
  flags.DEFINE_string('workdir', None, 'A training run (config.json, checkpoints/).')
  flags.DEFINE_string('pretrained', None, 'A diffusers folder: the base model, no LoRA.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).')
  flags.DEFINE_string('context', None, 'Context image or folder of images.')
  flags.DEFINE_multi_string('prompt', None, 'Prompt(s); repeat for several.')
  flags.DEFINE_integer('num_steps', 25, 'Sampler steps.')
  flags.DEFINE_float('guidance', 3.0, 'Classifier-free guidance scale.')
  flags.DEFINE_integer('seed', 0, 'Noise seed.')
  flags.DEFINE_enum('sampler', 'ddim', diffusion.SAMPLERS, 'Sampler.')
  flags.DEFINE_float('lora_scale', 1.0, 'Multiplies the LoRA delta.')
  flags.DEFINE_integer('resolution', None, 'Image side (default: the run\'s).')
  flags.DEFINE_integer('batch_size', 8, 'Images per compiled call.')
  flags.DEFINE_bool('save_lora', False, 'Also write each predicted LoRA '
                    '(diffusers/peft format) to <out>/lora_<context>.safetensors.')
  flags.DEFINE_string('out', None, 'Output folder.')
  flags.mark_flags_as_required(['prompt', 'out'])


def _slug(text: str) -> str:
  return re.sub(r'[^A-Za-z0-9]+', '_', text).strip('_')[:40]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if bool(f.workdir) == bool(f.pretrained):
    raise ValueError('Give exactly one of --workdir (a training run) and '
                     '--pretrained (a diffusers folder).')
  if f.pretrained and (f.context or f.save_lora):
    raise ValueError('A --pretrained base model has no LoRA: --context and '
                     '--save_lora need a hyperlora --workdir.')
  if f.context:
    image_files(f.context)  # Fails before the slow restore.
  if f.workdir:
    from hyperlora_jax import train  # pylint: disable=g-import-not-at-top
    config, objective, params = train.restore_run(f.workdir, f.step)
  else:
    config, objective, params = pretrained_run(f.pretrained, f.resolution)
  resolution = f.resolution or config.data.resolution
  if (config.objective == 'hyperlora') != bool(f.context):
    raise ValueError(
        'A hyperlora run needs --context.' if config.objective == 'hyperlora'
        else f'--context is only for hyperlora runs; this is a '
        f'{config.objective} run.')
  if f.save_lora and config.objective == 'unet_full':
    raise ValueError('--save_lora: a unet_full run has no LoRA.')
  if f.context:
    contexts, names = load_images(f.context, resolution)
  else:
    contexts, names = None, ['image']
  pairs = [(c, p) for c in range(len(names)) for p in range(len(f.prompt))]
  images = []
  for start in range(0, len(pairs), f.batch_size):
    chunk = pairs[start:start + f.batch_size]
    images.append(generate(
        config, objective, params,
        None if contexts is None else contexts[[c for c, _ in chunk]],
        [f.prompt[p] for _, p in chunk], num_steps=f.num_steps,
        guidance=f.guidance, sampler=f.sampler, seed=f.seed,
        lora_scale=f.lora_scale, image_ids=np.arange(start, start + len(chunk)),
        resolution=resolution))
  images = to_uint8(np.concatenate(images)).reshape(
      len(names), len(f.prompt), resolution, resolution, 3)
  os.makedirs(f.out, exist_ok=True)
  for c, name in enumerate(names):
    for p, prompt in enumerate(f.prompt):
      Image.fromarray(images[c, p]).save(
          os.path.join(f.out, f'{name}_{p}_{_slug(prompt)}.png'))
  cells, labels = images, list(f.prompt)
  if contexts is not None:
    cells = np.concatenate([to_uint8(contexts)[:, None], images], axis=1)
    labels = ['context'] + labels
  grid(cells, labels).save(os.path.join(f.out, 'grid.png'))
  if f.save_lora:
    from hyperlora_jax.convert import lora_files  # pylint: disable=g-import-not-at-top
    loras = plain_loras(predict_lora(config, objective, params, contexts))
    for name, tree in zip(names, loras):
      lora_files.save_diffusers_lora(
          tree, os.path.join(f.out, f'lora_{name}.safetensors'),
          metadata={'hyperlora_jax.source': f.workdir})
  print(f'Wrote {images.shape[0] * images.shape[1]} images and grid.png to '
        f'{f.out}')


if __name__ == '__main__':
  _flags()
  app.run(main_with_errors(main))
