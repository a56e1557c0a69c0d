r"""Export a run's LoRA or hypernetwork for other tools.

  python -m hyperlora_jax.export --workdir=RUN --context=item.png \
      --format=diffusers --out=item_lora.safetensors

Formats:
  diffusers    diffusers/peft LoRA file (StableDiffusionPipeline.load_lora_weights)
  kohya        kohya/A1111 LoRA file (ComfyUI, A1111)
  merged-unet  the UNet with the LoRA merged in, a diffusers unet/ folder
               (a unet_full run: its trained UNet)
  hypernet     the hypernetwork itself: hypernet.safetensors + hypernet.json in
               the --out folder, read back by `load_hypernet` (no Orbax)

A hyperlora run exports the LoRA it predicts for --context; a unet_lora run its
shared LoRA. LiDB, basis and VeRA LoRAs are written as the equivalent plain
factors (lora.to_plain); the header's hyperlora_jax.ranks states their rank.
"""
import json
import os
from typing import Optional

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from hyperlora_jax import lora as lora_lib
from hyperlora_jax import sample
from hyperlora_jax.convert import core
from hyperlora_jax.convert import lora_files
from hyperlora_jax.convert import pipeline
from hyperlora_jax.models import clip, hypernet

FORMATS = ('diffusers', 'kohya', 'merged-unet', 'hypernet')
HYPERNET_WEIGHTS = 'hypernet.safetensors'
HYPERNET_CONFIG = 'hypernet.json'


def export_lora(config, objective, params, fmt: str, out: str,
                context=None, metadata: Optional[dict] = None) -> None:
  """Writes the run's LoRA (predicted for `context` [1, H, W, 3] in [-1, 1]
  on hyperlora runs) as `fmt`: 'diffusers', 'kohya' or 'merged-unet'."""
  if fmt not in FORMATS[:3]:
    raise ValueError(f'Unknown LoRA format {fmt!r}; one of {FORMATS[:3]}.')
  unet_params = (params['unet'] if config.objective == 'unet_full'
                 else objective.frozen['unet'])
  if config.objective == 'unet_full':
    if fmt != 'merged-unet':
      raise ValueError(f'A unet_full run has no LoRA to write as {fmt}; '
                       'merged-unet writes its UNet.')
    pipeline.save_model(unet_params, objective.models.unet_config, out,
                        pipeline.UNET_WEIGHTS)
    return
  if context is not None and len(context) != 1:
    raise ValueError(f'Export one context image at a time, not {len(context)}.')
  tree = sample.plain_loras(sample.predict_lora(config, objective, params, context))[0]
  header = {'hyperlora_jax.objective': config.objective,
            'hyperlora_jax.parameterization': (
                config.hypernet.param.kind if config.objective == 'hyperlora'
                else 'plain'), **(metadata or {})}
  if fmt == 'diffusers':
    lora_files.save_diffusers_lora(tree, out, metadata=header)
  elif fmt == 'kohya':
    lora_files.save_kohya_lora(tree, out, metadata=header)
  else:
    lora_files.save_merged_unet(jax.device_get(unet_params),
                                objective.models.unet_config, tree, out)


def _tower_config(module) -> Optional[dict]:
  """The CLIP/ViT tower's shape fields, so a loader rebuilds it exactly."""
  encoder = module.encoder
  if not isinstance(encoder, hypernet.CLIPEncoder):
    return None
  tower = encoder.tower
  return {f: getattr(tower, f) for f in tower.__dataclass_fields__
          if f not in ('parent', 'name', 'dtype')}


def save_hypernet(config, objective, params, folder: str) -> None:
  """Writes a hyperlora run's hypernetwork: every variable (trained params,
  frozen encoder and aux matrices) as safetensors, and what builds it."""
  if config.objective != 'hyperlora':
    raise ValueError(f'A {config.objective} run has no hypernetwork.')
  module = objective.models.hypernet
  variables = jax.device_get(sample.hypernet_variables(objective, params))
  os.makedirs(folder, exist_ok=True)
  save_file({k: np.array(v, np.float32) for k, v in
             traverse_util.flatten_dict(variables, sep='/').items()},
            os.path.join(folder, HYPERNET_WEIGHTS), metadata={'format': 'np'})
  spec = {'hypernet': config.hypernet.to_dict(),
          'targets': [[t.path, t.d_in, t.d_out] for t in module.targets],
          'tower': _tower_config(module), 'resolution': config.data.resolution}
  with open(os.path.join(folder, HYPERNET_CONFIG), 'w') as f:
    json.dump(spec, f, indent=2)


def load_hypernet(folder: str):
  """(module, variables, spec) of a `save_hypernet` folder:
  ``module.apply(variables, images)`` is the LoRA tree the run predicts."""
  config_file = os.path.join(folder, HYPERNET_CONFIG)
  if not os.path.exists(config_file):
    raise FileNotFoundError(f'No {HYPERNET_CONFIG} in {folder}: not an '
                            'exported hypernetwork.')
  with open(config_file) as f:
    spec = json.load(f)
  targets = [lora_lib.Target(*t) for t in spec['targets']]
  tower = spec['tower'] and clip.vision_from_config(spec['tower'])
  module = hypernet.build(ml_collections.ConfigDict(spec['hypernet']), targets,
                          tower)
  flat = core.read_safetensors(os.path.join(folder, HYPERNET_WEIGHTS))
  return module, traverse_util.unflatten_dict(flat, sep='/'), spec


# ---------------------------------------------------------------- CLI


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from hyperlora_jax import train  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if f.context:
    sample.image_files(f.context)  # Fails before the slow restore.
  config, objective, params = train.restore_run(f.workdir, f.step)
  if f.format == 'hypernet':
    save_hypernet(config, objective, params, f.out)
  else:
    context = None
    if config.objective == 'hyperlora':
      if not f.context:
        raise ValueError('A hyperlora run predicts its LoRA from --context; '
                         'give one image.')
      context = sample.load_images(f.context, config.data.resolution)[0]
    export_lora(config, objective, params, f.format, f.out, context,
                {'hyperlora_jax.source': f.workdir,
                 'hyperlora_jax.context': f.context or ''})
  print(f'Wrote {f.format} to {f.out}')


def _flags():
  flags.DEFINE_string('workdir', None, 'A training run.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).')
  flags.DEFINE_string('context', None, 'The context image (hyperlora runs).')
  flags.DEFINE_enum('format', None, FORMATS, 'What to write.')
  flags.DEFINE_string('out', None, 'File (diffusers, kohya) or folder.')
  flags.mark_flags_as_required(['workdir', 'format', 'out'])


if __name__ == '__main__':
  _flags()
  app.run(sample.main_with_errors(main))
