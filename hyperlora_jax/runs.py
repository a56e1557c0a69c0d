"""A trained run as one object: restored from its workdir, or a diffusers folder's base.

  run = runs.restore('workdirs/quickstart/hyperlora_heads')
  tree = runs.lora(run, {'context': images})   # the LoRA it applies (per sample here)
  files = runs.plain_loras(tree)               # one plain (down, up) tree per sample

Sampling, evaluation, export and the stages use runs through this module and the
objective it carries (`objectives.base.Objective`); it depends on none of them.
"""
import functools
import os
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from hyperlora_jax import checkpoint
from hyperlora_jax import defaults
from hyperlora_jax import lora as lora_lib
from hyperlora_jax import objectives
from hyperlora_jax import sharding
from hyperlora_jax.data import images as image_io

class Run(NamedTuple):
  """A run's config, its objective (models and frozen params; its ``trainable`` is
  None, since the trained values are ``params``), its trained params, and where and at
  which step they were saved ('' and 0 for a base model alone)."""
  config: ml_collections.ConfigDict
  objective: objectives.Objective
  params: Any
  workdir: str = ''
  step: int = 0

  @property
  def spec(self) -> objectives.Spec:
    return self.objective.spec


def _path(workdir) -> epath.Path:
  """Local paths made absolute (Orbax needs them; the README's are relative)."""
  workdir = str(workdir)
  return epath.Path(workdir if '://' in workdir else os.path.abspath(workdir))


def load_config(workdir, step: Optional[int] = None) -> ml_collections.ConfigDict:
  """The config that checkpoint `step` (default: the newest intact) of a run was trained
  with, as saved in the checkpoint (config.json is only a readable copy), with the
  defaults of keys added since it was written."""
  return _load_config(workdir, step)[1]


def _load_config(workdir, step):
  workdir = _path(workdir)
  if not (workdir / 'checkpoints').exists():
    raise FileNotFoundError(
        f'No training run at {workdir}: it has no checkpoints/ (a run of python -m '
        'hyperlora_jax.main --workdir=... writes them).')
  step, config = checkpoint.restore_config(workdir / 'checkpoints', step)
  return step, defaults.fill(ml_collections.ConfigDict(config))


def restore(workdir, step: Optional[int] = None, attach: Optional[dict] = None) -> Run:
  """The run trained in `workdir`, at checkpoint `step` (default: the newest intact).

  The config is the one saved with that checkpoint. The objective is rebuilt from the
  training seed (so from-scratch frozen models are the ones the run trained against);
  only the trained params of the checkpoint are read (the EMA copy when the run kept
  one), replicated on the current devices, as is the frozen base (`on_devices`).

  attach: frozen add-ons to sample the run with, {section: keys} over the config's
  ``model.controlnet`` / ``model.ip_adapter`` (e.g. {'controlnet': {'folder': DIR}}):
  a run trained without pose guidance, evaluated with a ControlNet. They change no
  trained param, so the checkpoint fits as it is.
  """
  saved_step, config = _load_config(workdir, step)
  _attach(config, attach)
  init_rng, _ = jax.random.split(jax.random.key(config.seed))
  objective = objectives.build(config, init_rng)
  repl = sharding.replicated(sharding.make_mesh(-1, 1))
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), np.float32, sharding=repl),
      objective.trainable)
  step, params = checkpoint.restore_params(_path(workdir) / 'checkpoints', abstract, step)
  if step != saved_step:  # Its arrays were damaged: an older step's, same objective.
    config = _attach(_load_config(workdir, step)[1], attach)
  # The objective's own trainable copy is the untrained init: drop it.
  return Run(config, objective._replace(trainable=None, frozen=on_devices(objective.frozen)),
             params, str(workdir), step)


def on_devices(tree):
  """`tree` (e.g. an objective's frozen base, read into host memory) replicated on the
  current devices: a compiled call given host arrays copies them to the device on every
  call (SD1.5's base, ~2-4 GB: 0.2-0.35 s on an H200), which sampling, fine-tuning and
  evaluation would pay per call."""
  repl = sharding.replicated(sharding.make_mesh(-1, 1))
  return sharding.place(tree, jax.tree.map(lambda _: repl, tree))


def _attach(config, attach: Optional[dict]):
  for name, keys in (attach or {}).items():
    if name not in objectives.ADDONS:
      raise ValueError(f'Cannot attach {name!r}: add-ons are {objectives.ADDONS}.')
    unknown = sorted(set(keys) - set(config.model[name]))
    if unknown:
      raise ValueError(f'Unknown keys {unknown} for model.{name}; it has '
                       f'{sorted(config.model[name])}.')
    config.model[name].update(dict(keys))
  return config


def from_pretrained(folder: str, resolution: Optional[int] = None,
                    attach: Optional[dict] = None) -> Run:
  """A diffusers folder's base model alone, as a run without a LoRA (at `resolution`,
  default the UNet's sample_size times the VAE's downsampling), with the add-ons
  `attach` names (as `restore`'s)."""
  config = defaults.get_config('unet_full')
  config.model.pretrained = folder
  config.train.compute_dtype = 'float32'
  config.data.resolution = resolution or 0
  _attach(config, attach)
  objective = objectives.build(config, jax.random.key(0))
  if not resolution:
    size = objective.models.unet_config.get('sample_size')
    if not size:
      raise ValueError(f'{folder}/unet/config.json sets no sample_size: give '
                       '--resolution.')
    config.data.resolution = size * latent_factor(objective.models)
  return Run(config, objective._replace(trainable=None, frozen=on_devices(objective.frozen)),
             on_devices(objective.trainable))


latent_factor = objectives.latent_factor

def lora(run: Run, inputs: Optional[dict] = None, part_scales: Optional[dict] = None):
  """The LoRA tree the run applies, or None (a base model alone). `inputs` holds the
  arrays its objective computes the LoRA from (`Spec.lora_inputs`: a hyperlora run's
  'context' images [B, H, W, 3] in [-1, 1]); a shared LoRA needs none. `part_scales`
  ({part: scale}, `Spec.lora_parts`) scales the parts of a LoRA that has them."""
  inputs = dict(inputs or {})
  missing = [k for k in run.spec.lora_inputs if inputs.get(k) is None]
  if missing:
    raise ValueError(f'A {run.spec.name} run computes its LoRA from '
                     f'{", ".join(missing)}; none given.')
  arrays = {k: jnp.asarray(inputs[k]) for k in run.spec.lora_inputs}
  if part_scales is not None:
    arrays['part_scales'] = {k: jnp.asarray(v, jnp.float32)
                             for k, v in check_parts(run.spec, part_scales).items()}
  return _lora(run.objective.lora, run.params, run.objective.frozen, arrays)


def check_parts(spec: objectives.Spec, part_scales: dict) -> dict:
  """{part: scale} for every part of the run's LoRA (1.0 where not named); a part it does
  not have is an error naming its parts."""
  unknown = sorted(set(part_scales) - set(spec.lora_parts))
  if unknown:
    having = (f'its parts are {", ".join(spec.lora_parts)}' if spec.lora_parts
              else 'its LoRA has no parts')
    raise ValueError(f'A {spec.name} run has no LoRA part {", ".join(unknown)}: {having}.')
  return {p: float(part_scales.get(p, 1.0)) for p in spec.lora_parts}


def inputs_from_files(run: Run, paths, as_set: bool = False,
                      resolution: Optional[int] = None):
  """(the run's LoRA inputs, a name per row) read from context image files, one row per
  file, or one row for them all (`as_set`, for runs that read sets of images); at
  `resolution` (default the run's), the pixels its training data holds for the same
  files."""
  resolution = resolution or run.config.data.resolution
  if run.objective.read_inputs is not None:
    return run.objective.read_inputs(list(paths), resolution, as_set)
  if as_set:
    raise ValueError(f'A {run.spec.name} run predicts a LoRA from one image; a set of '
                     'images is for runs that read sets (hyperlora_basis).')
  loaded = [image_io.load_images(p, resolution) for p in paths]
  return ({'context': np.concatenate([images for images, _ in loaded])},
          [n for _, names in loaded for n in names])


@functools.partial(jax.jit, static_argnums=0)
def _lora(fn, params, frozen, inputs):
  return fn(params, frozen, inputs)


def base_params(run: Run) -> dict:
  """{'unet', 'text'}: the params the run samples with."""
  return run.objective.base(run.params, run.objective.frozen)


@jax.jit
def _to_plain(tree) -> dict:
  """One program and one copy to the host for the whole tree: folded op by op, an
  SD1.5 tree took 31 ms on a CPU against 5.6 ms jitted (its layers' ~1000 small ops are
  each a dispatch, and on a GPU each leaf's np.asarray was a wait of its own)."""
  return {p: lora_lib.to_plain(f) for p, f in tree.items()}


def plain_loras(tree) -> list:
  """Plain (down, up, scale 1) shared trees, one per sample of a per-sample tree or one
  for a shared tree: what LoRA files hold (lora.to_plain folds LiDB, basis and VeRA
  factors; the rank is then down.shape[0]). Ranks that are zero in every sample (a part
  of the LoRA scaled to 0) are left out."""
  plain = jax.device_get(_to_plain(tree))
  plain = {p: _drop_zero_ranks(f) for p, f in plain.items()}
  # Shared bases with per-sample coefficients (basis, VeRA) fold into a per-sample down
  # or up only: the other factor stays shared.
  sizes = {v.shape[0] for f in plain.values() for v in f.values() if v.ndim == 3}
  if not sizes:
    return [plain]
  return [{p: {k: v[i] if v.ndim == 3 else v for k, v in f.items()}
           for p, f in plain.items()} for i in range(sizes.pop())]


def _drop_zero_ranks(factors: dict) -> dict:
  """(down, up) without the ranks whose down rows are zero in every sample (at least
  one rank stays, so a file keeps every layer)."""
  down, up = factors['down'], factors['up']
  live = np.any(down != 0, axis=tuple(range(down.ndim - 2)) + (down.ndim - 1,))
  if live.all():
    return factors
  keep = np.flatnonzero(live) if live.any() else np.arange(1)
  return {'down': np.take(down, keep, axis=-2), 'up': np.take(up, keep, axis=-1)}
