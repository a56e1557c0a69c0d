r"""Export a run's LoRA or hypernetwork for other tools.

  python -m hyperlora_jax.export --workdir=RUN --context=item.png \
      --format=diffusers --out=item_lora.safetensors

Formats, by the tool that reads them:
  kohya        kohya/sd-scripts LoRA file: ComfyUI's and A1111's LoRA loaders (SDXL
               LoRAs get SDXL's LDM module names); diffusers' load_lora_weights reads it
               too. ``comfyui`` and ``a1111`` are the same format.
  diffusers    diffusers/peft LoRA file (StableDiffusion[XL]Pipeline.load_lora_weights,
               peft); ComfyUI does not map its UNet attention layers: use kohya there
  merged-unet  the UNet with the LoRA merged in, a diffusers unet/ folder
               (a run without a LoRA, e.g. unet_full: its UNet as trained)
  hypernet     the hypernetwork itself: hypernet.safetensors + hypernet.json in
               the --out folder, read back by `convert.hypernet_files.load` (no Orbax)

A run whose LoRA is predicted from context images exports the LoRA it predicts for
--context; a run with a shared LoRA exports that. LiDB, basis and VeRA LoRAs are
written as the equivalent plain factors (lora.to_plain); the header's
hyperlora_jax.ranks states their rank.
"""
from typing import Optional

from absl import app
from absl import flags

from hyperlora_jax import cli
from hyperlora_jax import runs
from hyperlora_jax.convert import hypernet_files
from hyperlora_jax.convert import lora_files
from hyperlora_jax.convert import pipeline
from hyperlora_jax.data import images

FORMATS = ('diffusers', 'kohya', 'merged-unet', 'hypernet')
# Names of a format by the tool that reads it.
ALIASES = {'comfyui': 'kohya', 'a1111': 'kohya'}


def export_lora(run: runs.Run, fmt: str, out: str, context=None,
                metadata: Optional[dict] = None) -> None:
  """Writes the run's LoRA (predicted for `context` [1, H, W, 3] in [-1, 1] when its
  LoRA comes from context images) as `fmt`: 'diffusers', 'kohya' or 'merged-unet'."""
  fmt = ALIASES.get(fmt, fmt)
  if fmt not in FORMATS[:3]:
    raise ValueError(f'Unknown LoRA format {fmt!r}; one of {FORMATS[:3] + tuple(ALIASES)}.')
  unet_params = runs.base_params(run)['unet']
  if run.spec.lora_kind is None:
    if fmt != 'merged-unet':
      raise ValueError(f'A {run.spec.name} run has no LoRA to write as {fmt}; '
                       'merged-unet writes its UNet.')
    pipeline.save_model(unet_params, run.objective.models.unet_config, out,
                        pipeline.UNET_WEIGHTS)
    return
  if context is not None and len(context) != 1:
    raise ValueError(f'Export one context image at a time, not {len(context)}.')
  inputs = None if context is None else {'context': context}
  tree = runs.plain_loras(runs.lora(run, inputs))[0]
  net = run.objective.models.hypernet
  header = {'hyperlora_jax.objective': run.spec.name,
            'hyperlora_jax.parameterization': (
                run.config.hypernet.param.kind if net is not None else 'plain'),
            **(metadata or {})}
  if fmt == 'diffusers':
    lora_files.save_diffusers_lora(tree, out, metadata=header)
  elif fmt == 'kohya':
    lora_files.save_kohya_lora(tree, out, metadata=header,
                               unet_config=run.objective.models.unet_config)
  else:
    lora_files.save_merged_unet(unet_params, run.objective.models.unet_config, tree, out)


def save_hypernet(run: runs.Run, folder: str) -> None:
  """Writes a run's hypernetwork (`convert.hypernet_files`)."""
  net = run.objective.models.hypernet
  if net is None:
    raise ValueError(f'A {run.spec.name} run has no hypernetwork.')
  hypernet_files.save(folder, net, run.objective.hypernet_variables(
      run.params, run.objective.frozen), run.config.hypernet.to_dict(),
                      run.config.data.resolution)


# ---------------------------------------------------------------- CLI


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  cli.check_flags(non_negative=('step',))
  cli.check_output(f.out)
  cli.use_compilation_cache(f.compilation_cache)
  if f.context:
    images.image_files(f.context)  # Fails before the slow restore.
  run = runs.restore(f.workdir, f.step)
  if ALIASES.get(f.format, f.format) == 'hypernet':
    save_hypernet(run, f.out)
  else:
    context = None
    if 'context' in run.spec.lora_inputs:
      if not f.context:
        raise ValueError(f'A {run.spec.name} run predicts its LoRA from --context; '
                         'give one image.')
      context = images.load_images(f.context, run.config.data.resolution)[0]
    export_lora(run, f.format, f.out, context,
                {'hyperlora_jax.source': f.workdir,
                 'hyperlora_jax.context': f.context or ''})
  print(f'Wrote {f.format} to {f.out}')


def _flags():
  flags.DEFINE_string('workdir', None, 'A training run.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).')
  flags.DEFINE_string('context', None, 'The context image (hyperlora runs).')
  flags.DEFINE_enum('format', None, FORMATS + tuple(ALIASES),
                    'What to write: kohya (= comfyui, a1111) for ComfyUI and A1111, '
                    'diffusers for diffusers/peft, merged-unet, hypernet.')
  flags.DEFINE_string('out', None, 'File (diffusers, kohya) or folder.')
  cli.define_compilation_cache_flag()
  flags.mark_flags_as_required(['workdir', 'format', 'out'])


def run():
  """The console script (`hyperlora-export`)."""
  _flags()
  cli.run(__name__, cli.main_with_errors(main))


if __name__ == '__main__':
  run()
