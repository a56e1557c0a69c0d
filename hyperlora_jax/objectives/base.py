"""What every objective shares: its types, the base model, and the latent-diffusion loss.

An objective is a `Spec` (what a run of it is, known without building anything) whose
``build(config, rng)`` returns an `Objective`: the trainable and frozen param trees, a
pure ``loss_fn``, a host-side ``prepare``, and the two pure functions through which every
tool uses a run: ``lora(trainable, frozen, inputs)`` (the LoRA tree the run applies, or
None) and ``base(trainable, frozen)`` (the UNet and text-tower params it samples with).
`diffusion_objective` builds all of that from those two functions, so an objective that
trains through the diffusion loss only says what is trained and how it becomes a LoRA.
What else reaches the UNet per sample (a ControlNet's residuals from a condition image,
IP-Adapter's image tokens) is a third pure function, ``unet_inputs(trainable, frozen,
inputs)`` (`conditioning`): the objective's own, and the config's frozen add-ons
(``model.controlnet``, ``model.ip_adapter``), which every objective takes.
The config keys are documented in `hyperlora_jax.defaults`.
"""
import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from hyperlora_jax import diffusion
from hyperlora_jax import lora as lora_lib
from hyperlora_jax.convert import clip_folders, pipeline
from hyperlora_jax.models import clip, init_variables, unet, vae
from hyperlora_jax.objectives.conditioning import combine, denoiser, load_addons


@dataclasses.dataclass(frozen=True)
class Spec:
  """What a run of an objective is, for the tools that use it.

  lora_kind: None (the run applies no LoRA), 'shared' (one LoRA for every sample) or
    'predicted' (one per sample, computed from ``lora_inputs``).
  lora_inputs: the batch keys its LoRA is computed from, e.g. ('context',).
  trains_base: its trained UNet and text tower are a new base model, which a stage
    exports as a diffusers folder for later stages.
  lora_parts: the parts its LoRA is the sum of, each of which sampling and export may
    scale (``inputs['part_scales']`` {part: scale}), e.g. ('id', 'base').
  per_subject: its runs fit one LoRA per subject of the training split, many at once in
    one compiled call (`preoptimize`), instead of the training loop; a run's result is a
    target-weights dataset (`convert.target_weights`).
  part: the add-on it trains ('controlnet', 'ip_adapter': `conditioning.ADDONS`), which
    a stage exports (`Objective.export_part`) for later stages' ``model.<part>``.
  unet_inputs: the batch keys its own extra UNet inputs come from, e.g. ('condition',).
  starts_itself: its ``build`` reads ``train.init_from`` (the run, ``train.init_step``
    its step) and takes the params it matches, the frozen ones too, e.g. a later stage
    of a recipe whose stages train different parts; else the trainer starts the run
    from that run's trainable params, which must be this run's exactly.
  """
  name: str
  build: Callable[..., 'Objective']
  lora_kind: Optional[str] = None
  lora_inputs: tuple = ()
  trains_base: bool = False
  lora_parts: tuple = ()
  per_subject: bool = False
  part: str = ''
  unet_inputs: tuple = ()
  starts_itself: bool = False


class Models(NamedTuple):
  """The modules and host-side pieces that sampling, evaluation and export need."""
  unet: Any
  unet_config: dict
  text: Any
  text_config: dict
  tokenizer: Any
  tokenizer_folder: str
  schedule: diffusion.Schedule
  scheduler_config: dict
  vae: Optional[Any]
  hypernet: Optional[Any]
  targets: tuple
  # SDXL's second text tower (its params are 'text2' beside 'text'); None for SD 1.x/2.x.
  text2: Optional[Any] = None
  text2_config: Optional[dict] = None
  tokenizer2: Optional[Any] = None
  tokenizer2_folder: Optional[str] = None
  # Classifier-free guidance's empty prompt is zeros, not the encoded '' (diffusers'
  # SDXL force_zeros_for_empty_prompt).
  zero_uncond: bool = False
  # The frozen add-ons the config names (`conditioning.Addon`).
  addons: tuple = ()

  @property
  def text_towers(self) -> tuple:
    return (self.text,) if self.text2 is None else (self.text, self.text2)

  @property
  def tokenizers(self) -> tuple:
    return (self.tokenizer,) if self.text2 is None else (self.tokenizer, self.tokenizer2)


class Objective(NamedTuple):
  spec: Spec
  models: Models
  trainable: Any
  frozen: Any
  loss_fn: Callable  # (trainable, frozen, batch, rng) -> (loss, metrics)
  prepare: Callable  # pipeline batch (numpy) -> the arrays loss_fn reads
  lora: Callable  # (trainable, frozen, inputs) -> LoRA tree or None
  base: Callable  # (trainable, frozen) -> {'unet': params, 'text': params}
  # (trainable, frozen) -> the hypernetwork's variables, for objectives that have one.
  hypernet_variables: Optional[Callable] = None
  # (trainable, frozen, inputs) -> `conditioning.UNetInputs`: what else each UNet call
  # takes (the objective's own and the add-ons'), from the batch keys unet_input_keys.
  unet_inputs: Optional[Callable] = None
  unet_input_keys: tuple = ()
  # (trainable, frozen, folder) -> writes the part it trains (`Spec.part`).
  export_part: Optional[Callable] = None
  # (image paths, resolution, as_set) -> (the LoRA inputs, names) read from files, for
  # objectives whose LoRA inputs are more than the images (None: the images alone,
  # `runs.inputs_from_files`).
  read_inputs: Optional[Callable] = None


def compute_dtype(config):
  return jnp.dtype(config.train.compute_dtype)


def latent_factor(models: Models) -> int:
  """Pixels per latent along a side: the VAE's downsampling, 1 without a VAE."""
  if models.vae is None:
    return 1
  return 2 ** (len(models.vae.block_out_channels) - 1)


def load_base(config, rng):
  """(pipeline.Pipeline, its tokenizer folders: one per text tower) from
  config.model.pretrained or from scratch (a closed-vocabulary tokenizer, written once
  into the user's cache)."""
  dtype = compute_dtype(config)
  if config.model.pretrained is None:
    raise ValueError('config.model.pretrained is not set: give the path of a local '
                     'diffusers Stable Diffusion folder (--config.model.pretrained=...).')
  if config.model.pretrained:
    base = pipeline.load_pipeline(config.model.pretrained, dtype)
    folders = [f'{config.model.pretrained}/{p}' for p in ('tokenizer', 'tokenizer_2')]
    return base, tuple(folders[:len(base.tokenizers)])
  from hyperlora_jax.data import synthetic  # from-scratch models speak the synthetic task
  folder = clip_folders.cached_tokenizer_folder(synthetic.vocabulary(), config.model.max_length)
  tokenizer = clip_folders.load_tokenizer(folder)
  unet_config = config.model.unet.to_dict()
  text_config = dict(config.model.text.to_dict(), vocab_size=len(tokenizer),
                     max_position_embeddings=config.model.max_length,
                     eos_token_id=tokenizer.eos_token_id)
  unet_module = unet.from_config(unet_config, dtype)
  text = clip.text_from_config(text_config, dtype)
  rng_unet, rng_text = jax.random.split(rng)
  unet_params = init_variables(unet_module, rng_unet, *unet_module.dummy_inputs())['params']
  text_params = init_variables(text, rng_text, *text.dummy_inputs())['params']
  scheduler_config = dict(diffusion.SD15_SCHEDULER_CONFIG, **config.model.scheduler)
  return pipeline.Pipeline(unet_module, unet_params, unet_config, text, text_params,
                           text_config, tokenizer,
                           diffusion.schedule_from_config(scheduler_config),
                           scheduler_config), (folder,)


def base_models(config, rng, hypernet_fn=None):
  """(Models, frozen params {'unet', 'text'[, 'text2'][, 'vae']}) of the run's base model.

  hypernet_fn: targets -> a hypernetwork module, for objectives that have one.
  """
  base, tokenizer_folders = load_base(config, rng)
  targets = find_targets(base.unet_params, base.text_tower_params, config.model.targets)
  xl = base.text2 is not None
  models = Models(base.unet, base.unet_config, base.text, base.text_config, base.tokenizer,
                  tokenizer_folders[0], base.schedule, base.scheduler_config, base.vae,
                  hypernet_fn and hypernet_fn(targets), targets, base.text2,
                  base.text2_config, base.tokenizer2, tokenizer_folders[1] if xl else None,
                  base.force_zeros_for_empty_prompt)
  frozen = pipeline.param_trees(base, vae='vae')
  addons = load_addons(config, models, frozen, latent_factor(models),
                                    compute_dtype(config))
  return models._replace(addons=addons), frozen


def find_targets(unet_params, text_params, targets) -> tuple:
  """The LoRA targets (`lora.find_targets`: set names or regexes) over the UNet and the
  text tower(s): the UNet's layers first, then each tower's, keyed as a pipeline's LoRA
  tree keys them (``text_model/...``; the second tower's under `pipeline.TEXT2_PREFIX`).
  Sets name one model's layers ('cross_attn', 'self_attn', 'ff': the UNet's; 'text_attn',
  'text_mlp': the towers')."""
  second = [{pipeline.TEXT2_PREFIX.rstrip('/'): p} for p in text_params[1:]]
  found = tuple(t for tree in (unet_params, *text_params[:1], *second)
                for t in lora_lib.find_targets(tree, targets, required=False))
  if not found:
    raise ValueError(f'No Dense layer of the UNet or the text tower matches LoRA targets '
                     f'{targets!r}.')
  return found


BASE_PARTS = ('unet', 'text', 'text2')  # What `base` returns ('text2': SDXL only).


def frozen_base(trainable, frozen):
  """``base`` of the objectives that train no base-model params."""
  del trainable
  return {k: frozen[k] for k in BASE_PARTS if k in frozen}


def tokenize(models: Models, prompts) -> tuple:
  """One [B, L] int32 id array per text tower."""
  return pipeline.tokenize_prompts(models.tokenizers, list(prompts))


def encode_prompts(text_towers, params, ids, lora=None) -> dict:
  """The UNet's text conditioning (keyword arguments of its call) from
  `Models.text_towers`, `base`'s params and `tokenize`'s ids, the LoRA tree's text-tower
  layers applied (`pipeline.encode_prompts`: SD's last hidden state; SDXL's two towers
  and pooled embedding)."""
  texts = (params['text'],) + ((params['text2'],) if 'text2' in params else ())
  return pipeline.encode_prompts(text_towers, texts, ids, lora)


def time_ids(unet_module, resolution: int) -> dict:
  """SDXL's micro-conditioning for square images of `resolution` pixels ({} for SD)."""
  return pipeline.time_ids(unet_module, (resolution, resolution))


@dataclasses.dataclass(frozen=True)
class LoRAPredictor:
  """The base model's UNet output with a LoRA tree (its text-tower layers applied too):
  ``predictor(tree, inputs, params)``, inputs {'x': noised latents [B, h, w, c], 't' [B],
  'input_ids': one [B, L] per tower}, params `frozen_base`'s {'unet', 'text'[, 'text2']}.
  Hashable (a static argument of `merging.ziplora`'s compiled loop); the params are an
  argument, not constants of the program."""
  unet: Any
  text_towers: tuple
  resolution: int

  def __call__(self, tree, inputs, params):
    cond = encode_prompts(self.text_towers, params, inputs['input_ids'], tree)
    return self.unet.apply({'params': params['unet']}, inputs['x'], inputs['t'], lora=tree,
                           **cond, **time_ids(self.unet, self.resolution))


def predictor(models: Models, resolution: int) -> LoRAPredictor:
  return LoRAPredictor(models.unet, models.text_towers, resolution)


def latents(models: Models, vae_params, images, rng):
  """Targets in the space the UNet diffuses: VAE latents, or pixels without a VAE."""
  if models.vae is None:
    return images
  return vae.encode_latents(models.vae, vae_params, images, rng)


def diffusion_objective(spec: Spec, config, models: Models, trainable, frozen, *, lora,
                        base=frozen_base, metrics=lambda trainable: {},
                        hypernet_variables=None, lora_and_loss=None,
                        loss_inputs: tuple = (), unet_inputs=None,
                        export_part=None) -> Objective:
  """An Objective whose loss is the diffusion loss of the UNet ``base`` gives, with the
  LoRA ``lora`` gives, on the batch's targets and prompts (prompt dropout to the empty
  prompt, min-SNR weighting by config). ``metrics(trainable)`` adds scalars to the log.
  A batch may hold 'latents' (its targets already encoded) instead of 'target'.

  ``lora_and_loss(trainable, frozen, batch) -> (tree, loss(diffusion_loss), metrics)``,
  when given, is what the loss uses instead of ``lora``: the LoRA together with the
  total loss as a function of the diffusion loss (hyperlora's weight-space loss, computed
  from the same forward as its LoRA). ``loss_inputs``: batch keys it reads beside the
  LoRA's inputs (kept by ``prepare``). ``unet_inputs(trainable, frozen, inputs)``: the
  objective's own extra UNet inputs (`conditioning.UNetInputs`, from the batch keys
  ``spec.unet_inputs``), or None; the add-ons' join them.
  """
  uncond_ids = [jnp.asarray(i[0]) for i in tokenize(models, [''])]
  extra = time_ids(models.unet, config.data.resolution)
  lora_and_loss = lora_and_loss or (
      lambda trainable, frozen, batch: (lora(trainable, frozen, batch), lambda d: d, {}))
  unet_inputs = _with_addons(spec, models.addons, unet_inputs)
  input_keys = tuple(dict.fromkeys(spec.unet_inputs + sum((a.keys for a in models.addons), ())))

  def loss_fn(trainable, frozen, batch, rng):
    params = base(trainable, frozen)
    tree, total, more = lora_and_loss(trainable, frozen, batch)
    rng_drop, rng_t, rng_noise, rng_vae = jax.random.split(rng, 4)
    ids = batch['input_ids']
    drop = jax.random.bernoulli(rng_drop, config.model.prompt_dropout, ids[0].shape[:1])
    ids = [jnp.where(drop[:, None], u[None], i) for u, i in zip(uncond_ids, ids)]
    cond = encode_prompts(models.text_towers, params, ids, tree)
    x0 = batch['latents'] if 'latents' in batch else latents(
        models, frozen.get('vae'), batch['target'], rng_vae)
    t = diffusion.random_timesteps(rng_t, models.schedule, x0.shape[0])
    noise = jax.random.normal(rng_noise, x0.shape, x0.dtype)
    unet = denoiser(models.unet, params['unet'], tree, dict(cond, **extra),
                                 unet_inputs and unet_inputs(trainable, frozen, batch))
    pred = unet(diffusion.add_noise(models.schedule, x0, noise, t), t)
    losses = diffusion.diffusion_loss(
        pred.astype(jnp.float32), diffusion.training_target(models.schedule, x0, noise, t),
        t, models.schedule, config.model.min_snr_gamma)
    loss = losses.mean()
    return total(loss), dict(metrics(trainable), **more, diffusion_loss=loss)

  token_cache = {}

  def prepare(batch):
    """Tokenizes the prompts (cached: prompts repeat); keeps the arrays the loss reads."""
    prompts = [p.decode() if isinstance(p, bytes) else str(p) for p in batch['prompt']]
    missing = sorted(set(prompts) - set(token_cache))
    if missing:
      token_cache.update(zip(missing, zip(*tokenize(models, missing))))
    out = {'input_ids': tuple(np.stack(ids) for ids in zip(*(token_cache[p] for p in prompts))),
           'target': np.asarray(batch['target'], np.float32)}
    missing = [k for k in input_keys if k not in batch]
    if missing:
      raise ValueError(f'The run\'s UNet inputs need {missing} in the data, which has none '
                       '(condition images: synthetic data.pose=True, VITON-HD\'s '
                       'openpose_img/, triples\' condition.*).')
    out.update({k: np.asarray(batch[k])
                for k in spec.lora_inputs + tuple(loss_inputs) + input_keys})
    return out

  return Objective(spec, models, trainable, frozen, loss_fn, prepare, lora, base,
                   hypernet_variables, unet_inputs, input_keys, export_part)


def _with_addons(spec: Spec, addons: tuple, own):
  """``own`` unet_inputs joined by the add-ons' (None when there are none)."""
  if spec.part and spec.part in [a.name for a in addons]:
    raise ValueError(f'A {spec.name} run trains its own {spec.part}; config.model.'
                     f'{spec.part} would add a second one: leave it empty.')
  if own is None and not addons:
    return None

  def unet_inputs(trainable, frozen, inputs):
    return combine(own and own(trainable, frozen, inputs),
                                *(a.inputs(frozen, inputs) for a in addons))
  return unet_inputs
