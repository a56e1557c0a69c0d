"""What a run trains: the latent-diffusion loss through a frozen or trainable base.

``config.objective`` picks one:

* ``hyperlora``: a hypernetwork predicts a per-sample LoRA from the context image; the
  UNet, text tower (and VAE) are frozen; grads reach only the hypernetwork and gamma.
* ``unet_lora``: one shared plain LoRA on the UNet (the single-LoRA baseline, or
  per-image fine-tuning when the data holds one image).
* ``unet_full``: the UNet and the text tower themselves (pretraining the quickstart's
  tiny base model from scratch).

`build` returns an `Objective`: the trainable and frozen param trees, a pure
``loss_fn(trainable, frozen, batch, rng) -> (loss, metrics)`` and a host-side
``prepare`` that turns a pipeline batch into arrays. `train.py` knows nothing else.

config.model
  pretrained      a diffusers folder (unet/, text_encoder/, tokenizer/, scheduler/,
                  vae/): the base model; '' builds ``unet``/``text`` from scratch;
                  None (the SD1.5 configs) must be set on the command line
  unet, text      diffusers / transformers config dicts for from-scratch models
  max_length      token sequence length for a from-scratch tokenizer (40)
  scheduler       keys over SD1.5's scheduler config for from-scratch models, e.g.
                  prediction_type ('epsilon' | 'v_prediction'); a pretrained folder
                  brings its own scheduler/ and this section is not read
  targets         LoRA targets (`lora.TARGET_SETS` names or regexes) ('cross_attn')
  prompt_dropout  probability of training on the empty prompt, for guidance (0.1)
  min_snr_gamma   min-SNR loss weighting (None = off)
config.lora       rank, alpha: the ``unet_lora`` objective's LoRA
config.hypernet   encoder, decoder, param, gamma_init: see `models.hypernet.build`;
                  encoder.pretrained: a CLIP vision folder for kind 'clip';
                  encoder.trainable: False freezes the encoder;
                  encoder.remat: what a trained 'vit'/'clip' encoder keeps per
                  layer for the backward: 'none', 'full' or a
                  jax.checkpoint_policies name (default
                  'dots_with_no_batch_dims_saveable': the projections' outputs;
                  norms, softmax, activations and the attention logits are
                  recomputed, ~4% of a ViT-L layer's forward FLOPs, for ~5x less
                  activation memory); not 'none' also runs the layers as one
                  lax.scan, see `clip.CLIPEncoder`
"""
import tempfile
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from hyperlora_jax import diffusion
from hyperlora_jax import lora as lora_lib
from hyperlora_jax.convert import clip_folders, pipeline
from hyperlora_jax.models import clip, hypernet, unet, vae

OBJECTIVES = ('hyperlora', 'unet_lora', 'unet_full')


class Models(NamedTuple):
  """The modules and host-side pieces that sampling, evaluation and export need."""
  unet: Any
  unet_config: dict
  text: Any
  text_config: dict
  tokenizer: Any
  tokenizer_folder: str
  max_length: int
  schedule: diffusion.Schedule
  scheduler_config: dict
  vae: Optional[Any]
  hypernet: Optional[Any]
  targets: tuple


class Objective(NamedTuple):
  trainable: Any
  frozen: Any
  loss_fn: Callable
  prepare: Callable
  models: Models


def _dtype(config):
  return jnp.dtype(config.train.get('compute_dtype', 'float32'))


def _base(config, rng):
  """(pipeline.Pipeline, tokenizer folder) from a folder or built from scratch."""
  dtype = _dtype(config)
  if config.model.pretrained is None:
    raise ValueError('config.model.pretrained is not set: give the path of a local '
                     'diffusers Stable Diffusion folder (--config.model.pretrained=...).')
  if config.model.pretrained:
    return pipeline.load_pipeline(config.model.pretrained, dtype), \
        f'{config.model.pretrained}/tokenizer'
  from hyperlora_jax.data import synthetic  # from-scratch models speak the synthetic task
  folder = tempfile.mkdtemp(prefix='hyperlora_tokenizer_')
  clip_folders.write_tokenizer(synthetic.vocabulary(), folder, config.model.max_length)
  tokenizer = clip_folders.load_tokenizer(folder)
  unet_config = config.model.unet.to_dict()
  text_config = dict(config.model.text.to_dict(), vocab_size=len(tokenizer),
                     max_position_embeddings=config.model.max_length,
                     eos_token_id=tokenizer.eos_token_id)
  unet_module = unet.from_config(unet_config, dtype)
  text = clip.text_from_config(text_config, dtype)
  rng_unet, rng_text = jax.random.split(rng)
  unet_params = jax.jit(unet_module.init)(rng_unet, *unet_module.dummy_inputs())['params']
  text_params = jax.jit(text.init)(rng_text, *text.dummy_inputs())['params']
  scheduler_config = dict(diffusion.SD15_SCHEDULER_CONFIG, **config.model.get('scheduler', {}))
  return pipeline.Pipeline(unet_module, unet_params, unet_config, text, text_params,
                           text_config, tokenizer,
                           diffusion.schedule_from_config(scheduler_config),
                           scheduler_config), folder


def encode_prompts(models: Models, text_params, ids):
  return models.text.apply({'params': text_params}, ids).last_hidden_state


def _latents(models: Models, vae_params, images, rng):
  """Targets in the space the UNet diffuses: VAE latents, or pixels without a VAE."""
  if models.vae is None:
    return images
  return vae.encode_latents(models.vae, vae_params, images, rng)


def build(config, rng) -> Objective:
  if config.objective not in OBJECTIVES:
    raise ValueError(f'Unknown objective {config.objective!r}; one of {OBJECTIVES}.')
  rng_base, rng_trainable = jax.random.split(rng)
  base, tokenizer_folder = _base(config, rng_base)
  targets = lora_lib.find_targets(base.unet_params, config.model.targets)
  net = tower = None
  if config.objective == 'hyperlora':
    tower_module, tower = _clip_tower(config)
    net = hypernet.build(config.hypernet, targets, tower_module)
  models = Models(base.unet, base.unet_config, base.text, base.text_config, base.tokenizer,
                  tokenizer_folder, clip.model_max_length(base.tokenizer), base.schedule,
                  base.scheduler_config, base.vae, net, targets)
  frozen = {'unet': base.unet_params, 'text': base.text_params}
  if base.vae is not None:
    frozen['vae'] = base.vae_params

  if config.objective == 'unet_full':
    trainable = {'unet': frozen.pop('unet'), 'text': frozen.pop('text')}
    apply_parts = lambda tr, fr, batch: (tr['unet'], tr['text'], None, {})
  elif config.objective == 'unet_lora':
    trainable = init_lora(rng_trainable, targets, config.lora.rank)
    scale = config.lora.alpha / config.lora.rank
    apply_parts = lambda tr, fr, batch: (
        fr['unet'], fr['text'], {p: dict(f, scale=scale) for p, f in tr.items()}, {})
  else:
    variables = jax.jit(net.init)(rng_trainable, jnp.zeros(
        (1, config.data.resolution, config.data.resolution, 3)))
    trainable = dict(variables['params'])
    frozen['hypernet'] = {k: v for k, v in variables.items() if k != 'params'}
    if tower is not None:
      trainable['encoder'] = {'tower': tower}
    if not config.hypernet.encoder.get('trainable', True):
      frozen['hypernet']['params'] = {'encoder': trainable.pop('encoder')}

    def apply_parts(tr, fr, batch):
      params = {**tr, **fr['hypernet'].get('params', {})}
      variables = {**{k: v for k, v in fr['hypernet'].items() if k != 'params'},
                   'params': params}
      tree = net.apply(variables, batch['context'])
      return fr['unet'], fr['text'], tree, {'gamma': params['gamma']}

  uncond_ids = jnp.asarray(clip.tokenize(base.tokenizer, [''], models.max_length)[0])

  def loss_fn(trainable, frozen, batch, rng):
    unet_params, text_params, lora, metrics = apply_parts(trainable, frozen, batch)
    rng_drop, rng_t, rng_noise, rng_vae = jax.random.split(rng, 4)
    ids = batch['input_ids']
    drop = jax.random.bernoulli(rng_drop, config.model.prompt_dropout, ids.shape[:1])
    ids = jnp.where(drop[:, None], uncond_ids[None], ids)
    context = encode_prompts(models, text_params, ids)
    x0 = _latents(models, frozen.get('vae'), batch['target'], rng_vae)
    t = diffusion.random_timesteps(rng_t, models.schedule, x0.shape[0])
    noise = jax.random.normal(rng_noise, x0.shape, x0.dtype)
    pred = models.unet.apply({'params': unet_params}, diffusion.add_noise(
        models.schedule, x0, noise, t), t, context, lora=lora)
    losses = diffusion.diffusion_loss(
        pred.astype(jnp.float32), diffusion.training_target(models.schedule, x0, noise, t),
        t, models.schedule, config.model.get('min_snr_gamma'))
    loss = losses.mean()
    return loss, dict(metrics, diffusion_loss=loss)

  token_cache = {}

  def prepare(batch):
    """Tokenizes the prompts (cached: prompts repeat) and keeps the image arrays."""
    prompts = [p.decode() if isinstance(p, bytes) else str(p) for p in batch['prompt']]
    missing = sorted(set(prompts) - set(token_cache))
    if missing:
      token_cache.update(zip(missing, clip.tokenize(base.tokenizer, missing, models.max_length)))
    out = {'input_ids': np.stack([token_cache[p] for p in prompts]),
           'target': np.asarray(batch['target'], np.float32)}
    if config.objective == 'hyperlora':
      out['context'] = np.asarray(batch['context'], np.float32)
    return out

  return Objective(trainable, frozen, loss_fn, prepare, models)


def init_lora(rng, targets, rank):
  """A shared plain LoRA as in the LoRA paper: random down, zero up (starts at base)."""
  keys = jax.random.split(rng, len(targets))
  return {t.path: {'down': jax.random.normal(k, (rank, t.d_in)) * t.d_in ** -0.5,
                   'up': jnp.zeros((t.d_out, rank))} for k, t in zip(keys, targets)}


def _clip_tower(config):
  """(module, params) of a pretrained CLIP vision tower for 'clip' encoders, else Nones."""
  enc = config.hypernet.encoder
  if enc.kind != 'clip':
    return None, None
  if not enc.pretrained:
    raise ValueError('config.hypernet.encoder.pretrained is not set: the clip encoder '
                     'needs a local transformers CLIP (vision) folder.')
  module, params, _ = clip_folders.load_vision_model(enc.pretrained, _dtype(config))
  return module, params
