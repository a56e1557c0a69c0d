r"""Full-size numerical check: a UNet of SD1.5's or SDXL's shape with random weights,
ours against diffusers.

Builds diffusers' UNet2DConditionModel from the model's config (random weights, fixed
seed, every weight perturbed so that none is zero), saves it with save_pretrained, loads
the folder with our converter and compares outputs on the same inputs: ours in fp32 and
in bf16 compute (fp32 params) against diffusers in fp32 with TF32 off. SDXL's call also
takes the pooled text embeds and the six micro-conditioning time ids. Prints a table
and a JSON line.

  python benchmarks/sd15_parity.py [--batch=2] [--size=64]    # = --model=sd15
  python benchmarks/sdxl_parity.py [--batch=2] [--size=128]   # = --model=sdxl, 1024 px
  python benchmarks/unet_parity.py --model=sdxl --tiny        # CPU smoke run
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import gpu_benchmark  # pylint: disable=g-import-not-at-top
from hyperlora_jax import convert  # (gpu_benchmark set JAX's memory options first)
from hyperlora_jax.models import unet


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--model', default='sd15', choices=('sd15', 'sdxl'))
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--size', type=int, default=None,
                 help='latent side (default: the model\'s, 64 / 128; tiny 16)')
  p.add_argument('--tiny', action='store_true', help="gpu_benchmark's tiny shapes (CPU)")
  return p.parse_args(argv)


def _inputs(shapes, batch: int, size: int) -> dict:
  rng = np.random.RandomState(0)
  out = dict(x=rng.randn(batch, 4, size, size).astype(np.float32),
             t=rng.randint(0, 1000, batch),
             context=rng.randn(batch, shapes.text_len, shapes.text_dim).astype(np.float32))
  if shapes.pooled_dim:
    pixels = 8 * size
    out['added'] = dict(
        text_embeds=rng.randn(batch, shapes.pooled_dim).astype(np.float32),
        time_ids=np.tile(np.float32([pixels, pixels, 0, 0, pixels, pixels]), (batch, 1)))
  return out


def _reference(config: dict, inputs: dict, folder: str):
  """diffusers' output in fp32 (TF32 off) of a random model it saved to ``folder``."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  torch.manual_seed(0)
  with torch.device(device):  # SDXL's 2.6B weights are initialized on the GPU
    model = diffusers.UNet2DConditionModel(**config).eval()
  with torch.no_grad():  # diffusers zero-inits some convs: make every weight matter
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.01)
  model.save_pretrained(folder)
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  tensor = lambda a: torch.tensor(a, device=device)
  added = {k: tensor(v) for k, v in inputs.get('added', {}).items()} or None
  with torch.no_grad():
    ref = model(tensor(inputs['x']), tensor(inputs['t']), tensor(inputs['context']),
                added_cond_kwargs=added).sample.float().cpu().numpy()
  del model
  if device == 'cuda':
    torch.cuda.empty_cache()  # before JAX takes the memory
  return ref, device


def main(argv=None):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  args = parse_args(argv)
  shapes = gpu_benchmark._shapes(  # pylint: disable=protected-access
      gpu_benchmark.parse_args(['--tiny'] if args.tiny else []), args.model)
  size = args.size or shapes.latent
  config = dict(shapes.unet, sample_size=size)
  inputs = _inputs(shapes, args.batch, size)
  folder = tempfile.mkdtemp()
  ref, device = _reference(config, inputs, folder)
  _, params, _ = convert.load_flax_model(folder, unet.from_config)  # our loader, as users'
  shutil.rmtree(folder)  # SDXL's is 10 GB
  params = jax.device_put(params)
  x = jnp.asarray(inputs['x'].transpose(0, 2, 3, 1))
  added = {k: jnp.asarray(v) for k, v in inputs.get('added', {}).items()}
  rows = []
  for dtype in (jnp.float32, jnp.bfloat16):
    module = unet.from_config(config, dtype)
    start = time.time()
    with jax.default_matmul_precision('highest' if dtype == jnp.float32 else 'default'):
      out = jax.jit(module.apply)({'params': params}, x, jnp.asarray(inputs['t']),
                                  jnp.asarray(inputs['context']), **added)
      out = np.asarray(out, np.float32).transpose(0, 3, 1, 2)
    abs_err = float(np.abs(out - ref).max())
    rows.append(dict(dtype=jnp.dtype(dtype).name, max_abs=abs_err,
                     max_rel=abs_err / float(np.abs(ref).max()),
                     mean_rel=float(np.abs(out - ref).mean() / np.abs(ref).mean()),
                     seconds=time.time() - start))
  print(f'{shapes.name}-shaped UNet, batch {args.batch}, {size}x{size} latents, '
        f'{shapes.text_len}x{shapes.text_dim} context, device {jax.devices()[0].device_kind} '
        f'/ torch {device}')
  print('| ours | max abs err | max rel err | mean rel err |')
  print('|---|---|---|---|')
  for r in rows:
    print(f"| {r['dtype']} | {r['max_abs']:.2e} | {r['max_rel']:.2e} | {r['mean_rel']:.2e} |")
  print(json.dumps(rows))
  return rows


if __name__ == '__main__':
  main()
