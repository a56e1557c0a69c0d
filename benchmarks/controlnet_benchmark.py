r"""Sampling with pose guidance: a ControlNet and a LoRA per image (ours) against
diffusers' StableDiffusionControlNetPipeline loop with one shared LoRA (issue 21's row).

SD1.5 shapes with random weights (speed depends on shapes, not values): a ControlNet
made from the UNet as ``ControlNetModel.from_unet`` makes it (its encoder, SD's 8x
condition embedding, 512 px condition images), DDIM with classifier-free guidance over
``--sample_images`` images. Ours: the hypernetwork predicts each image's LoRA, the
ControlNet's residuals join every UNet call (`objectives.conditioning`, the sampler's own
code) and all steps run in one jit. diffusers: its UNet and ControlNet in a Python loop
with DDIMScheduler, as the pipeline's denoising loop calls them (both CFG halves through
the ControlNet, guess_mode off), one shared unfused peft LoRA on the cross-attentions;
eager and torch.compile'd. The table is gpu_benchmark.py's (same columns).

  python benchmarks/controlnet_benchmark.py --out=/tmp/controlnet.md     # one GPU
  python benchmarks/controlnet_benchmark.py --tiny --out=/tmp/tiny.md    # CPU smoke

Flags are gpu_benchmark.py's (those of its sample row: --sample_images, --sample_steps,
--sample_runs, --guidance, --rank, --dtype, --attention, --skip_torch, ...).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_benchmark as gb  # pylint: disable=g-import-not-at-top,wrong-import-position  # noqa: E402  (sets JAX's memory flags first)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from hyperlora_jax import diffusion  # noqa: E402
from hyperlora_jax import lora as lora_lib  # noqa: E402
from hyperlora_jax.models import controlnet  # noqa: E402
from hyperlora_jax.models import unet as unet_lib  # noqa: E402
from hyperlora_jax.objectives import conditioning  # noqa: E402

OURS = 'ours (per-sample LoRAs + ControlNet)'
SCALE = 1.0  # conditioning_scale


def _embedding(args) -> tuple:
  """The condition embedding's channels: SD's (8x) or, tiny, none (condition images at
  the latents' size)."""
  return (16,) if args.tiny else (16, 32, 96, 256)


def _label(args, images: int) -> str:
  return f'ControlNet + DDIM-{args.sample_steps} + CFG, {images} images'


class TorchControl(gb.TorchBench):
  """diffusers' UNet + ControlNetModel.from_unet, the ControlNet pipeline's loop."""

  def control_sample(self, row, images: int, compiled: bool):
    torch, args, s = self.torch, self.args, self.shapes
    unet = self._unet()
    control = self.diffusers.ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=_embedding(args)).to(self.dtype).eval()
    unet.requires_grad_(False)
    control.requires_grad_(False)
    unet.add_adapter(self.peft.LoraConfig(
        r=args.rank, lora_alpha=args.rank, init_lora_weights='gaussian',
        target_modules=gb.CROSS_ATTN_REGEX))
    unet.to(dtype=self.dtype).eval()
    unet_net, control_net = self._compile(unet, compiled), self._compile(control, compiled)
    scheduler = self.diffusers.DDIMScheduler.from_config(diffusion.SD15_SCHEDULER_CONFIG)
    side = s.latent * 2 ** (len(_embedding(args)) - 1)
    x_T = torch.randn(images, s.unet['in_channels'], s.latent, s.latent, device=self.device)
    text = torch.randn(2 * images, s.text_len, s.text_dim, device=self.device,
                       dtype=self.dtype)  # (uncond, cond), as the pipeline
    pose = torch.rand(images, 3, side, side, device=self.device, dtype=self.dtype)
    pose = torch.cat([pose, pose])  # the pipeline's image for both CFG halves

    @torch.inference_mode()
    def run():
      scheduler.set_timesteps(args.sample_steps, device=self.device)
      x = x_T
      for t in scheduler.timesteps:
        x_in = torch.cat([x, x]).to(self.dtype)
        down, mid = control_net(x_in, t, text, controlnet_cond=pose,
                                conditioning_scale=SCALE, return_dict=False)
        out = unet_net(x_in, t, text, down_block_additional_residuals=down,
                       mid_block_additional_residual=mid, return_dict=False)[0]
        uncond, cond = out.float().chunk(2)
        x = scheduler.step(uncond + args.guidance * (cond - uncond), t, x,
                           return_dict=False)[0]
      return x

    self._reset_peak()
    first, per_run = gb._measure(run, self._sync, 1, args.sample_runs)  # pylint: disable=protected-access
    row.value = 2 * images * args.sample_steps / per_run
    row.compile_s = first - per_run if compiled else None
    row.peak_bytes = self._peak()


class JaxControl(gb.JaxBench):
  """Our UNet, a ControlNet from its config and the hypernetwork, in one sampler jit."""

  def __init__(self, args, shapes):
    super().__init__(args, shapes)
    config = controlnet.config_from_unet(
        shapes.unet, conditioning_embedding_out_channels=_embedding(args))
    self.control = controlnet.from_config(config, self.dtype)
    self.control_config = config
    self.control_params = gb.random_params(gb.abstract_params(self.control), 7,
                                           args.unet_param_dtype)

  def step_flops(self) -> float:
    """FLOPs of one ControlNet + UNet evaluation at batch 1 (`gb.flops`, float32
    modules, as gpu_benchmark counts the UNet's)."""
    s = self.shapes
    unet, control = unet_lib.from_config(s.unet), controlnet.from_config(self.control_config)
    side = s.latent * control.condition_factor
    spec = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)

    def step(unet_params, control_params, x, t, text, pose):
      residuals = conditioning.control_residuals(control, control_params, pose, SCALE)
      return conditioning.denoiser(unet, unet_params, None, {'context': text}, residuals)(x, t)

    return gb.flops(step, gb.abstract_params(unet), gb.abstract_params(control),
                    spec(1, s.latent, s.latent, s.unet['in_channels']), spec(1, dtype=jnp.int32),
                    spec(1, s.text_len, s.text_dim), spec(1, side, side, 3))

  def control_sample(self, row, images: int):
    args, s = self.args, self.shapes
    net, hyper_params = self._hypernet(lora_lib.find_targets(self.unet_params, 'cross_attn'))
    batch = self._batch(images)
    uncond = jax.random.normal(jax.random.key(5), (images, s.text_len, s.text_dim), self.dtype)
    side = s.latent * self.control.condition_factor
    pose = jax.random.uniform(jax.random.key(8), (images, side, side, 3), minval=-1, maxval=1)
    x_T = diffusion.init_noise(jax.random.key(6), batch['latents'].shape)

    def sample_fn(unet_params, control_params, hyper_params, context, pose, text, uncond, x_T):
      # Each image's LoRA and pose map on both halves of the (uncond, cond) batch, as
      # `sample.generate` tiles them.
      tree = net.apply({'params': hyper_params}, context)
      tree = jax.tree.map(lambda a: jnp.concatenate([a, a]) if a.ndim else a, tree)
      residuals = conditioning.control_residuals(
          self.control, control_params, conditioning.tile({'pose': pose}, 2)['pose'], SCALE)
      model_fn = conditioning.denoiser(self.module, unet_params, tree,
                                       {'context': jnp.concatenate([uncond, text])}, residuals)
      return diffusion.sample(model_fn, self.schedule, x_T, args.sample_steps, 'ddim',
                              guidance_scale=args.guidance)

    inputs = (self.unet_params, self.control_params, hyper_params, batch['images'], pose,
              batch['text'], uncond, x_T)
    start = time.perf_counter()
    compiled = jax.jit(sample_fn).lower(*inputs).compile()
    row.compile_s = time.perf_counter() - start
    run = lambda: compiled(*inputs)
    _, per_run = gb._measure(run, jax.block_until_ready, 1, args.sample_runs)  # pylint: disable=protected-access
    row.value = 2 * images * args.sample_steps / per_run
    if args.profile_dir:
      self._profile(row.config, run)
    return gb._planned_bytes(compiled)  # pylint: disable=protected-access


def run(args):
  """The row's three implementations; returns (rows, notes)."""
  device = gb.start_backend(args)
  attention = args.attention
  if attention == 'auto':
    attention = 'cudnn' if device.platform == 'gpu' else 'xla'
  gb._use_attention(attention)  # pylint: disable=protected-access
  shapes, n = gb._shapes(args), args.sample_images  # pylint: disable=protected-access
  config = f'controlnet_sample_{n}'
  rows = []
  notes = [f'JAX {jax.__version__} on {device.device_kind} ({device.platform}).']
  if not args.skip_torch:
    bench = TorchControl(args, shapes)
    notes.append(bench.versions() + '.')
    for impl, baseline in zip(gb.TORCH_IMPLS['sample'], ('eager', 'compiled')):
      row = gb.Row('sample', config, _label(args, n), impl, 'evals/s', baseline, gb._PROCESS)  # pylint: disable=protected-access
      rows.append(row)
      if baseline == 'compiled' and (args.skip_compile_torch or not bench.cuda):
        row.status = 'skipped (flag)' if args.skip_compile_torch else 'skipped (CPU)'
        continue
      gb._log(f'{row.impl} ...')  # pylint: disable=protected-access
      gb._run_torch(bench, row, bench.control_sample, n, baseline == 'compiled')  # pylint: disable=protected-access
      gb._log(f'{row.impl}: {row.value or row.status}')  # pylint: disable=protected-access
  ours = JaxControl(args, shapes)
  row = gb.Row('sample', config, _label(args, n), OURS, 'evals/s', '', gb._PROCESS)  # pylint: disable=protected-access
  gb._log(f'{row.impl} ...')  # pylint: disable=protected-access
  gb._run_ours(row, ours.control_sample, n)  # pylint: disable=protected-access
  gb._log(f'{row.impl}: {row.value or row.status}')  # pylint: disable=protected-access
  rows.append(row)
  flops = ours.step_flops()
  for r in rows:
    r.flops_per_item = flops
  side = shapes.latent * ours.control.condition_factor
  notes += [
      f'UNet {"tiny" if args.tiny else "SD1.5"} and a ControlNet from it (from_unet), '
      f'random weights, {args.dtype} compute: latents {shapes.latent}x{shapes.latent}x4, '
      f'condition images {side}x{side}x3, text {shapes.text_len}x{shapes.text_dim}; our '
      f'attention: jax.nn.dot_product_attention(implementation={attention!r}).',
      f'DDIM-{args.sample_steps}, guidance {args.guidance}, conditioning_scale {SCALE}. '
      'Ours: the hypernetwork predicts a rank-'
      f'{args.rank} LoRA per image, the ControlNet reads each image\'s own pose map at '
      'every step, one jit (lax.scan over steps). diffusers: StableDiffusionControlNet'
      'Pipeline\'s loop (ControlNet then UNet on the doubled batch, DDIMScheduler) with one '
      'shared unfused peft LoRA on the cross-attention projections. Evaluations/s = 2 (CFG) '
      'x images x steps / s; "vs torch compiled" is the target ratio (1.2x).',
      f'MFU = throughput x the FLOPs of one ControlNet + UNet evaluation at batch 1 '
      f'({flops / 1e12:.3g} TFLOP, counted on the jaxpr: gpu_benchmark.flops) / '
      f'{args.peak_flops:.4g} FLOP/s.',
  ]
  return rows, notes


def main(argv=None):
  args = gb.parse_args(argv)
  rows, notes = run(args)
  gb.report(args, rows, notes)
  return rows


if __name__ == '__main__':
  main()
