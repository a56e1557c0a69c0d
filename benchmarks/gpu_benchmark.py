r"""Throughput of hyperlora_jax against diffusers + peft, side by side, in one process.

An SD1.5-shaped UNet with random weights (throughput depends on shapes, not values),
bf16 compute, 64x64 latents and a 77x768 text context:

* ``lora``: one LoRA training step (frozen UNet, rank-4 LoRA on to_q/to_k/to_v/to_out.0
  of every self- and cross-attention, eps MSE at random timesteps, AdamW with grad
  clipping) at each of ``--batch_sizes``: diffusers + peft eager, diffusers + peft with
  torch.compile, and ours (`train.make_train_step` under jax.jit with the state donated).
* ``hyper``: the HyperLoRA step at ``--hyper_batch``: a trainable CLIP ViT-L/14-shaped
  encoder and a transformer decoder predict a per-sample plain LoRA for the
  cross-attention projections, trained through the frozen UNet. Ours only; its ratio
  is taken against diffusers' compiled plain-LoRA step at the same batch.
* ``sample``: 50-step DDIM with classifier-free guidance (the UNet sees the doubled
  batch) for ``--sample_images`` images. Ours: the hypernetwork predicts a LoRA per
  image and `diffusion.sample` runs all steps in one jit; diffusers: its UNet in a
  Python loop with DDIMScheduler and one shared (unfused) peft LoRA.

Every row reports throughput (images/s for training, UNet evaluations/s for sampling:
samples in the UNet batch x steps / s), the ratio to diffusers compiled and eager,
MFU, peak device memory and compile time. All torch rows run first and free their
memory; then ours. Usage (see benchmarks/README.md):

  python benchmarks/gpu_benchmark.py --out=/tmp/bench.md
  python benchmarks/gpu_benchmark.py --tiny --out=/tmp/tiny.md   # CPU smoke run
"""
import os

# Before JAX starts its backend: take GPU memory as needed, so the torch rows that
# run in the same process first still find it, and peaks are real.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
# Even without preallocation JAX's pool stops at this fraction of the card (default
# 0.75, ~59 GiB of an H100 80GB: the ceiling the HyperLoRA row ran into, issue 8).
_MEM_FRACTION_VARS = ('XLA_CLIENT_MEM_FRACTION', 'XLA_PYTHON_CLIENT_MEM_FRACTION')
if not any(os.environ.get(v) for v in _MEM_FRACTION_VARS):
  os.environ['XLA_CLIENT_MEM_FRACTION'] = '0.92'

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import functools
import gc
import json
import platform
import sys
import time
import traceback
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hyperlora_jax import defaults  # pylint: disable=g-import-not-at-top,wrong-import-position
from hyperlora_jax import diffusion
from hyperlora_jax import lora as lora_lib
from hyperlora_jax import train
from hyperlora_jax.models import clip
from hyperlora_jax.models import hypernet
from hyperlora_jax.models import unet as unet_lib

GIB = 2 ** 30
_START = time.perf_counter()
ATTN_TARGETS = ('to_q', 'to_k', 'to_v', 'to_out.0')  # peft names; ours: lora.TARGET_SETS
CROSS_ATTN_REGEX = r'.*attn2\.(to_q|to_k|to_v|to_out\.0)'
EAGER, COMPILED = 'diffusers+peft eager', 'diffusers+peft compiled'
OURS, OURS_SAMPLE = 'ours (jax.jit)', 'ours (per-sample LoRAs)'


# ---------------------------------------------------------------- shapes and flags
@dataclasses.dataclass(frozen=True)
class Shapes:
  unet: dict  # a diffusers UNet2DConditionModel config
  latent: int  # latent height = width
  text_len: int
  vit: dict  # the hypernetwork's encoder (a CLIPVisionConfig dict)
  decoder: dict  # width, depth, heads, rounds of the transformer decoder

  @property
  def text_dim(self) -> int:
    return self.unet['cross_attention_dim']


def _shapes(args) -> Shapes:
  decoder = dict(width=args.decoder_width, depth=args.decoder_depth,
                 heads=args.decoder_heads, rounds=args.decoder_rounds)
  if not args.tiny:
    return Shapes(dict(defaults.SD15_UNET), 64, 77, dict(defaults.VIT_L14), decoder)
  unet = dict(defaults.tiny_unet(channels=(32, 64), cross_attention_dim=32, heads=2),
              in_channels=4, out_channels=4)
  vit = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
             num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16)
  return Shapes(unet, 16, 8, vit, decoder)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--tiny', action='store_true',
                 help='tiny shapes and few iterations (CPU smoke test); no MFU meaning')
  p.add_argument('--only', default='lora,hyper,sample',
                 help='comma list of sections: lora, hyper, sample')
  p.add_argument('--skip_torch', action='store_true', help='no diffusers rows')
  p.add_argument('--skip_compile_torch', action='store_true',
                 help='no torch.compile rows (always skipped when torch runs on CPU)')
  p.add_argument('--batch_sizes', default=None, help='LoRA step batches (16,32; tiny 2,4)')
  p.add_argument('--hyper_batch', type=int, default=None, help='HyperLoRA batch (32; tiny 2)')
  p.add_argument('--steps', type=int, default=None, help='timed train steps (20; tiny 2)')
  p.add_argument('--warmup', type=int, default=None,
                 help='untimed steps first, the compiling one included (3; tiny 1)')
  p.add_argument('--sample_images', type=int, default=None, help='images (16; tiny 2)')
  p.add_argument('--sample_steps', type=int, default=None, help='DDIM steps (50; tiny 3)')
  p.add_argument('--sample_runs', type=int, default=None,
                 help='timed sampling runs after one warmup run (2; tiny 1)')
  p.add_argument('--guidance', type=float, default=7.5)
  p.add_argument('--rank', type=int, default=4, help='LoRA rank (alpha = rank)')
  p.add_argument('--decoder_width', type=int, default=None, help='(512; tiny 32)')
  p.add_argument('--decoder_depth', type=int, default=None, help='(4; tiny 1)')
  p.add_argument('--decoder_heads', type=int, default=None, help='(8; tiny 2)')
  p.add_argument('--decoder_rounds', type=int, default=None, help='(2; tiny 1)')
  p.add_argument('--peak_flops', type=float, default=989e12,
                 help='device peak for MFU: 989e12 = H100/H200 SXM dense bf16')
  p.add_argument('--unet_flops', type=float, default=0.80e12,
                 help="FLOPs of one UNet forward at batch 1 (torch's FLOP counter on "
                      'SD1.5 at 64x64); --tiny uses XLA\'s count instead')
  p.add_argument('--dtype', default=None,
                 help='compute dtype of both sides (bfloat16; tiny float32: XLA on CPU '
                      'compiles bf16 twice as slowly)')
  p.add_argument('--unet_param_dtype', default=None,
                 help="our frozen UNet's stored dtype (default: --dtype)")
  p.add_argument('--attention', default='auto', choices=('auto', 'cudnn', 'xla', 'default'),
                 help="implementation for jax.nn.dot_product_attention: auto = cudnn on "
                      "GPU, xla elsewhere; default = leave JAX's choice")
  p.add_argument('--remat', default='none',
                 help="our train.remat: none, full or a jax.checkpoint_policies name")
  p.add_argument('--encoder_remat', default=None,
                 help="the HyperLoRA ViT's hypernet.encoder.remat (default: the config's)")
  p.add_argument('--torch_compile_mode', default='default',
                 help='torch.compile mode: default, reduce-overhead, max-autotune')
  p.add_argument('--xla_flags', default='', help='appended to XLA_FLAGS')
  p.add_argument('--profile_dir', default='',
                 help='write a jax.profiler trace of 2 of our steps (1 sampling run) per '
                      'config here')
  p.add_argument('--out', default='', help='also write the table (markdown) here')
  p.add_argument('--json', default='', help='also write the rows and notes (JSON) here')
  p.add_argument('--merge', default='',
                 help='comma list of --json files: print their rows as one table, run '
                      'nothing (for runs split with --only)')
  args = p.parse_args(argv)
  full = dict(dtype='bfloat16', batch_sizes='16,32', hyper_batch=32, steps=20,
              warmup=3, sample_images=16, sample_steps=50, sample_runs=2,
              decoder_width=512, decoder_depth=4, decoder_heads=8, decoder_rounds=2)
  tiny = dict(dtype='float32', batch_sizes='2,4', hyper_batch=2, steps=2, warmup=1,
              sample_images=2, sample_steps=3, sample_runs=1,
              decoder_width=32, decoder_depth=1, decoder_heads=2, decoder_rounds=1)
  for key, value in (tiny if args.tiny else full).items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  args.unet_param_dtype = args.unet_param_dtype or args.dtype
  args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(',') if b]
  args.only = {s.strip() for s in args.only.split(',') if s.strip()}
  unknown = args.only - {'lora', 'hyper', 'sample'}
  if unknown:
    p.error(f'--only: unknown sections {sorted(unknown)}')
  if args.warmup < 1 or args.steps < 1 or args.sample_runs < 1:
    p.error('--warmup, --steps and --sample_runs must be >= 1')
  return args


# ---------------------------------------------------------------- results
@dataclasses.dataclass
class Row:
  config: str  # e.g. lora_b16, hyper_b32, sample_16
  label: str  # what the table says for config
  impl: str
  unit: str  # img/s or evals/s
  value: Optional[float] = None
  flops_per_item: Optional[float] = None
  peak_bytes: Optional[float] = None
  peak_exact: bool = True  # False: XLA's plan for the executable, not a reading
  compile_s: Optional[float] = None
  status: str = ''  # why there is no value: skipped, OOM, error


def _row(config: str, impl: str, args) -> Row:
  kind, n = config.split('_')
  if kind == 'sample':
    return Row(config, f'DDIM-{args.sample_steps} + CFG, {n} images', impl, 'evals/s')
  name = 'LoRA' if kind == 'lora' else 'HyperLoRA'
  return Row(config, f'{name} train, batch {n[1:]}', impl, 'img/s')


def _reference(rows, config: str, impl: str) -> Optional[Row]:
  """The diffusers row (``impl``) that ``config`` is compared against."""
  if config.startswith('hyper_'):
    config = 'lora_' + config.split('_')[1]
  for row in rows:
    if row.config == config and row.impl == impl and row.value:
      return row
  return None


def format_table(rows, notes, peak_flops: float) -> str:
  head = ('| config | implementation | throughput | vs diffusers compiled | '
          'vs diffusers eager | MFU | peak memory | compile |')
  lines = [head, '|' + ' --- |' * 8]
  order = {'lora': 0, 'hyper': 1, 'sample': 2}
  rows = sorted(rows, key=lambda r: (order[r.config.split('_')[0]],
                                     int(r.config.split('_')[1].lstrip('b'))))
  for r in rows:
    cells = [r.label, r.impl]
    if r.value is None:
      cells += [r.status or '-'] + ['-'] * 5
    else:
      ratios = []
      for impl in (COMPILED, EAGER):
        ref = _reference(rows, r.config, impl)
        ratios.append(f'{r.value / ref.value:.2f}x' if ref else '-')
      mfu = (f'{100 * r.value * r.flops_per_item / peak_flops:.3g}%'
             if r.flops_per_item else '-')
      peak = '-' if r.peak_bytes is None else (
          f'{"" if r.peak_exact else "~"}{r.peak_bytes / GIB:.2f} GiB')
      comp = '-' if r.compile_s is None else f'{r.compile_s:.1f} s'
      cells += [f'{r.value:.1f} {r.unit}'] + ratios + [mfu, peak, comp]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines + [''] + [f'- {n}' for n in notes]) + '\n'


def _measure(step: Callable[[], Any], sync: Callable[[Any], None], warmup: int,
             steps: int):
  """(seconds of the first call, mean seconds per call after ``warmup`` calls)."""
  start = time.perf_counter()
  sync(step())
  first = time.perf_counter() - start
  out = None
  for _ in range(warmup - 1):
    out = step()
  sync(out)
  start = time.perf_counter()
  for _ in range(steps):
    out = step()
  sync(out)
  return first, (time.perf_counter() - start) / steps


def _log(message: str) -> None:
  print(f'[{time.perf_counter() - _START:6.1f} s] {message}', flush=True)


def _error_status(e: Exception) -> str:
  text = f'{type(e).__name__}: {e}'
  if 'RESOURCE_EXHAUSTED' in text or 'out of memory' in text.lower():
    return 'OOM'
  return 'error: ' + ' '.join(text.split())[:100].replace('|', '/')


# ---------------------------------------------------------------- diffusers + peft
class TorchBench:
  """diffusers' UNet2DConditionModel with peft LoRAs, as diffusers' training scripts
  use them: bf16 frozen weights, fp32 LoRA params, autocast, SDPA attention."""

  def __init__(self, args, shapes: Shapes):
    import diffusers  # pylint: disable=g-import-not-at-top
    import peft  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    self.torch, self.diffusers, self.peft = torch, diffusers, peft
    self.args, self.shapes = args, shapes
    self.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    self.dtype = getattr(torch, args.dtype)
    self.cuda = self.device == 'cuda'
    torch.backends.cudnn.benchmark = True
    if args.tiny and not self.cuda:  # tiny ops: threads only contend (shared CPUs)
      torch.set_num_threads(1)
    torch.manual_seed(0)

  def versions(self) -> str:
    t = self.torch
    where = t.cuda.get_device_name() if self.cuda else 'CPU'
    return (f'torch {t.__version__}, diffusers {self.diffusers.__version__}, '
            f'peft {self.peft.__version__} on {where}')

  def _sync(self, _=None):
    if self.cuda:
      self.torch.cuda.synchronize()

  def _unet(self):
    with self.torch.device(self.device):
      model = self.diffusers.UNet2DConditionModel(**self.shapes.unet)
    return model.to(dtype=self.dtype)

  def _compile(self, model, compiled):
    if not compiled:
      return model
    return self.torch.compile(model, mode=self.args.torch_compile_mode, dynamic=False)

  def _reset_peak(self):
    gc.collect()
    if self.cuda:
      self.torch.cuda.empty_cache()
      self.torch.cuda.reset_peak_memory_stats()

  def _peak(self):
    return float(self.torch.cuda.max_memory_allocated()) if self.cuda else None

  def cleanup(self):
    self.torch._dynamo.reset()  # pylint: disable=protected-access
    gc.collect()
    if self.cuda:
      self.torch.cuda.empty_cache()

  def lora_train(self, row: Row, batch: int, compiled: bool):
    torch, args, s = self.torch, self.args, self.shapes
    model = self._unet()
    model.requires_grad_(False)
    model.add_adapter(self.peft.LoraConfig(
        r=args.rank, lora_alpha=args.rank, init_lora_weights='gaussian',
        target_modules=list(ATTN_TARGETS)))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # diffusers' cast_training_params: fp32 master LoRA weights
      p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=1e-2)
    net = self._compile(model, compiled)
    scheduler = self.diffusers.DDPMScheduler.from_config(diffusion.SD15_SCHEDULER_CONFIG)
    latents = torch.randn(batch, s.unet['in_channels'], s.latent, s.latent,
                          device=self.device)
    text = torch.randn(batch, s.text_len, s.text_dim, device=self.device,
                       dtype=self.dtype)

    def step():
      noise = torch.randn_like(latents)
      t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,),
                        device=self.device)
      noisy = scheduler.add_noise(latents, noise, t)
      with torch.autocast(self.device, dtype=self.dtype,
                          enabled=self.dtype != torch.float32):
        pred = net(noisy, t, text, return_dict=False)[0]
      loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
      loss.backward()
      torch.nn.utils.clip_grad_norm_(params, 1.0)
      opt.step()
      opt.zero_grad(set_to_none=True)

    self._reset_peak()
    first, per_step = _measure(step, self._sync, args.warmup, args.steps)
    row.value = batch / per_step
    row.compile_s = first - per_step if compiled else None
    row.peak_bytes = self._peak()

  def sample(self, row: Row, images: int, compiled: bool):
    torch, args, s = self.torch, self.args, self.shapes
    model = self._unet()
    model.requires_grad_(False)
    model.add_adapter(self.peft.LoraConfig(
        r=args.rank, lora_alpha=args.rank, init_lora_weights='gaussian',
        target_modules=CROSS_ATTN_REGEX))
    model.to(dtype=self.dtype).eval()
    net = self._compile(model, compiled)
    scheduler = self.diffusers.DDIMScheduler.from_config(diffusion.SD15_SCHEDULER_CONFIG)
    x_T = torch.randn(images, s.unet['in_channels'], s.latent, s.latent,
                      device=self.device)
    text = torch.randn(2 * images, s.text_len, s.text_dim, device=self.device,
                       dtype=self.dtype)  # (uncond, cond), as the pipeline

    @torch.inference_mode()
    def run():
      scheduler.set_timesteps(args.sample_steps, device=self.device)
      x = x_T
      for t in scheduler.timesteps:
        out = net(torch.cat([x, x]).to(self.dtype), t, text, return_dict=False)[0]
        uncond, cond = out.float().chunk(2)
        eps = uncond + args.guidance * (cond - uncond)
        x = scheduler.step(eps, t, x, return_dict=False)[0]
      return x

    self._reset_peak()
    first, per_run = _measure(run, self._sync, 1, args.sample_runs)
    row.value = 2 * images * args.sample_steps / per_run
    row.compile_s = first - per_run if compiled else None
    row.peak_bytes = self._peak()


# ---------------------------------------------------------------- ours
# What our jax.nn.dot_product_attention calls use (see _use_attention), and the
# calls or configs that fell back from cuDNN to XLA.
_ATTENTION = {'implementation': None, 'fallbacks': []}


def _use_attention(implementation: str) -> None:
  """Makes every jax.nn.dot_product_attention call use ``implementation``.

  The UNet and the CLIP tower call jax.nn.dot_product_attention without naming an
  implementation, and JAX then picks XLA's (which writes the [B, heads, 4096, 4096]
  logits at 64x64 latents) rather than cuDNN's fused flash attention. A call that
  cuDNN refuses while tracing (dtype, head dim) stays on XLA's, and is noted.
  """
  first = _ATTENTION['implementation'] is None
  _ATTENTION['implementation'] = None if implementation == 'default' else implementation
  if not first:
    return
  original = jax.nn.dot_product_attention

  @functools.wraps(original)
  def attention(query, key, value, *args, **kwargs):
    implementation = _ATTENTION['implementation']
    if kwargs.get('implementation') is not None or implementation is None:
      return original(query, key, value, *args, **kwargs)
    if implementation == 'cudnn' and unet_lib.attention_implementation(
        query.dtype, query.shape[-1], query.shape[-3], key.shape[-3]) != 'cudnn':
      # cuDNN's backward refuses these lengths (the ViT's 257 tokens, the 77 text
      # tokens), and it fails under jax.grad/scan where the except below cannot see it.
      return original(query, key, value, *args, **kwargs)
    try:
      return original(query, key, value, *args, implementation=implementation, **kwargs)
    except (NotImplementedError, ValueError, RuntimeError) as e:
      note = f'{jnp.shape(query)} {jnp.result_type(query)}: {type(e).__name__}: {e}'
      if note not in _ATTENTION['fallbacks']:
        _ATTENTION['fallbacks'].append(note)
        _log(f'attention {implementation} refused {note}; using XLA for it')
      return original(query, key, value, *args, **kwargs)

  jax.nn.dot_product_attention = attention


def _jax_peak() -> Optional[int]:
  stats = jax.local_devices()[0].memory_stats()
  return stats.get('peak_bytes_in_use') if stats else None


def _planned_bytes(compiled) -> Optional[float]:
  """XLA's own plan for an executable: live arguments, outputs and temporaries."""
  try:
    m = compiled.memory_analysis()
    return float(m.argument_size_in_bytes + m.output_size_in_bytes
                 - m.alias_size_in_bytes + m.temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    return None


def _flops(fn, *args) -> Optional[float]:
  """XLA's FLOP count of fn(*args) (arrays or ShapeDtypeStructs), unoptimized HLO."""
  lowered = jax.jit(fn).lower(*args)
  for stage in (lowered.cost_analysis, lambda: lowered.compile().cost_analysis()):
    try:
      cost = stage()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      return float(cost['flops'])
    except Exception as e:  # pylint: disable=broad-except
      print(f'XLA cost analysis: {type(e).__name__}: {e}')
  return None


def _random_params(shapes, seed: int, dtype=None):
  """Random params of these shapes, made on the host in a few seconds (a jitted
  init of the SD UNet compiles for longer; throughput does not depend on values).

  Kernels ~ N(0, 1 / fan_in), cut from one pool of normals at random offsets;
  LayerNorm/GroupNorm scales 1; biases and the rest 0.
  """
  rng = np.random.default_rng(seed)
  pool = rng.standard_normal(2 ** 22, np.float32)
  scaled = functools.cache(lambda fan_in, dt: (pool * fan_in ** -0.5).astype(dt))

  def leaf(path, shape):
    dt = np.dtype(dtype or shape.dtype)
    if len(shape.shape) >= 2:
      src = scaled(int(np.prod(shape.shape[:-1])), dt)
      value = np.resize(src[rng.integers(len(src)):], shape.shape)
    else:
      name = getattr(path[-1], 'key', '')
      value = np.full(shape.shape, 1 if name == 'scale' else 0, dt)
    return jnp.asarray(value)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


class JaxBench:
  """Our UNet (frozen, shared by every config), hypernetwork and train step."""

  def __init__(self, args, shapes: Shapes):
    self.args, self.shapes = args, shapes
    self.dtype = jnp.dtype(args.dtype)
    self.module = unet_lib.from_config(shapes.unet, dtype=self.dtype)
    self.schedule = diffusion.load_schedule()  # SD1.5's
    shapes_ = jax.eval_shape(lambda: self.module.init(
        jax.random.key(0), *self.module.dummy_inputs())['params'])
    self.unet_params = _random_params(shapes_, 0, args.unet_param_dtype)
    self.config = defaults.get_config('hyperlora')
    c = self.config
    c.train.remat = args.remat
    if args.encoder_remat:
      c.hypernet.encoder.remat = args.encoder_remat
    c.lora.update(rank=args.rank, alpha=float(args.rank))
    c.hypernet.encoder.update(kind='vit', vit=dict(shapes.vit))
    c.hypernet.decoder.update(kind='transformer', **shapes.decoder)
    c.hypernet.param.update(kind='plain', rank=args.rank)
    self.hyper_flops = None  # XLA's count of one hypernetwork forward, per image

  # --- pieces
  def unet_flops(self) -> Optional[float]:
    s = self.shapes
    params = jax.eval_shape(lambda: self.unet_params)
    x = jax.ShapeDtypeStruct((1, s.latent, s.latent, s.unet['in_channels']), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    text = jax.ShapeDtypeStruct((1, s.text_len, s.text_dim), self.dtype)
    return _flops(lambda p, x, t, c: self.module.apply({'params': p}, x, t, c),
                  params, x, t, text)

  def _hypernet(self, targets):
    """(module, fp32 params) with a --dtype ViT tower."""
    tower = clip.vision_from_config(self.shapes.vit, dtype=self.dtype)
    net = hypernet.build(self.config.hypernet, targets, tower)
    size = self.shapes.vit['image_size']
    images = jnp.zeros((1, size, size, 3))
    variables = jax.eval_shape(net.init, jax.random.key(2), images)
    assert set(variables) == {'params'}, 'plain LoRA has no aux variables'
    params = _random_params(variables['params'], 2)
    if self.hyper_flops is None:
      self.hyper_flops = _flops(lambda p, x: net.apply({'params': p}, x), params, images)
    return net, params

  def _batch(self, batch: int, rng=3):
    s = self.shapes
    k1, k2, k3 = jax.random.split(jax.random.key(rng), 3)
    size = s.vit['image_size']  # context images at the tower's size: no resize
    return {
        'latents': jax.random.normal(k1, (batch, s.latent, s.latent, s.unet['in_channels'])),
        'text': jax.random.normal(k2, (batch, s.text_len, s.text_dim), self.dtype),
        'images': jax.random.uniform(k3, (batch, size, size, 3), minval=-1, maxval=1),
    }

  def _eps_loss(self, unet_params, lora, batch, rng):
    """The objectives' diffusion loss on given latents and text states: eps MSE, random t."""
    rng_t, rng_noise = jax.random.split(rng)
    x0 = batch['latents']
    t = diffusion.random_timesteps(rng_t, self.schedule, x0.shape[0])
    noise = jax.random.normal(rng_noise, x0.shape, x0.dtype)
    pred = self.module.apply({'params': unet_params},
                             diffusion.add_noise(self.schedule, x0, noise, t), t,
                             batch['text'], lora=lora)
    target = diffusion.training_target(self.schedule, x0, noise, t)
    return diffusion.diffusion_loss(pred, target, t, self.schedule).mean()

  def _run_train(self, row: Row, name: str, loss_fn, trainable, batch):
    """Compiles train.make_train_step (state donated) and times it."""
    args, config = self.args, self.config
    tx, lr = train.make_optimizer(config.optim, config.train.num_steps)
    step = jax.jit(train.make_train_step(loss_fn, tx, lr, config, mesh=None),
                   donate_argnums=(0,))
    state = jax.jit(functools.partial(train.init_state, tx=tx, ema=False))(trainable)
    del trainable
    frozen = {'unet': self.unet_params}
    rng = jax.random.key_data(jax.random.key(4))
    start = time.perf_counter()
    compiled = step.lower(state, frozen, batch, rng).compile()
    row.compile_s = time.perf_counter() - start
    holder = [state]
    del state

    def one():
      holder[0], metrics = compiled(holder[0], frozen, batch, rng)
      return metrics['loss']

    _, per_step = _measure(one, jax.block_until_ready, args.warmup, args.steps)
    row.value = batch['latents'].shape[0] / per_step
    planned = _planned_bytes(compiled)
    if args.profile_dir:
      self._profile(name, one)
    return planned

  def _profile(self, name: str, fn):
    # The perfetto JSON beside the xplane is what benchmarks/trace_summary.py reads.
    with jax.profiler.trace(os.path.join(self.args.profile_dir, name),
                            create_perfetto_trace=True):
      for _ in range(1 if name.startswith('sample') else 2):
        out = fn()
      jax.block_until_ready(out)

  # --- configs
  def lora_train(self, row: Row, batch_size: int):
    targets = lora_lib.find_targets(self.unet_params, 'self_attn,cross_attn')
    trainable = lora_lib.init_plain(jax.random.key(1), targets, self.args.rank)
    scale = self.config.lora.alpha / self.config.lora.rank

    def loss_fn(trainable, frozen, batch, rng):
      lora = {path: dict(f, scale=scale) for path, f in trainable.items()}
      return self._eps_loss(frozen['unet'], lora, batch, rng), {}

    batch = self._batch(batch_size)
    del batch['images']
    return self._run_train(row, row.config, loss_fn, trainable, batch)

  def hyper_train(self, row: Row, batch_size: int):
    targets = lora_lib.find_targets(self.unet_params, 'cross_attn')
    net, trainable = self._hypernet(targets)

    def loss_fn(trainable, frozen, batch, rng):
      tree = net.apply({'params': trainable}, batch['images'])
      return self._eps_loss(frozen['unet'], tree, batch, rng), {}

    return self._run_train(row, row.config, loss_fn, trainable, self._batch(batch_size))

  def sample(self, row: Row, images: int):
    args, s = self.args, self.shapes
    targets = lora_lib.find_targets(self.unet_params, 'cross_attn')
    net, hyper_params = self._hypernet(targets)
    batch = self._batch(images)
    uncond = jax.random.normal(jax.random.key(5), (images, s.text_len, s.text_dim),
                               self.dtype)
    x_T = diffusion.init_noise(jax.random.key(6), batch['latents'].shape)

    def sample_fn(unet_params, hyper_params, context_images, text, uncond, x_T):
      tree = net.apply({'params': hyper_params}, context_images)  # a LoRA per image
      # The doubled (uncond, cond) batch: each image's LoRA on both of its halves.
      tree = jax.tree.map(lambda a: jnp.concatenate([a, a]) if a.ndim else a, tree)
      text2 = jnp.concatenate([uncond, text])
      model_fn = lambda x, t: self.module.apply({'params': unet_params}, x, t, text2,
                                                lora=tree)
      return diffusion.sample(model_fn, self.schedule, x_T, args.sample_steps, 'ddim',
                              guidance_scale=args.guidance)

    inputs = (self.unet_params, hyper_params, batch['images'], batch['text'], uncond, x_T)
    start = time.perf_counter()
    compiled = jax.jit(sample_fn).lower(*inputs).compile()
    row.compile_s = time.perf_counter() - start
    run = lambda: compiled(*inputs)
    _, per_run = _measure(run, jax.block_until_ready, 1, args.sample_runs)
    row.value = 2 * images * args.sample_steps / per_run
    if args.profile_dir:
      self._profile(row.config, run)
    return _planned_bytes(compiled)


def _run_ours(row: Row, fn, *fn_args):
  """Runs one of our configs; its peak is the process peak if this config raised it,
  else (an earlier config set the peak) XLA's plan for its executable."""
  before = _jax_peak()
  try:
    try:
      planned = fn(row, *fn_args)
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      if _ATTENTION['implementation'] != 'cudnn' or _error_status(e) == 'OOM':
        raise
      # cuDNN attention failed to compile or run: this and later configs use XLA's.
      _ATTENTION['fallbacks'].append(f'{row.config} and later: {_error_status(e)}')
      _log(f'{row.config} failed with cuDNN attention; again with XLA attention')
      _use_attention('xla')
      row.impl += ', XLA attention'
      gc.collect()
      planned = fn(row, *fn_args)
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc()
    row.value, row.status = None, _error_status(e)
    return
  finally:
    gc.collect()
  after = _jax_peak()
  if after is not None and (before is None or after > before):
    row.peak_bytes = float(after)
  elif planned is not None and after is not None:
    row.peak_bytes, row.peak_exact = planned, False


def _run_torch(bench: TorchBench, row: Row, fn, *fn_args):
  try:
    fn(row, *fn_args)
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc()
    row.value, row.status = None, _error_status(e)
  finally:
    bench.cleanup()


# ---------------------------------------------------------------- main
def run(args):
  """Runs the selected rows; returns (rows, notes)."""
  if args.xla_flags:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + args.xla_flags).strip()
  if args.tiny and 'XLA_FLAGS' not in os.environ:  # nothing to measure: compile fast
    os.environ['XLA_FLAGS'] = ('--xla_backend_optimization_level=0 '
                               '--xla_llvm_disable_expensive_passes=true')
  device = jax.local_devices()[0]  # starts JAX's backend before torch loads CUDA
  attention = args.attention
  if attention == 'auto':
    attention = 'cudnn' if device.platform == 'gpu' else 'xla'
  _use_attention(attention)
  shapes = _shapes(args)
  rows = []
  notes = [f'JAX {jax.__version__} on {device.device_kind} ({device.platform}), Python '
           f'{platform.python_version()}, XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}.']
  hyper_cfg, sample_cfg = f'hyper_b{args.hyper_batch}', f'sample_{args.sample_images}'

  # diffusers first: their memory is given back before JAX takes its own.
  torch_bench = None
  if not args.skip_torch:
    try:
      torch_bench = TorchBench(args, shapes)
      notes.append(torch_bench.versions() + '.')
    except Exception as e:  # pylint: disable=broad-except
      print(f'diffusers/peft rows skipped: cannot import them ({e}).')
      notes.append(f'diffusers rows skipped: import failed ({type(e).__name__}: {e}).')
  if torch_bench is not None:
    compile_skip = ('skipped (flag)' if args.skip_compile_torch else
                    None if torch_bench.cuda else 'skipped (CPU)')
    jobs = []
    if 'lora' in args.only:
      jobs += [(f'lora_b{b}', torch_bench.lora_train, b) for b in args.batch_sizes]
    if 'sample' in args.only:
      jobs.append((sample_cfg, torch_bench.sample, args.sample_images))
    for compiled in (False, True):
      for config, fn, n in jobs:
        row = _row(config, COMPILED if compiled else EAGER, args)
        rows.append(row)
        if compiled and compile_skip:
          row.status = compile_skip
          continue
        _log(f'{config}: {row.impl} ...')
        _run_torch(torch_bench, row, fn, n, compiled)
        _log(f'{config}: {row.impl}: {row.value or row.status}')
        _save(args, rows, notes)

  # Ours, in the order of their expected peaks (smallest first), so that each
  # config's process peak is its own.
  bench = JaxBench(args, shapes)
  xla_unet_flops = bench.unet_flops()
  _log(f'our UNet built; XLA counts {xla_unet_flops} FLOPs per forward at batch 1')
  unet_flops = xla_unet_flops if args.tiny else args.unet_flops
  jobs = []
  if 'sample' in args.only:
    jobs.append((_row(sample_cfg, OURS_SAMPLE, args), bench.sample, args.sample_images))
  if 'lora' in args.only:
    jobs += [(_row(f'lora_b{b}', OURS, args), bench.lora_train, b)
             for b in sorted(args.batch_sizes)]
  if 'hyper' in args.only:
    jobs.append((_row(hyper_cfg, OURS, args), bench.hyper_train, args.hyper_batch))
  for row, fn, n in jobs:
    _log(f'{row.config}: {row.impl} ...')
    _run_ours(row, fn, n)
    _log(f'{row.config}: {row.impl}: {row.value or row.status}')
    rows.append(row)
    _save(args, rows, notes)

  # FLOPs per item: an image for training, a UNet evaluation for sampling.
  for row in rows:
    if unet_flops:
      row.flops_per_item = unet_flops if row.unit == 'evals/s' else 2 * unet_flops
      if row.config.startswith('hyper') and bench.hyper_flops:
        row.flops_per_item += 3 * bench.hyper_flops  # trainable: fwd + 2x for bwd
  tflop = lambda f: f'{f / 1e12:.3g} TFLOP' if f else 'n/a'
  d = shapes.decoder
  notes += [
      f'UNet {"tiny" if args.tiny else "SD1.5"} with random weights: latents '
      f'{shapes.latent}x{shapes.latent}x4, text {shapes.text_len}x{shapes.text_dim}, '
      f'{args.dtype} compute; our frozen UNet params stored as {args.unet_param_dtype}; '
      f'our attention: jax.nn.dot_product_attention(implementation={attention!r}); '
      f'remat={args.remat!r}, ViT encoder remat='
      f'{bench.config.hypernet.encoder.remat!r}.' + _fallback_note(),
      f'LoRA rows: rank {args.rank} (alpha {args.rank}) on to_q/to_k/to_v/to_out of every '
      f'self- and cross-attention, eps MSE at random timesteps, AdamW + grad-norm clip '
      f'1.0; diffusers as its train_text_to_image_lora.py ({args.dtype} frozen weights, fp32 '
      f'LoRA, autocast, SDPA). HyperLoRA: ViT encoder {shapes.vit["num_hidden_layers"]}x'
      f'{shapes.vit["hidden_size"]} at {shapes.vit["image_size"]}px (trainable) + '
      f'transformer decoder (width {d["width"]}, depth {d["depth"]}, {d["rounds"]} '
      f'rounds) -> a per-sample rank-{args.rank} LoRA on every cross-attention '
      f'projection; its ratios are against the plain-LoRA rows at the same batch.',
      f'Sampling: DDIM-{args.sample_steps}, guidance {args.guidance}; ours: one jit with '
      f'the hypernetwork (a LoRA per image) and a lax.scan over steps; diffusers: its '
      f'UNet in a Python loop with DDIMScheduler and one shared, unfused peft LoRA on '
      f'the cross-attention projections. Evaluations/s = 2 (CFG) x images x steps / s.',
      f'MFU = throughput x FLOPs per item / {args.peak_flops:.4g} FLOP/s. UNet forward at '
      f'batch 1: {tflop(unet_flops)} ({"XLA count" if args.tiny else "torch FLOP counter"}'
      f'; XLA counts {tflop(xla_unet_flops)}). A LoRA step = 2 forwards per image '
      f'(frozen-weight backward ~ one forward), a sampling evaluation = 1; HyperLoRA adds '
      f'3x the hypernetwork forward ({tflop(bench.hyper_flops)} per image, XLA count).',
      'Peak memory: torch.cuda.max_memory_allocated per row; ours: device.memory_stats()'
      "['peak_bytes_in_use'], or (~) XLA's plan for the executable where an earlier "
      'config had set the process peak. JAX may take up to '
      f'{_mem_fraction()} of the card (XLA_CLIENT_MEM_FRACTION), without preallocation.',
      f'Compile: ours = trace + lower + XLA compile; torch = first call minus a steady '
      f'one (torch.compile mode {args.torch_compile_mode!r}, dynamic=False). Timed: '
      f'{args.steps} train steps after {args.warmup} warmup, {args.sample_runs} sampling '
      f'runs after 1.',
  ]
  return rows, notes


def _save(args, rows, notes) -> None:
  """Writes --json now: a run cut short (a device call's time limit) keeps its rows."""
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'rows': [dataclasses.asdict(r) for r in rows], 'notes': notes}, f,
                indent=1)


def _mem_fraction() -> str:
  return next((os.environ[v] for v in _MEM_FRACTION_VARS if os.environ.get(v)), '0.75')


def _fallback_note() -> str:
  falls = _ATTENTION['fallbacks']
  if not falls:
    return ''
  more = f' and {len(falls) - 3} more' if len(falls) > 3 else ''
  return f' Fell back to XLA attention for: {"; ".join(falls[:3])}{more}.'


def _merge(paths):
  """Rows and notes of several --json files; a later file's row (same config and
  implementation) and note (same first 12 characters) replace an earlier one's."""
  rows, notes = {}, {}
  for path in paths:
    with open(path) as f:
      data = json.load(f)
    for r in data['rows']:
      rows[(r['config'], r['impl'])] = Row(**r)
    for note in data['notes']:
      notes[note[:12]] = note
  return list(rows.values()), list(notes.values())


def main(argv=None):
  args = parse_args(argv)
  if args.merge:
    rows, notes = _merge(args.merge.split(','))
  else:
    rows, notes = run(args)
  _save(args, rows, notes)
  table = format_table(rows, notes, args.peak_flops)
  print('\n' + table)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(table)
  return rows


if __name__ == '__main__':
  main()
