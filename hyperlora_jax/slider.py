r"""Concept sliders (ByteDance HyperLoRA's "concept slider LoRA"): the ID-LoRAs a run
predicts for two context images A and B differ by a direction; A's LoRA plus scale s
times it is A's LoRA at s = 0, B's at s = 1, and goes on beyond.

  python -m hyperlora_jax.slider --workdir=RUN --from=A.png --to=B.png \
      --scale=-1,0,0.5,1,2 --prompt="a photo of fcsks fxhks fhyks" --out=DIR

writes DIR/slider.safetensors (the direction as a standard LoRA file: diffusers/peft,
or kohya with --format=kohya, to add to any LoRA or base model at any strength),
DIR/grid.png (a row per prompt, a column per scale) and each image
(DIR/<prompt #>_<scale>.png). A or B may be a folder of one subject's images (a set).

The direction is LoRA(B) - LoRA(A) of the ID parts, held exactly by one LoRA of both
ranks (B's factors, A's negated). With the basis mix 'mid' (one coefficient per basis
LoRA, linear) it is the difference of the two predicted coefficient vectors mapped
through the bases; with ByteDance's 'factors' mix it is the difference of the two LoRAs
those coefficients make. The grid's images add A's Base-LoRA (--with_base), as the
recipe samples a subject with both parts.
"""
import os

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from hyperlora_jax import cli
from hyperlora_jax import files
from hyperlora_jax import runs
from hyperlora_jax import sample
from hyperlora_jax.convert import lora_files
from hyperlora_jax.data import images as image_io

ID = {'id': 1.0, 'base': 0.0}


def _plain(run: runs.Run, inputs, scales) -> dict:
  return runs.plain_loras(runs.lora(run, inputs, scales))[0]


def direction(run: runs.Run, inputs_a, inputs_b) -> dict:
  """The plain LoRA tree ID(B) - ID(A), inputs (one row each) as `runs.lora` takes."""
  a, b = _plain(run, inputs_a, ID), _plain(run, inputs_b, ID)
  return {p: {'down': np.concatenate([b[p]['down'], a[p]['down']]),
              'up': np.concatenate([b[p]['up'], -a[p]['up']], axis=1)} for p in a}


def slider_loras(run: runs.Run, inputs_a, inputs_b, scales, with_base: bool = True) -> dict:
  """A per-sample LoRA tree, one sample per scale s: ID(A) + s (ID(B) - ID(A)) (plus
  A's Base-LoRA), i.e. (1 - s) ID(A) + s ID(B), as one LoRA of the ranks of both."""
  a, b = _plain(run, inputs_a, ID), _plain(run, inputs_b, ID)
  base = _plain(run, inputs_a, {'id': 0.0, 'base': 1.0}) if with_base else None
  scales = np.asarray(scales, np.float32)
  tree = {}
  for p in a:
    downs = [a[p]['down'], b[p]['down']] + ([base[p]['down']] if base else [])
    ups = [a[p]['up'][None] * (1 - scales)[:, None, None],
           b[p]['up'][None] * scales[:, None, None]]
    if base:
      ups.append(np.broadcast_to(base[p]['up'], (len(scales),) + base[p]['up'].shape))
    down = np.concatenate(downs)
    tree[p] = {'down': np.broadcast_to(down, (len(scales),) + down.shape),
               'up': np.concatenate(ups, axis=2)}
  return tree


def slider_grid(run: runs.Run, inputs_a, inputs_b, prompts, scales, *, num_steps=25,
                guidance=3.0, seed=0, with_base: bool = True) -> np.ndarray:
  """uint8 images [prompts, scales, H, W, 3]: each prompt with `slider_loras`; the same
  noise along a row, so only the LoRA changes."""
  tree = slider_loras(run, inputs_a, inputs_b, scales, with_base)
  rows = []
  for prompt in prompts:
    rows.append(image_io.to_uint8(sample.generate(
        run, None, [prompt] * len(scales), num_steps=num_steps, guidance=guidance, seed=seed,
        image_ids=np.zeros(len(scales), np.int32), lora=tree)))
  return np.stack(rows)


def write(run: runs.Run, inputs_a, inputs_b, out: str, prompts, scales, *,
          fmt: str = 'diffusers', metadata=None, **kwargs) -> None:
  """Writes `out`/slider.safetensors, grid.png and each image (module docstring)."""
  header = {'hyperlora_jax.slider_scales': ','.join(f'{s:g}' for s in scales),
            **(metadata or {})}
  tree = direction(run, inputs_a, inputs_b)
  path = os.path.join(out, 'slider.safetensors')
  if fmt == 'kohya':
    lora_files.save_kohya_lora(tree, path, metadata=header,
                               unet_config=run.objective.models.unet_config)
  else:
    lora_files.save_diffusers_lora(tree, path, metadata=header)
  grid = slider_grid(run, inputs_a, inputs_b, prompts, scales, **kwargs)
  for p, row in enumerate(grid):
    for s, image in zip(scales, row):
      files.save_image(Image.fromarray(image), os.path.join(out, f'{p}_{s:g}.png'))
  shown = lambda x: image_io.to_uint8(np.asarray(x['context'])[0, 0])
  cells = [[shown(inputs_a)] + list(row) + [shown(inputs_b)] for row in grid]
  labels = ['A'] + [f'scale {s:g}' for s in scales] + ['B']
  files.save_image(image_io.grid(np.asarray(cells), labels), os.path.join(out, 'grid.png'))


# ---------------------------------------------------------------- CLI


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  cli.check_flags(positive=('num_steps',), non_negative=('step',))
  cli.check_output(f.out)
  cli.use_compilation_cache(f.compilation_cache)
  try:
    scales = [float(s) for s in f.scale]
  except ValueError:
    raise ValueError(f'--scale={",".join(f.scale)}: numbers, e.g. -1,0,0.5,1,2.') from None
  ends = [image_io.image_files(p) for p in (f['from'].value, f.to)]  # Before the restore.
  run = runs.restore(f.workdir, f.step)
  if 'id' not in run.spec.lora_parts:
    raise ValueError(f'A slider is the difference of two ID-LoRAs; a {run.spec.name} run '
                     'has none (hyperlora_basis runs do).')
  inputs_a, inputs_b = (runs.inputs_from_files(run, paths, as_set=True)[0] for paths in ends)
  write(run, inputs_a, inputs_b, f.out, f.prompt, scales, fmt=f.format,
        metadata={'hyperlora_jax.source': f.workdir, 'hyperlora_jax.from': f['from'].value,
                  'hyperlora_jax.to': f.to},
        num_steps=f.num_steps, guidance=f.guidance, seed=f.seed, with_base=f.with_base)
  print(f'Wrote slider.safetensors, grid.png and {len(f.prompt) * len(scales)} images to '
        f'{f.out}')


def _flags():
  flags.DEFINE_string('workdir', None, 'A hyperlora_basis training run.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).')
  flags.DEFINE_string('from', None, 'Context image A (or a folder: one subject\'s set).')
  flags.DEFINE_string('to', None, 'Context image B (or a folder).')
  flags.DEFINE_list('scale', ['-1', '0', '0.5', '1', '2'], 'Scales of the grid: A\'s '
                    'ID-LoRA plus scale x (B\'s - A\'s).')
  flags.DEFINE_multi_string('prompt', None, 'Prompt(s) of the grid, with the trigger '
                            'words; repeat for several rows.')
  flags.DEFINE_enum('format', 'diffusers', ('diffusers', 'kohya'), 'slider.safetensors '
                    'as diffusers/peft or kohya (ComfyUI, A1111) LoRA file.')
  flags.DEFINE_bool('with_base', True, "The grid adds A's Base-LoRA.")
  flags.DEFINE_integer('num_steps', 25, 'Sampler steps.')
  flags.DEFINE_float('guidance', 3.0, 'Classifier-free guidance scale.')
  flags.DEFINE_integer('seed', 0, 'Noise seed (the same noise in every column).')
  flags.DEFINE_string('out', None, 'Output folder.')
  cli.define_compilation_cache_flag()
  flags.mark_flags_as_required(['workdir', 'from', 'to', 'prompt', 'out'])


def run():
  """The console script (`hyperlora-slider`)."""
  _flags()
  cli.run(__name__, cli.main_with_errors(main))


if __name__ == '__main__':
  run()
