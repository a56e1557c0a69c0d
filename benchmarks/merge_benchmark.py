r"""Issue 17's merging speed targets, on random weights, same device, same process.

  python benchmarks/merge_benchmark.py --out=merge.md              # SD1.5-shaped (GPU)
  python benchmarks/merge_benchmark.py --tiny --out=/tmp/merge.md  # CPU smoke run (tests)

Rows (seconds after compilation, the median of --repeats calls; compile seconds apart):

* merge time per pair, LoRA.rar (`merging.merge(..., 'lorarar')`: an untrained merger of
  the paper's shape, hidden 128, over to_q / to_out: timing does not depend on its
  values) against ZipLoRA (`'ziplora'`, --steps Adam steps through the UNet on
  --batch noised latents per prompt) and their ratio
* ZipLoRA as one compiled ``lax.fori_loop`` against the same jitted step called from a
  Python loop, and their ratio
* the merge CLI end to end (`python -m hyperlora_jax.merge --method=sum`, a new process:
  imports, reading both files, merging, writing) on SD1.5-shaped random LoRA files
  (rank --rank over every UNet attention projection), CPU

The UNet is SD1.5's shape (--tiny: a tiny one) with random weights and a CLIP-L-shaped
text tower; the LoRAs are random over its self and cross attention.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from hyperlora_jax import cli, defaults, diffusion, lora as lora_lib, merging  # noqa: E402
from hyperlora_jax import objectives  # noqa: E402
from hyperlora_jax.convert import lora_files  # noqa: E402
from hyperlora_jax.models import clip, init_variables, merger as merger_lib, unet as unet_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, hidden_act='quick_gelu', vocab_size=49408,
                   max_position_embeddings=77, eos_token_id=1)
SIZES = {
    'sd15': dict(unet=dict(defaults.SD15_UNET, sample_size=64), text=CLIP_L_TEXT, tokens=77,
                 latent=64),
    'tiny': dict(unet=defaults.tiny_unet(channels=(16, 32), cross_attention_dim=32, heads=2),
                 text=dict(defaults.tiny_text(width=32, layers=1, heads=2), vocab_size=100,
                           max_position_embeddings=8, eos_token_id=1), tokens=8, latent=16),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--tiny', action='store_true', help='Tiny models (CPU smoke run).')
  p.add_argument('--steps', type=int, default=100, help='ZipLoRA steps.')
  p.add_argument('--batch', type=int, default=1, help='ZipLoRA latents per prompt.')
  p.add_argument('--rank', type=int, default=16, help='Rank of the random LoRAs.')
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--out', default='', help='Write the table here too (markdown).')
  return p.parse_args(argv)


def _time(fn, repeats):
  """(compile + first call seconds, median seconds of `repeats` later calls)."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def _random_lora(targets, rank, seed):
  rng = np.random.RandomState(seed)
  return {t.path: {'down': rng.randn(rank, t.d_in).astype(np.float32) * t.d_in ** -0.5,
                   'up': rng.randn(t.d_out, rank).astype(np.float32) * 0.01}
          for t in targets}


def main(argv=None):
  args = parse_args(argv)
  cli.set_default_xla_flags()  # as the merge CLI sets them
  size = SIZES['tiny' if args.tiny else 'sd15']
  unet = unet_lib.from_config(size['unet'])
  text = clip.text_from_config(size['text'])
  rng = jax.random.key(0)
  params = {'unet': init_variables(unet, rng, *unet.dummy_inputs())['params'],
            'text': init_variables(text, rng, *text.dummy_inputs())['params']}
  targets = lora_lib.find_targets(params['unet'], 'cross_attn,self_attn')
  content, style = _random_lora(targets, args.rank, 0), _random_lora(targets, args.rank, 1)
  rows = []

  # LoRA.rar: one forward of the merger.
  paths = merging.merger_paths(content, style)
  dims = {t.path: (t.d_in, t.d_out) for t in targets}
  net = merger_lib.Merger(paths, tuple(dims[p] for p in paths))
  merger = merging.TrainedMerger(net, net.init(rng, [
      jnp.zeros((dims[p][0], 2 * dims[p][1])) for p in paths])['params'])
  lorarar = jax.jit(lambda c, s: merging.merge(c, s, 'lorarar', merger=merger))
  rar_compile, rar_s = _time(lambda: lorarar(content, style), args.repeats)

  # ZipLoRA through the UNet, compiled loop and Python loop.
  latent = size['latent']
  predict = objectives.LoRAPredictor(unet, (text,), latent)
  schedule = diffusion.schedule_from_config(diffusion.SD15_SCHEDULER_CONFIG)
  keys = jax.random.split(rng, 4)
  shape = (args.batch, latent, latent, unet.in_channels)
  t = diffusion.random_timesteps(keys[0], schedule, args.batch)
  x = diffusion.add_noise(schedule, jax.random.normal(keys[1], shape),
                          jax.random.normal(keys[2], shape), t)
  ids = (np.ones((args.batch, size['tokens']), np.int32),)
  inputs = {k: {'x': x, 't': t, 'input_ids': ids} for k in ('content', 'style')}
  zip_opts = dict(steps=args.steps, predict=predict, base=params, inputs=inputs)
  rows_zip = {}
  for compiled in (True, False):
    rows_zip[compiled] = _time(lambda c=compiled: merging.merge(
        content, style, 'ziplora', compiled=c, **zip_opts), max(1, args.repeats - 2))
  zip_compile, zip_s = rows_zip[True]
  rows += [('merge per pair: LoRA.rar (merger forward)', f'{rar_s * 1e3:.2f} ms',
            f'{rar_compile:.1f}'),
           (f'merge per pair: ZipLoRA ({args.steps} steps, jit loop)', f'{zip_s:.2f} s',
            f'{zip_compile:.1f}'),
           ('LoRA.rar speed-up over ZipLoRA', f'{zip_s / rar_s:.0f}x', ''),
           (f'ZipLoRA {args.steps} steps, Python loop of jitted steps',
            f'{rows_zip[False][1]:.2f} s', f'{rows_zip[False][0]:.1f}'),
           ('ZipLoRA jit loop speed-up over the Python loop',
            f'{rows_zip[False][1] / zip_s:.1f}x', '')]

  # The CLI end to end on SD1.5-shaped files (always SD1.5's layer shapes).
  sd15 = unet_lib.from_config(dict(defaults.SD15_UNET))
  shapes = jax.eval_shape(lambda: sd15.init(rng, *sd15.dummy_inputs()))['params']
  sd_targets = lora_lib.find_targets(shapes, 'cross_attn,self_attn')
  with tempfile.TemporaryDirectory() as folder:
    files = {}
    for k, name in enumerate(('content', 'style')):
      files[name] = os.path.join(folder, f'{name}.safetensors')
      save = lora_files.save_kohya_lora if k else lora_files.save_diffusers_lora
      save(_random_lora(sd_targets, args.rank, k), files[name])
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, '-m', 'hyperlora_jax.merge', f'--content={files["content"]}',
         f'--style={files["style"]}', '--method=sum',
         f'--out={os.path.join(folder, "merged.safetensors")}'],
        env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    cli_s = time.perf_counter() - start
    if result.returncode:
      raise SystemExit(result.stderr)
  rows.append((f'merge CLI end to end, sum, SD1.5-shaped rank-{args.rank} files '
               f'({len(sd_targets)} layers), CPU', f'{cli_s:.2f} s', ''))

  device = jax.devices()[0].device_kind
  table = [f'device: {device}; {"tiny" if args.tiny else "SD1.5-shaped"} UNet, '
           f'ZipLoRA batch {args.batch}', '', '| row | time | compile s |', '|---|---|---|']
  table += [f'| {a} | {b} | {c} |' for a, b, c in rows]
  text_out = '\n'.join(table)
  print(text_out)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text_out + '\n')


if __name__ == '__main__':
  main()
