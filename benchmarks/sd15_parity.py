"""Full-size check: an SD1.5-shaped UNet with random weights, ours vs diffusers.

Builds diffusers' UNet2DConditionModel with the SD1.5 config (random weights, fixed
seed), saves it, loads it with our converter and compares outputs on the same inputs in
fp32 (both sides) and bf16 (ours in bf16 compute against diffusers fp32). Prints a table.

  python benchmarks/sd15_parity.py [--batch=2] [--size=64]
"""
import argparse
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from hyperlora_jax import defaults  # pylint: disable=g-import-not-at-top
from hyperlora_jax import convert
from hyperlora_jax.models import unet


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--size', type=int, default=64)
  args = parser.parse_args()
  import diffusers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  config = dict(defaults.SD15_UNET, sample_size=args.size)
  model = diffusers.UNet2DConditionModel(**config).eval()
  with torch.no_grad():  # diffusers zero-inits some convs: make every weight matter
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.01)
  folder = tempfile.mkdtemp()
  model.save_pretrained(folder)
  rng = np.random.RandomState(0)
  x = rng.randn(args.batch, 4, args.size, args.size).astype(np.float32)
  t = rng.randint(0, 1000, args.batch)
  c = rng.randn(args.batch, 77, 768).astype(np.float32)
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  model = model.to(device)
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  with torch.no_grad():
    ref = model(torch.tensor(x, device=device), torch.tensor(t, device=device),
                torch.tensor(c, device=device)).sample.float().cpu().numpy()
  rows = []
  for dtype in (jnp.float32, jnp.bfloat16):
    build = lambda cfg, d=dtype: unet.from_config(cfg, d)
    module, params, _ = convert.load_flax_model(folder, build)
    start = time.time()
    with jax.default_matmul_precision('highest' if dtype == jnp.float32 else 'default'):
      out = jax.jit(module.apply)({'params': params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
                                  jnp.asarray(t), jnp.asarray(c))
      out = np.asarray(out, np.float32).transpose(0, 3, 1, 2)
    abs_err = float(np.abs(out - ref).max())
    rows.append(dict(dtype=jnp.dtype(dtype).name, max_abs=abs_err,
                     max_rel=abs_err / float(np.abs(ref).max()),
                     mean_rel=float(np.abs(out - ref).mean() / np.abs(ref).mean()),
                     seconds=time.time() - start))
  print(f'SD1.5-shaped UNet, batch {args.batch}, {args.size}x{args.size} latents, '
        f'77x768 context, device {jax.devices()[0].device_kind} / torch {device}')
  print('| ours | max abs err | max rel err | mean rel err |')
  print('|---|---|---|---|')
  for r in rows:
    print(f"| {r['dtype']} | {r['max_abs']:.2e} | {r['max_rel']:.2e} | {r['mean_rel']:.2e} |")
  print(json.dumps(rows))


if __name__ == '__main__':
  main()
