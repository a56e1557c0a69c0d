r"""Merge a content LoRA and a style LoRA into one LoRA file, anyone's files included.

  python -m hyperlora_jax.merge --content=A.safetensors --style=B.safetensors \
      --method=sum|average|ziplora|lorarar [--merger=RUN] [--base=DIFFUSERS_FOLDER] \
      --out=C.safetensors [--format=diffusers|kohya]

Reads diffusers/peft and kohya files (`convert.lora_files.load_lora_file`: alphas and
peft configs honored, SDXL's LDM names with --base), merges them (`merging.merge`) and
writes one plain LoRA of rank r_c + r_s whose delta is exactly the merged one, to a
temporary name renamed when complete. --base (a diffusers SD/SDXL folder) checks both
files against the model and is what --method=ziplora optimizes through: its UNet on
random latents at random timesteps, with --content_prompt / --style_prompt (the LoRAs'
trigger prompts). --method=lorarar takes a trained merger (--merger: a run of the
``lorarar`` objective); its layers must be the files' (else an error says so).
"""
import time

import jax
import numpy as np
from absl import app
from absl import flags

from hyperlora_jax import cli
from hyperlora_jax import diffusion
from hyperlora_jax import merging
from hyperlora_jax.convert import lora_files
from hyperlora_jax.convert import pipeline

FORMATS = ('diffusers', 'kohya')


def trained_merger(run) -> merging.TrainedMerger:
  """The merger of a run that has one (the ``lorarar`` objective's)."""
  module = run.objective.models.hypernet
  if run.objective.hypernet_variables is None or not hasattr(module, 'paths'):
    raise ValueError(f'{run.workdir} is a {run.spec.name} run, not a trained merger (a run '
                     'of the lorarar objective).')
  variables = run.objective.hypernet_variables(run.params, run.objective.frozen)
  return merging.TrainedMerger(module, variables['params'])


def noised_inputs(pipe: pipeline.Pipeline, prompts, rng, batch: int, resolution: int) -> dict:
  """ZipLoRA's inputs without images: for each prompt, `batch` standard-normal latents
  noised at uniform timesteps, and the prompt's token ids (`objectives.LoRAPredictor`)."""
  side = resolution // (1 if pipe.vae is None else 2 ** (len(pipe.vae.block_out_channels) - 1))
  out = {}
  for k, (key, prompt) in enumerate(prompts.items()):
    rng_x, rng_n, rng_t = jax.random.split(jax.random.fold_in(rng, k), 3)
    shape = (batch, side, side, pipe.unet.in_channels)
    t = diffusion.random_timesteps(rng_t, pipe.schedule, batch)
    x = diffusion.add_noise(pipe.schedule, jax.random.normal(rng_x, shape),
                            jax.random.normal(rng_n, shape), t)
    ids = pipeline.tokenize_prompts(pipe.tokenizers, [prompt] * batch)
    out[key] = {'x': x, 't': t, 'input_ids': tuple(np.asarray(i) for i in ids)}
  return out


def merge_files(content: str, style: str, method: str, out: str, fmt: str = 'diffusers', *,
                base: str = '', merger: str = '', allow_partial: bool = False,
                log=print, **opts) -> dict:
  """Reads, merges and writes; returns the merged tree. opts: `merging.merge`'s (weight,
  steps, lr, similarity) and ZipLoRA's content_prompt, style_prompt, batch, resolution,
  seed."""
  if fmt not in FORMATS:
    raise ValueError(f'Unknown format {fmt!r}; one of {FORMATS}.')
  if method not in merging.METHODS:
    raise ValueError(f'Unknown merge method {method!r}; one of {merging.METHODS}.')
  if method == 'ziplora' and not base:
    raise ValueError('--method=ziplora optimizes through the base model: give --base '
                     '(its diffusers folder).')
  if method == 'lorarar' and not merger:
    raise ValueError('--method=lorarar needs --merger (a run of the lorarar objective).')
  start = time.perf_counter()
  pipe = pipeline.load_pipeline(base) if base else None
  trees = {}
  for name, path in (('content', content), ('style', style)):
    trees[name] = lora_files.load_lora_file(path, pipe)
    ranks = sorted({int(np.shape(f['down'])[0]) for f in trees[name].values()})
    log(f'Read the {name} LoRA {path}: {len(trees[name])} layers, rank {ranks}.')
  kwargs = {k: opts[k] for k in ('weight', 'steps', 'lr', 'similarity') if k in opts}
  # runs and objectives import the data pipeline (grain, TFDS: ~2 s), which sum and
  # average do not need: the CLI's end-to-end time is mostly imports.
  if method == 'lorarar':
    from hyperlora_jax import runs  # pylint: disable=g-import-not-at-top
    kwargs['merger'] = trained_merger(runs.restore(merger))
  if method == 'ziplora':
    from hyperlora_jax import objectives  # pylint: disable=g-import-not-at-top
    factor = 1 if pipe.vae is None else 2 ** (len(pipe.vae.block_out_channels) - 1)
    resolution = opts.get('resolution') or pipe.unet_config.get('sample_size', 0) * factor
    if not resolution:
      raise ValueError(f'{base}/unet/config.json sets no sample_size: give --resolution.')
    kwargs.update(predict=objectives.LoRAPredictor(pipe.unet, pipe.text_towers, resolution),
                  base=pipeline.param_trees(pipe), inputs=noised_inputs(
                      pipe, {'content': opts.get('content_prompt', ''),
                             'style': opts.get('style_prompt', '')},
                      jax.random.key(opts.get('seed', 0)), opts.get('batch', 2), resolution))
  log(f'Merging ({method})...')
  merging_start = time.perf_counter()
  tree = jax.tree.map(np.asarray, merging.merge(trees['content'], trees['style'], method,
                                                allow_partial=allow_partial, **kwargs))
  merge_seconds = time.perf_counter() - merging_start
  metadata = {'hyperlora_jax.merge_method': method, 'hyperlora_jax.content': content,
              'hyperlora_jax.style': style}
  if fmt == 'diffusers':
    lora_files.save_diffusers_lora(tree, out, metadata=metadata)
  else:
    lora_files.save_kohya_lora(tree, out, metadata=metadata,
                               unet_config=pipe.unet_config if pipe else None)
  ranks = sorted({int(f['down'].shape[0]) for f in tree.values()})
  log(f'Wrote {fmt} {out}: {len(tree)} layers, rank {ranks}; merged in {merge_seconds:.2f} s, '
      f'{time.perf_counter() - start:.2f} s in all.')
  return tree


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  cli.check_flags(positive=('steps', 'batch'))
  cli.check_output(f.out)
  cli.use_compilation_cache(f.compilation_cache)
  merge_files(f.content, f.style, f.method, f.out, f.format, base=f.base or '',
              merger=f.merger or '', allow_partial=f.allow_partial, weight=f.weight,
              steps=f.steps, lr=f.lr, similarity=f.similarity,
              content_prompt=f.content_prompt, style_prompt=f.style_prompt, batch=f.batch,
              resolution=f.resolution, seed=f.seed)


def _flags():
  flags.DEFINE_string('content', None, 'The content (subject) LoRA file.')
  flags.DEFINE_string('style', None, 'The style LoRA file.')
  flags.DEFINE_enum('method', 'sum', merging.METHODS, 'How to merge.')
  flags.DEFINE_string('out', None, 'The merged LoRA file to write.')
  flags.DEFINE_enum('format', 'diffusers', FORMATS,
                    'diffusers (diffusers/peft) or kohya (ComfyUI, A1111).')
  flags.DEFINE_string('base', None, 'A diffusers SD/SDXL folder: checks the files against '
                      'it; --method=ziplora optimizes through it.')
  flags.DEFINE_string('merger', None, 'A lorarar run (--method=lorarar).')
  flags.DEFINE_bool('allow_partial', False, 'Merge the common layers of two LoRAs with '
                    'other layer sets, keeping the rest as they are.')
  flags.DEFINE_float('weight', 0.5, "--method=average's content weight (style: 1 - it).")
  flags.DEFINE_integer('steps', 100, 'ZipLoRA steps.')
  flags.DEFINE_float('lr', 1e-2, 'ZipLoRA Adam learning rate.')
  flags.DEFINE_float('similarity', 0.01, "ZipLoRA's weight of the mergers' overlap.")
  flags.DEFINE_string('content_prompt', '', "ZipLoRA: the content LoRA's prompt.")
  flags.DEFINE_string('style_prompt', '', "ZipLoRA: the style LoRA's prompt.")
  flags.DEFINE_integer('batch', 2, 'ZipLoRA: noised latents per prompt.')
  flags.DEFINE_integer('resolution', None, "ZipLoRA: pixels (default: the UNet's).")
  flags.DEFINE_integer('seed', 0, "ZipLoRA's latents and timesteps.")
  cli.define_compilation_cache_flag()
  flags.mark_flags_as_required(['content', 'style', 'out'])


def run():
  """The console script (`hyperlora-merge`)."""
  _flags()
  cli.run(__name__, cli.main_with_errors(main))


if __name__ == '__main__':
  run()
