r"""Throughput and latency of hyperlora_jax against PyTorch, side by side, in one process.

Random weights (speed depends on shapes, not values), bf16 compute. Sections (``--only``):

* ``lora``: one LoRA training step on the SD1.5-shaped UNet (64x64 latents, 77x768
  text; rank-4 LoRA on to_q/to_k/to_v/to_out.0 of every attention, eps MSE at random
  timesteps, AdamW with grad clipping) at each of ``--batch_sizes``: diffusers + peft
  eager and torch.compile'd, and ours (`train.make_train_step` under jax.jit, state
  donated).
* ``hyper``: the HyperLoRA step at ``--hyper_batch``: a trainable CLIP ViT-L/14-shaped
  encoder and a transformer decoder predict a per-sample LoRA for the cross-attention
  projections, trained through the frozen UNet. Ours against the same step in PyTorch
  (`benchmarks/torch_peer.py`: transformers' CLIPVisionModel, a torch decoder of our
  decoder's size, diffusers' UNet with a per-sample LoRA attention processor), eager
  and compiled; a note also compares it with diffusers' plain LoRA step at that batch.
* ``sample``: DDIM-50 with classifier-free guidance for ``--sample_images`` images. Ours:
  the hypernetwork predicts a LoRA per image and `diffusion.sample` runs all steps in
  one jit; diffusers: its UNet in a Python loop with DDIMScheduler and one shared
  (unfused) peft LoRA.
* ``latency``: one personalized image at batch 1, text tower and VAE included on both
  sides: context image -> LoRA -> DDIM-50 + CFG -> decoded 512 px image. Both load one
  random-weight SD1.5 folder written here. Ours: `sample.generate` (one compiled call:
  the hypernetwork, the text tower, the sampler loop, the VAE decoder); diffusers:
  StableDiffusionPipeline with one LoRA (a diffusers file that our writer made) loaded,
  fused and unloaded, eager and with the UNet and the VAE decoder under
  torch.compile(mode=``--latency_compile_mode``, default 'reduce-overhead': CUDA graphs).
* ``latency_parts``: ours at batch 1 split into its parts, each jitted and timed alone
  (the hypernetwork, the text tower, the sampler loop with the per-sample LoRA, merged,
  without it and with fp32-stored weights, one UNet evaluation, the merge, the VAE
  decoder), to show where the batch-1 time goes.
* ``sdxl_lora``, ``sdxl_sample``: the ``lora`` and ``sample`` rows on the SDXL-shaped
  UNet (`defaults.SDXL_UNET`; 1024 px: 128x128 latents, 77x2048 text, pooled text
  embeds and time ids) at ``--sdxl_batch_sizes`` and for ``--sdxl_sample_images``
  images with DDIM-``--sdxl_sample_steps``.

Every row reports throughput (images/s for training, UNet evaluations/s for sampling:
samples in the UNet batch x steps / s) or latency (ms), the ratio to PyTorch compiled
and eager of the same config measured by the same run, MFU, peak device memory and
compile time. All torch rows run first and free their memory; then ours, in the same
process or, with ``--torch_in_child``, with the torch rows measured in a child process
of their own (our SDXL LoRA step measured 19.2 img/s after the torch rows in one
process and 25.8 alone on another H200, BENCHMARKS.md). Usage (see
benchmarks/README.md, which has the GPU runbook):

  python benchmarks/gpu_benchmark.py --only=lora,hyper --out=/tmp/bench.md
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
import math
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from hyperlora_jax import defaults  # pylint: disable=g-import-not-at-top,wrong-import-position
from hyperlora_jax import diffusion
from hyperlora_jax import lora as lora_lib
from hyperlora_jax import cli, objectives, runs, sample, train
from hyperlora_jax.convert import clip_folders, lora_files, pipeline
from hyperlora_jax.models import clip, hypernet
from hyperlora_jax.models import unet as unet_lib
from hyperlora_jax.models import vae as vae_lib

GIB = 2 ** 30
_START = time.perf_counter()
# Which process measured a row: ratios are only taken between rows of one process.
_PROCESS = f'{platform.node()}:{os.getpid()}:{int(time.time())}'
ATTN_TARGETS = ('to_q', 'to_k', 'to_v', 'to_out.0')  # peft names; ours: lora.TARGET_SETS
CROSS_ATTN_REGEX = r'.*attn2\.(to_q|to_k|to_v|to_out\.0)'
SECTIONS = ('lora', 'hyper', 'sample', 'latency', 'latency_parts', 'sdxl_lora', 'sdxl_sample')
SDXL_SECTIONS = ('sdxl_lora', 'sdxl_sample')
_PEFT = ('diffusers+peft eager', 'diffusers+peft compiled')
TORCH_IMPLS = {'lora': _PEFT, 'sample': _PEFT, 'sdxl_lora': _PEFT, 'sdxl_sample': _PEFT,
               'hyper': ('PyTorch peer eager', 'PyTorch peer compiled'),
               'latency': ('diffusers eager', 'diffusers compiled')}
OURS = {'lora': 'ours (jax.jit)', 'sdxl_lora': 'ours (jax.jit)', 'hyper': 'ours (jax.jit)',
        'sample': 'ours (per-sample LoRAs)', 'sdxl_sample': 'ours (per-sample LoRAs)',
        'latency': 'ours (sample.generate)'}
UNITS = {'sample': 'evals/s', 'sdxl_sample': 'evals/s', 'latency': 'ms', 'latency_parts': 'ms'}

# SD1.5's text tower (CLIP ViT-L/14's) and VAE, for the latency rows' folder.
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, hidden_act='quick_gelu', vocab_size=49408,
                 projection_dim=768)
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                down_block_types=('DownEncoderBlock2D',) * 4,
                up_block_types=('UpDecoderBlock2D',) * 4, latent_channels=4,
                norm_num_groups=32, scaling_factor=0.18215)
PROMPT = 'a photo of a person wearing a red hat in a garden'  # the latency rows'
LORA_FILE = 'lora.safetensors'  # beside the latency folder's parts


# ---------------------------------------------------------------- shapes and flags
@dataclasses.dataclass(frozen=True)
class Shapes:
  name: str  # SD1.5, SDXL, or their tiny stand-ins
  unet: dict  # a diffusers UNet2DConditionModel config
  latent: int  # latent height = width
  text_len: int
  vit: dict  # the hypernetwork's encoder (a CLIPVisionConfig dict)
  decoder: dict  # width, depth, heads, rounds of the transformer decoder
  text: dict  # the text tower (a CLIPTextConfig dict; latency rows)
  vae: dict  # an AutoencoderKL config (latency rows; SDXL's has SD1.5's shape)

  @property
  def text_dim(self) -> int:
    return self.unet['cross_attention_dim']

  @property
  def pooled_dim(self) -> int:
    """SDXL's pooled text embedding (0: no added conditioning)."""
    if self.unet.get('addition_embed_type') != 'text_time':
      return 0
    return (self.unet['projection_class_embeddings_input_dim']
            - unet_lib.NUM_TIME_IDS * self.unet['addition_time_embed_dim'])

  @property
  def pixels(self) -> int:
    return self.latent * 2 ** (len(self.vae['block_out_channels']) - 1)


def _shapes(args, family: str = 'sd15') -> Shapes:
  """The full-size shapes of a family ('sd15' | 'sdxl'), or tiny ones with --tiny."""
  decoder = dict(width=args.decoder_width, depth=args.decoder_depth,
                 heads=args.decoder_heads, rounds=args.decoder_rounds)
  xl = family == 'sdxl'
  if not args.tiny:
    if xl:
      return Shapes('SDXL', dict(defaults.SDXL_UNET), 128, 77, dict(defaults.VIT_L14),
                    decoder, {}, SD15_VAE)
    return Shapes('SD1.5', dict(defaults.SD15_UNET), 64, 77, dict(defaults.VIT_L14),
                  decoder, dict(SD15_TEXT, max_position_embeddings=77), SD15_VAE)
  unet = dict(defaults.tiny_unet(channels=(32, 64), cross_attention_dim=32, heads=2),
              in_channels=4, out_channels=4)
  if xl:  # SDXL's layout in miniature: linear projections, deeper transformers below,
    # text_time conditioning from a 16-wide pooled embedding and 6 time ids x 8.
    unet.update(use_linear_projection=True, transformer_layers_per_block=(1, 2),
                addition_embed_type='text_time', addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=16 + 6 * 8)
  vit = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
             num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16)
  text = dict(defaults.tiny_text(width=32, layers=1, heads=2), max_position_embeddings=8)
  vae = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
             down_block_types=('DownEncoderBlock2D',) * 2,
             up_block_types=('UpDecoderBlock2D',) * 2, latent_channels=4)
  return Shapes('tiny SDXL' if xl else 'tiny', unet, 16, 8, vit, decoder, text, vae)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--tiny', action='store_true',
                 help='tiny shapes and few iterations (CPU smoke test); no MFU meaning')
  p.add_argument('--only', default=','.join(SECTIONS),
                 help=f'comma list of sections: {", ".join(SECTIONS)}')
  p.add_argument('--skip_torch', action='store_true', help='no PyTorch rows')
  p.add_argument('--skip_ours', action='store_true', help='no rows of ours')
  p.add_argument('--latency_folder', default='',
                 help="where the latency rows' random SD pipeline is written unless it is "
                      'there, and kept (default: a temporary folder, removed at the end)')
  p.add_argument('--torch_in_child', action='store_true',
                 help='measure the PyTorch rows in a child process of their own first '
                      '(this script with --skip_ours), then ours in a fresh process: '
                      "neither side's leftovers (compile workers, CUDA caches) in the "
                      "other's process")
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
  p.add_argument('--latency_steps', type=int, default=None, help='DDIM steps (50; tiny 2)')
  p.add_argument('--latency_runs', type=int, default=None,
                 help='timed batch-1 images (5; tiny 1)')
  p.add_argument('--latency_warmup', type=int, default=None,
                 help='untimed images first; CUDA graphs record in the 2nd (3; tiny 1)')
  p.add_argument('--latency_compile_mode', default='reduce-overhead',
                 help="torch.compile mode of the compiled diffusers latency row")
  p.add_argument('--sdxl_batch_sizes', default=None, help='SDXL LoRA step batches (4,8; tiny 2)')
  p.add_argument('--sdxl_sample_images', type=int, default=None, help='(4; tiny 2)')
  p.add_argument('--sdxl_sample_steps', type=int, default=None, help='DDIM steps (30; tiny 2)')
  p.add_argument('--rank', type=int, default=4, help='LoRA rank (alpha = rank)')
  p.add_argument('--decoder_width', type=int, default=None, help='(512; tiny 32)')
  p.add_argument('--decoder_depth', type=int, default=None, help='(4; tiny 1)')
  p.add_argument('--decoder_heads', type=int, default=None, help='(8; tiny 2)')
  p.add_argument('--decoder_rounds', type=int, default=None, help='(2; tiny 1)')
  p.add_argument('--peak_flops', type=float, default=989e12,
                 help='device peak for MFU: 989e12 = H100/H200 SXM dense bf16')
  p.add_argument('--dtype', default=None,
                 help='compute dtype of both sides (bfloat16; tiny float32: XLA on CPU '
                      'compiles bf16 twice as slowly)')
  p.add_argument('--unet_param_dtype', default=None,
                 help="how our frozen base weights are stored (default: --dtype, as "
                      "diffusers' frozen weights)")
  p.add_argument('--attention', default='auto', choices=('auto', 'cudnn', 'xla', 'default'),
                 help="jax.nn.dot_product_attention: auto/cudnn = cuDNN's fused attention "
                      'where it applies on a GPU (the UNet names its own), xla = XLA\'s '
                      "everywhere, default = JAX's choice where a call names none")
  p.add_argument('--remat', default='none',
                 help="our train.remat: none, full or a jax.checkpoint_policies name")
  p.add_argument('--encoder_remat', default=None,
                 help="the HyperLoRA ViT's hypernet.encoder.remat (default: the config's)")
  p.add_argument('--torch_compile_mode', default='default',
                 help='torch.compile mode of the training and sampling rows: default, '
                      'reduce-overhead, max-autotune')
  p.add_argument('--torch_checkpointing', action='store_true',
                 help="diffusers' UNet gradient checkpointing in the torch training rows")
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
  args.argv = list(sys.argv[1:] if argv is None else argv)  # the child's, --torch_in_child
  full = dict(dtype='bfloat16', batch_sizes='16,32', hyper_batch=32, steps=20,
              warmup=3, sample_images=16, sample_steps=50, sample_runs=2,
              latency_steps=50, latency_runs=5, latency_warmup=3, sdxl_batch_sizes='4,8',
              sdxl_sample_images=4, sdxl_sample_steps=30,
              decoder_width=512, decoder_depth=4, decoder_heads=8, decoder_rounds=2)
  tiny = dict(dtype='float32', batch_sizes='2,4', hyper_batch=2, steps=2, warmup=1,
              sample_images=2, sample_steps=3, sample_runs=1, latency_steps=2,
              latency_runs=1, latency_warmup=1, sdxl_batch_sizes='2',
              sdxl_sample_images=2, sdxl_sample_steps=2,
              decoder_width=32, decoder_depth=1, decoder_heads=2, decoder_rounds=1)
  for key, value in (tiny if args.tiny else full).items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  args.unet_param_dtype = args.unet_param_dtype or args.dtype
  for key in ('batch_sizes', 'sdxl_batch_sizes'):
    setattr(args, key, [int(b) for b in str(getattr(args, key)).split(',') if b])
  args.only = {s.strip() for s in args.only.split(',') if s.strip()}
  unknown = args.only - set(SECTIONS)
  if unknown:
    p.error(f'--only: unknown sections {sorted(unknown)}; choose from {", ".join(SECTIONS)}')
  if min(args.warmup, args.steps, args.sample_runs, args.latency_runs,
         args.latency_warmup) < 1:
    p.error('--warmup, --steps, --sample_runs, --latency_runs and --latency_warmup must '
            'be >= 1')
  return args


# ---------------------------------------------------------------- results
@dataclasses.dataclass
class Row:
  section: str  # one of SECTIONS
  config: str  # the rows compared with each other, e.g. lora_16, latency_1
  label: str  # what the table says for config
  impl: str
  unit: str  # img/s or evals/s (more is better), ms (less is better)
  baseline: str = ''  # 'eager' / 'compiled': a PyTorch row the config's others compare with
  process: str = ''  # which run measured it (ratios stay within one; a child's rows
  # under --torch_in_child take its parent's)
  value: Optional[float] = None
  flops_per_item: Optional[float] = None  # per image (or UNet evaluation for sampling)
  peak_bytes: Optional[float] = None
  peak_exact: bool = True  # False: XLA's plan for the executable, not a reading
  compile_s: Optional[float] = None
  status: str = ''  # why there is no value: skipped, OOM, error


def _label(section: str, n: int, args) -> str:
  return {
      'lora': f'LoRA train, batch {n}',
      'hyper': f'HyperLoRA train, batch {n}',
      'sample': f'DDIM-{args.sample_steps} + CFG, {n} images',
      'latency': f'1 image: context -> LoRA -> DDIM-{args.latency_steps} + CFG -> decoded',
      'latency_parts': 'ours at batch 1, by part',
      'sdxl_lora': f'SDXL LoRA train, batch {n}',
      'sdxl_sample': f'SDXL DDIM-{args.sdxl_sample_steps} + CFG, {n} images',
  }[section]


def _row(section: str, n: int, impl: str, args, baseline: str = '') -> Row:
  return Row(section, f'{section}_{n}', _label(section, n, args), impl,
             UNITS.get(section, 'img/s'), baseline, _PROCESS)


def _rate(row: Row) -> float:
  """Items per second: the throughput, or images per second of a latency."""
  return 1000 / row.value if row.unit == 'ms' else row.value


def _reference(rows, row: Row, baseline: str, config: Optional[str] = None) -> Optional[Row]:
  """The PyTorch row (``baseline``) of ``config`` (default: row's) from row's process."""
  for r in rows:
    if (r.config == (config or row.config) and r.baseline == baseline and r.value
        and r.process == row.process):
      return r
  return None


def _sort_key(row: Row):
  number = re.search(r'(\d+)$', row.config)
  return SECTIONS.index(row.section), int(number.group(1)) if number else 0


def _cross_notes(rows) -> list:
  """The HyperLoRA rows against diffusers' plain LoRA step at the same batch (issue 20's
  older target), where one process measured both."""
  notes = []
  for r in rows:
    if r.section == 'hyper' and not r.baseline and r.value:
      ref = _reference(rows, r, 'compiled', config='lora_' + r.config.split('_')[1])
      if ref:
        notes.append(f'{r.label}, {r.impl}: {r.value / ref.value:.2f}x {ref.impl}\'s plain '
                     f'LoRA step at that batch ({ref.value:.1f} img/s, same process).')
  return notes


def format_table(rows, notes, peak_flops: float) -> str:
  head = ('| config | implementation | throughput or latency | vs torch compiled | '
          'vs torch eager | MFU | peak memory | compile |')
  lines = [head, '|' + ' --- |' * 8]
  rows = sorted(rows, key=_sort_key)
  for r in rows:
    cells = [r.label, r.impl]
    if r.value is None:
      cells += [r.status or '-'] + ['-'] * 5
    else:
      ratios = []
      for baseline in ('compiled', 'eager'):
        ref = _reference(rows, r, baseline)
        ratios.append(f'{_rate(r) / _rate(ref):.2f}x' if ref else '-')
      mfu = (f'{100 * _rate(r) * r.flops_per_item / peak_flops:.3g}%'
             if r.flops_per_item else '-')
      peak = '-' if r.peak_bytes is None else (
          f'{"" if r.peak_exact else "~"}{r.peak_bytes / GIB:.2f} GiB')
      comp = '-' if r.compile_s is None else f'{r.compile_s:.1f} s'
      value = f'{r.value:.1f} {r.unit}' if r.unit != 'ms' else f'{r.value:.3g} ms'
      cells += [value] + ratios + [mfu, peak, comp]
    lines.append('| ' + ' | '.join(cells) + ' |')
  notes = list(notes) + _cross_notes(rows)
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


# ---------------------------------------------------------------- FLOPs
def _sub_jaxprs(value):
  if isinstance(value, jax_core.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, jax_core.Jaxpr):
    return [value]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def jaxpr_flops(jaxpr) -> float:
  """Model FLOPs as torch.utils.flop_counter counts them: 2 x multiply-adds of every
  matmul and convolution (an attention is its two matmuls); elementwise work is free.
  A scan counts its body ``length`` times, a cond its dearest branch."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    out = math.prod(eqn.outvars[0].aval.shape) if eqn.outvars else 0
    if name == 'dot_general':
      (contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += 2 * out * math.prod(lhs[i] for i in contract)
    elif name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval.shape  # per output: in-features / groups x kernel window
      total += 2 * out * math.prod(rhs[d] for d in eqn.params['dimension_numbers'].rhs_spec[1:])
    else:
      subs = [jaxpr_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v)]
      if name == 'cond':
        total += max(subs, default=0.0)
      else:
        total += eqn.params.get('length', 1) * sum(subs) if name == 'scan' else sum(subs)
  return total


def flops(fn, *args) -> float:
  """`jaxpr_flops` of fn(*args) (ShapeDtypeStructs do), traced, never compiled.

  Not XLA's cost analysis: `Lowered.cost_analysis()` is None on GPUs (a PJRT plugin;
  indexing it was the TypeError behind the old note's 0.00425 TFLOP per UNet forward),
  the compiled program's misses the cuBLAS/cuDNN custom calls that do the work, and
  neither counts a scan's body more than once.
  """
  return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def abstract_params(module, *inputs):
  inputs = inputs or module.dummy_inputs()
  return jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))['params']


def model_flops(shapes: Shapes, hypernet_config) -> dict:
  """Forward FLOPs per item of every model a section runs (float32 modules: their
  attention is XLA's matmuls, which the count sees; cuDNN's is one opaque call).

  'unet': one evaluation at batch 1; 'hypernet': per context image (its targets: every
  cross-attention projection); 'text': one prompt; 'vae_decoder': one image.
  """
  f32 = jax.ShapeDtypeStruct
  unet = unet_lib.from_config(shapes.unet)
  unet_params = abstract_params(unet)
  added = {}
  if shapes.pooled_dim:
    added = dict(text_embeds=f32((1, shapes.pooled_dim), jnp.float32),
                 time_ids=f32((1, unet_lib.NUM_TIME_IDS), jnp.float32))
  counts = {'unet': flops(
      lambda p, x, t, c, a: unet.apply({'params': p}, x, t, c, **a), unet_params,
      f32((1, shapes.latent, shapes.latent, shapes.unet['in_channels']), jnp.float32),
      f32((1,), jnp.int32), f32((1, shapes.text_len, shapes.text_dim), jnp.float32), added)}
  targets = lora_lib.find_targets(unet_params, 'cross_attn')
  net = hypernet.build(hypernet_config, targets, clip.vision_from_config(shapes.vit))
  size = shapes.vit['image_size']
  images = f32((1, size, size, 3), jnp.float32)
  counts['hypernet'] = flops(lambda p, x: net.apply({'params': p}, x),
                             abstract_params(net, jnp.zeros((1, size, size, 3))), images)
  if shapes.text:
    text = clip.text_from_config(shapes.text)
    counts['text'] = flops(lambda p, i: text.apply({'params': p}, i), abstract_params(text),
                           f32((1, shapes.text_len), jnp.int32))
  if shapes.text:  # the families whose latency rows run the whole pipeline
    vae = vae_lib.from_config(shapes.vae)
    latents = f32((1, shapes.latent, shapes.latent, shapes.vae['latent_channels']),
                  jnp.float32)
    counts['vae_decoder'] = flops(lambda p, z: vae_lib.decode_latents(vae, p, z),
                                  abstract_params(vae), latents)
  return counts


def _work(row: Row, counts: dict, args) -> Optional[float]:
  """FLOPs per item of a row, one accounting for both sides: a training image = 2 UNet
  forwards (a frozen-weight backward ~ one forward) + 3 hypernetwork forwards where it
  trains one; a sampling evaluation = 1 UNet forward; a batch-1 image = 2 x steps UNet
  forwards + 2 text-tower forwards + the VAE decoder (+ the hypernetwork: ours)."""
  unet = counts.get('unet')
  if row.section in ('lora', 'sdxl_lora'):
    return 2 * unet
  if row.section == 'hyper':
    return 2 * unet + 3 * counts['hypernet']
  if row.section in ('sample', 'sdxl_sample'):
    return unet
  if row.section == 'latency':
    image = 2 * args.latency_steps * unet + 2 * counts['text'] + counts['vae_decoder']
    return image + (0 if row.baseline else counts['hypernet'])
  return None


# ---------------------------------------------------------------- the latency rows' folder
def write_random_folder(folder: str, unet_config: dict, text_config: dict, vae_config: dict,
                        tokenizer: str) -> dict:
  """A diffusers SD folder (unet/, text_encoder/, tokenizer/ from the `tokenizer`
  folder, scheduler/, vae/) of random weights made on the host (`random_params`);
  returns the UNet's params."""
  modules = (unet_lib.from_config(unet_config), clip.text_from_config(text_config),
             vae_lib.from_config(vae_config))
  unet, text, vae = (random_params(abstract_params(m), seed, np.float32, host=True)
                     for seed, m in enumerate(modules))
  pipeline.save_pipeline(folder, unet, unet_config, text, text_config, tokenizer,
                         dict(diffusion.SD15_SCHEDULER_CONFIG))
  pipeline.save_model(vae, dict(vae_config, _class_name='AutoencoderKL'),
                      os.path.join(folder, 'vae'), pipeline.UNET_WEIGHTS)
  return unet


def write_random_pipeline(shapes: Shapes, folder: str, rank: int) -> str:
  """A diffusers SD folder with random weights (unet/, text_encoder/, tokenizer/,
  scheduler/, vae/) and, beside its parts, a random rank-``rank`` LoRA on every
  cross-attention projection as a diffusers file (our writer's): what both sides of
  the latency rows load. Host work only (no device is touched); returns the folder."""
  tokenizer = os.path.join(folder, 'tokenizer_source')
  clip_folders.write_tokenizer(PROMPT.split(), tokenizer, max_length=shapes.text_len)
  tok = clip_folders.load_tokenizer(tokenizer)
  text_config = dict(shapes.text, max_position_embeddings=shapes.text_len,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id)
  pipe = os.path.join(folder, 'pipeline')
  unet_params = write_random_folder(pipe, shapes.unet, text_config, shapes.vae, tokenizer)
  rng = np.random.default_rng(3)
  lora = {t.path: {'down': rng.standard_normal((rank, t.d_in), np.float32) * t.d_in ** -0.5,
                   'up': rng.standard_normal((t.d_out, rank), np.float32) * 0.1}
          for t in lora_lib.find_targets(unet_params, 'cross_attn')}
  lora_files.save_diffusers_lora(lora, os.path.join(pipe, LORA_FILE))
  return pipe


# ---------------------------------------------------------------- PyTorch
class TorchBench:
  """diffusers' UNet2DConditionModel with peft LoRAs, as diffusers' training scripts
  use them (bf16 frozen weights, fp32 LoRA params, autocast, SDPA attention); the
  PyTorch peer of the HyperLoRA step; diffusers' StableDiffusionPipeline."""

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
    import transformers  # pylint: disable=g-import-not-at-top
    t = self.torch
    where = t.cuda.get_device_name() if self.cuda else 'CPU'
    return (f'torch {t.__version__}, diffusers {self.diffusers.__version__}, '
            f'peft {self.peft.__version__}, transformers {transformers.__version__} on {where}')

  def _sync(self, _=None):
    if self.cuda:
      self.torch.cuda.synchronize()

  def _unet(self):
    with self.torch.device(self.device):
      model = self.diffusers.UNet2DConditionModel(**self.shapes.unet)
    return model.to(dtype=self.dtype)

  def _compile(self, model, compiled, mode=None):
    if not compiled:
      return model
    return self.torch.compile(model, mode=mode or self.args.torch_compile_mode, dynamic=False)

  def _added(self, batch: int):
    """SDXL's added_cond_kwargs (pooled text embeds, time ids at the latents' pixels);
    None for SD."""
    s = self.shapes
    if not s.pooled_dim:
      return None
    ids = self.torch.tensor([s.pixels, s.pixels, 0, 0, s.pixels, s.pixels],
                            dtype=self.dtype, device=self.device)
    return {'text_embeds': self.torch.randn(batch, s.pooled_dim, device=self.device,
                                            dtype=self.dtype),
            'time_ids': ids.repeat(batch, 1)}

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

  def _time_train(self, row: Row, forward, params, batch: int, compiled: bool):
    """Times the training step every torch row shares: noise at random timesteps,
    forward(noisy, t) under autocast, eps MSE, AdamW with grad-norm clipping 1.0."""
    torch, args, s = self.torch, self.args, self.shapes
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=1e-2)
    scheduler = self.diffusers.DDPMScheduler.from_config(diffusion.SD15_SCHEDULER_CONFIG)
    latents = torch.randn(batch, s.unet['in_channels'], s.latent, s.latent,
                          device=self.device)

    def step():
      noise = torch.randn_like(latents)
      t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,),
                        device=self.device)
      noisy = scheduler.add_noise(latents, noise, t)
      with torch.autocast(self.device, dtype=self.dtype,
                          enabled=self.dtype != torch.float32):
        pred = forward(noisy, t)
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

  def lora_train(self, row: Row, batch: int, compiled: bool):
    args, s = self.args, self.shapes
    model = self._unet()
    model.requires_grad_(False)
    model.add_adapter(self.peft.LoraConfig(
        r=args.rank, lora_alpha=args.rank, init_lora_weights='gaussian',
        target_modules=list(ATTN_TARGETS)))
    if args.torch_checkpointing:
      model.enable_gradient_checkpointing()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # diffusers' cast_training_params: fp32 master LoRA weights
      p.data = p.data.float()
    net = self._compile(model, compiled)
    text = self.torch.randn(batch, s.text_len, s.text_dim, device=self.device,
                            dtype=self.dtype)
    added = self._added(batch)
    self._time_train(row, lambda noisy, t: net(noisy, t, text, added_cond_kwargs=added,
                                               return_dict=False)[0],
                     params, batch, compiled)

  def hyper_train(self, row: Row, batch: int, compiled: bool):
    """The PyTorch peer (benchmarks/torch_peer.py): the ViT, decoder and gamma train in
    fp32 master weights under autocast; the UNet is frozen in --dtype."""
    from benchmarks import torch_peer  # pylint: disable=g-import-not-at-top
    torch, args, s = self.torch, self.args, self.shapes
    unet = self._unet()
    if args.torch_checkpointing:
      unet.enable_gradient_checkpointing()
    peer = torch_peer.HyperLoRA(unet, s.vit, s.decoder, args.rank).to(self.device)
    params = [p for p in peer.parameters() if p.requires_grad]
    net = self._compile(peer, compiled)
    size = s.vit['image_size']
    mean = torch.tensor(clip.CLIP_MEAN, device=self.device).view(1, 3, 1, 1)
    std = torch.tensor(clip.CLIP_STD, device=self.device).view(1, 3, 1, 1)
    pixels = (torch.rand(batch, 3, size, size, device=self.device) - mean) / std
    text = torch.randn(batch, s.text_len, s.text_dim, device=self.device, dtype=self.dtype)
    added = self._added(batch)
    self._time_train(row, lambda noisy, t: net(pixels, noisy, t, text, added),
                     params, batch, compiled)

  def sample(self, row: Row, images: int, steps: int, compiled: bool):
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
    added = self._added(2 * images)

    @torch.inference_mode()
    def run():
      scheduler.set_timesteps(steps, device=self.device)
      x = x_T
      for t in scheduler.timesteps:
        out = net(torch.cat([x, x]).to(self.dtype), t, text, added_cond_kwargs=added,
                  return_dict=False)[0]
        uncond, cond = out.float().chunk(2)
        eps = uncond + args.guidance * (cond - uncond)
        x = scheduler.step(eps, t, x, return_dict=False)[0]
      return x

    self._reset_peak()
    first, per_run = _measure(run, self._sync, 1, args.sample_runs)
    row.value = 2 * images * steps / per_run
    row.compile_s = first - per_run if compiled else None
    row.peak_bytes = self._peak()

  def latency(self, row: Row, folder: str, compiled: bool):
    """StableDiffusionPipeline on the latency folder in --dtype, its LoRA file loaded,
    fused and unloaded (no LoRA layers left); compiled: the UNet and the VAE decoder in
    channels_last under torch.compile(--latency_compile_mode, fullgraph), as diffusers'
    speed guide does. One image per call, decoded (output_type='pt')."""
    import transformers  # pylint: disable=g-import-not-at-top
    torch, d, args = self.torch, self.diffusers, self.args
    part = lambda name: os.path.join(folder, name)
    dtype = dict(torch_dtype=self.dtype)
    pipe = d.StableDiffusionPipeline(
        vae=d.AutoencoderKL.from_pretrained(part('vae'), **dtype),
        text_encoder=transformers.CLIPTextModel.from_pretrained(part('text_encoder'), **dtype),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(part('tokenizer')),
        unet=d.UNet2DConditionModel.from_pretrained(part('unet'), **dtype),
        scheduler=d.DDIMScheduler.from_pretrained(part('scheduler')),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = pipe.to(self.device)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(part(LORA_FILE))
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # the fused weights stay
    if compiled:
      mode = args.latency_compile_mode
      for model in (pipe.unet, pipe.vae):
        model.to(memory_format=torch.channels_last)
      pipe.unet = torch.compile(pipe.unet, mode=mode, fullgraph=True)
      pipe.vae.decode = torch.compile(pipe.vae.decode, mode=mode, fullgraph=True)
    size = self.shapes.pixels
    generator = torch.Generator(self.device)

    @torch.inference_mode()
    def run():
      return pipe(PROMPT, height=size, width=size, num_inference_steps=args.latency_steps,
                  guidance_scale=args.guidance, generator=generator.manual_seed(0),
                  output_type='pt').images

    self._reset_peak()
    first, per_image = _measure(run, self._sync, args.latency_warmup, args.latency_runs)
    row.value = 1000 * per_image
    row.compile_s = first - per_image if compiled else None
    row.peak_bytes = self._peak()


# ---------------------------------------------------------------- ours
# What our jax.nn.dot_product_attention calls use (see _use_attention), and the
# calls or configs that fell back from cuDNN to XLA.
_ATTENTION = {'implementation': None, 'fallbacks': []}


def _use_attention(implementation: str) -> None:
  """Makes the jax.nn.dot_product_attention calls use ``implementation``.

  The UNet names its own (`unet.attention_implementation`: cuDNN where it applies on a
  GPU); the CLIP towers name none, and JAX then picks XLA's. 'cudnn' gives those the
  UNet's rule; 'xla' overrides every call, the UNet's too; 'default' leaves JAX's
  choice. A call that cuDNN refuses while tracing stays on XLA's, and is noted.
  """
  first = _ATTENTION['implementation'] is None
  _ATTENTION['implementation'] = None if implementation == 'default' else implementation
  if not first:
    return
  original = jax.nn.dot_product_attention

  @functools.wraps(original)
  def attention(query, key, value, *args, **kwargs):
    implementation = _ATTENTION['implementation']
    if implementation == 'xla':
      return original(query, key, value, *args, **dict(kwargs, implementation='xla'))
    if kwargs.get('implementation') is not None or implementation is None:
      return original(query, key, value, *args, **kwargs)
    if unet_lib.attention_implementation(
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


def random_params(shapes, seed: int, dtype=None, host: bool = False):
  """Random params of these shapes, made on the host in a few seconds (a jitted
  init of the SD UNet compiles for longer; throughput does not depend on values);
  numpy arrays with ``host``, else device arrays.

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
    return value if host else jnp.asarray(value)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


def _hypernet_config(config, shapes: Shapes, args) -> None:
  """The benchmark's hypernetwork in ``config.hypernet``: the ViT encoder, the
  transformer decoder, a plain rank-``--rank`` LoRA (in place)."""
  if args.encoder_remat:
    config.hypernet.encoder.remat = args.encoder_remat
  config.hypernet.encoder.update(kind='vit', vit=dict(shapes.vit))
  config.hypernet.decoder.update(kind='transformer', **shapes.decoder)
  config.hypernet.param.update(kind='plain', rank=args.rank)


def _cast(tree, dtype):
  return jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)


class JaxBench:
  """Our UNet (frozen, shared by a family's configs), hypernetwork and train step."""

  def __init__(self, args, shapes: Shapes):
    self.args, self.shapes = args, shapes
    self.dtype = jnp.dtype(args.dtype)
    self.module = unet_lib.from_config(shapes.unet, dtype=self.dtype)
    self.schedule = diffusion.load_schedule()  # SD1.5's
    self.config = defaults.get_config('hyperlora')
    c = self.config
    c.train.remat = args.remat
    c.lora.update(rank=args.rank, alpha=float(args.rank))
    _hypernet_config(c, shapes, args)
    self._latency_run = None

  @functools.cached_property
  def unet_params(self):
    return random_params(abstract_params(self.module), 0, self.args.unet_param_dtype)

  # --- pieces
  def _hypernet(self, targets):
    """(module, fp32 params) with a --dtype ViT tower."""
    tower = clip.vision_from_config(self.shapes.vit, dtype=self.dtype)
    net = hypernet.build(self.config.hypernet, targets, tower)
    size = self.shapes.vit['image_size']
    variables = jax.eval_shape(net.init, jax.random.key(2), jnp.zeros((1, size, size, 3)))
    assert set(variables) == {'params'}, 'plain LoRA has no aux variables'
    return net, random_params(variables['params'], 2)

  def _time_ids(self, batch: int):
    p = self.shapes.pixels
    return jnp.tile(jnp.asarray([[p, p, 0, 0, p, p]], jnp.float32), (batch, 1))

  def _batch(self, batch: int, rng=3):
    s = self.shapes
    k1, k2, k3, k4 = jax.random.split(jax.random.key(rng), 4)
    size = s.vit['image_size']  # context images at the tower's size: no resize
    out = {
        'latents': jax.random.normal(k1, (batch, s.latent, s.latent, s.unet['in_channels'])),
        'text': jax.random.normal(k2, (batch, s.text_len, s.text_dim), self.dtype),
        'images': jax.random.uniform(k3, (batch, size, size, 3), minval=-1, maxval=1),
    }
    if s.pooled_dim:  # SDXL's added conditioning
      out['added'] = {'text_embeds': jax.random.normal(k4, (batch, s.pooled_dim), self.dtype),
                      'time_ids': self._time_ids(batch)}
    return out

  def _eps_loss(self, unet_params, lora, batch, rng):
    """The objectives' diffusion loss on given latents and text states: eps MSE, random t."""
    rng_t, rng_noise = jax.random.split(rng)
    x0 = batch['latents']
    t = diffusion.random_timesteps(rng_t, self.schedule, x0.shape[0])
    noise = jax.random.normal(rng_noise, x0.shape, x0.dtype)
    pred = self.module.apply({'params': unet_params},
                             diffusion.add_noise(self.schedule, x0, noise, t), t,
                             batch['text'], lora=lora, **batch.get('added', {}))
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
      self._profile(name, one, calls=2)
    return planned

  def _profile(self, name: str, fn, calls: int = 1):
    # The perfetto JSON beside the xplane is what benchmarks/trace_summary.py reads.
    with jax.profiler.trace(os.path.join(self.args.profile_dir, name),
                            create_perfetto_trace=True):
      for _ in range(calls):
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

  def sample(self, row: Row, images: int, steps: int):
    args, s = self.args, self.shapes
    targets = lora_lib.find_targets(self.unet_params, 'cross_attn')
    net, hyper_params = self._hypernet(targets)
    batch = self._batch(images)
    uncond = self._batch(images, rng=5)  # random stand-ins for the empty prompt's states
    both = lambda key: jax.tree.map(lambda u, c: jnp.concatenate([u, c]), uncond[key],
                                    batch[key])
    x_T = diffusion.init_noise(jax.random.key(6), batch['latents'].shape)

    def sample_fn(unet_params, hyper_params, context_images, text, added, x_T):
      tree = net.apply({'params': hyper_params}, context_images)  # a LoRA per image
      # The doubled (uncond, cond) batch: each image's LoRA on both of its halves.
      tree = lora_lib.tile_samples(tree, 2)
      model_fn = lambda x, t: self.module.apply({'params': unet_params}, x, t, text,
                                                lora=tree, **added)
      return diffusion.sample(model_fn, self.schedule, x_T, steps, 'ddim',
                              guidance_scale=args.guidance)

    inputs = (self.unet_params, hyper_params, batch['images'], both('text'),
              both('added') if s.pooled_dim else {}, x_T)
    start = time.perf_counter()
    compiled = jax.jit(sample_fn).lower(*inputs).compile()
    row.compile_s = time.perf_counter() - start
    run = lambda: compiled(*inputs)
    _, per_run = _measure(run, jax.block_until_ready, 1, args.sample_runs)
    row.value = 2 * images * steps / per_run
    if args.profile_dir:
      self._profile(row.config, run)
    return _planned_bytes(compiled)

  def latency_run(self, folder: str) -> runs.Run:
    """The latency folder as a hyperlora run (`objectives.build`, as a user's config with
    model.pretrained does; the hypernetwork untrained), its frozen base weights stored
    as --unet_param_dtype like diffusers' pipeline in torch_dtype."""
    if self._latency_run is None:
      c = defaults.get_config('hyperlora')
      c.model.update(pretrained=folder, targets='cross_attn')
      c.data.resolution = self.shapes.pixels
      c.train.compute_dtype = self.args.dtype
      _hypernet_config(c, self.shapes, self.args)
      objective = objectives.build(c, jax.random.key(0))
      dtype = jnp.dtype(self.args.unet_param_dtype)
      frozen = {k: v if k == 'hypernet' else _cast(v, dtype)
                for k, v in objective.frozen.items()}
      self._latency_run = runs.Run(c, objective._replace(trainable=None, frozen=frozen),
                                   objective.trainable)
    return self._latency_run

  def _context(self):
    p = self.shapes.pixels
    return jax.random.uniform(jax.random.key(7), (1, p, p, 3), minval=-1, maxval=1)

  def latency(self, row: Row, folder: str):
    """`sample.generate` for one context image and prompt: its first call compiles."""
    args, run, context = self.args, self.latency_run(folder), self._context()
    generate = lambda: sample.generate(run, context, [PROMPT], num_steps=args.latency_steps,
                                       guidance=args.guidance, sampler='ddim')
    first, per_image = _measure(generate, jax.block_until_ready, args.latency_warmup,
                                args.latency_runs)
    row.value, row.compile_s = 1000 * per_image, first - per_image
    if args.profile_dir:
      self._profile(row.config, generate)

  def latency_parts(self, folder: str, make_row) -> list:
    """Rows of ours at batch 1 by part, each jitted alone: where `latency`'s time goes.
    ``make_row(name)`` gives an empty row for a part."""
    args, run, context = self.args, self.latency_run(folder), self._context()
    models, frozen, params = run.objective.models, run.objective.frozen, run.params
    base = run.objective.base(params, frozen)
    steps, size = args.latency_steps, self.shapes.pixels
    ids = tuple(jnp.asarray(np.concatenate(pair)) for pair in
                zip(objectives.tokenize(models, ['']), objectives.tokenize(models, [PROMPT])))
    extra = objectives.time_ids(models.unet, size)
    hyper = jax.jit(lambda p, f, x: run.objective.lora(p, f, {'context': x}))
    text = jax.jit(lambda b, i: objectives.encode_prompts(models.text_towers, b, i))
    tree = hyper(params, frozen, context)
    both = lora_lib.tile_samples(tree, 2)  # the [uncond; cond] batch's factors
    cond = text(base, ids)
    factor = runs.latent_factor(models)
    noise = jax.random.normal(jax.random.key(8), (1, size // factor, size // factor,
                                                  models.unet_config['in_channels']))

    @jax.jit
    def loop(unet_params, lora, cond, noise):
      unet = lambda x, t: models.unet.apply({'params': unet_params}, x, t, lora=lora,
                                            **cond, **extra)
      return diffusion.sample(unet, models.schedule, noise, steps, 'ddim', args.guidance)

    @jax.jit
    def merge(unet_params, tree):  # a batch-1 LoRA is one LoRA: into the kernels
      plain = {p: lora_lib.to_plain(f) for p, f in tree.items()}
      return lora_lib.merge(unet_params, {p: {k: v[0] for k, v in f.items()}
                                          for p, f in plain.items()})

    one_eval = jax.jit(lambda p, lora, cond, x, t: models.unet.apply(
        {'params': p}, x, t, lora=lora, **cond, **extra))
    decode = jax.jit(lambda p, z: vae_lib.decode_latents(models.vae, p, z))
    merged = merge(base['unet'], tree)
    fp32 = _cast(base['unet'], jnp.float32)
    x2, t = jnp.concatenate([noise, noise]), jnp.asarray(500)
    parts = [
        ('tokenize the prompts (host)', lambda: objectives.tokenize(models, ['', PROMPT]), 1),
        ('hypernetwork: context -> LoRA', lambda: hyper(params, frozen, context), 1),
        ('text tower: [empty; prompt]', lambda: text(base, ids), 1),
        (f'sampler loop ({steps} steps), per-sample LoRA',
         lambda: loop(base['unet'], both, cond, noise), 1),
        ('sampler loop, the LoRA merged into the weights',
         lambda: loop(merged, None, cond, noise), 1),
        ('sampler loop, no LoRA', lambda: loop(base['unet'], None, cond, noise), 1),
        ('sampler loop, per-sample LoRA, fp32-stored UNet weights',
         lambda: loop(fp32, both, cond, noise), 1),
        (f'one UNet evaluation (batch 2, per-sample LoRA) x {steps}',
         lambda: one_eval(base['unet'], both, cond, x2, t), steps),
        ('merge the LoRA into the weights', lambda: merge(base['unet'], tree), 1),
        ('VAE decoder', lambda: decode(frozen['vae'], noise), 1),
    ]
    out = []
    for name, fn, times in parts:
      row = make_row(name)
      _log(f'{row.config}: {name} ...')
      try:
        _, per_call = _measure(fn, jax.block_until_ready, args.latency_warmup,
                               args.latency_runs)
        row.value = 1000 * per_call * times  # (some parts share compiled programs)
      except Exception as e:  # pylint: disable=broad-except
        traceback.print_exc()
        row.status = _error_status(e)
      out.append(row)
    return out


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
def _family(section: str) -> str:
  return 'sdxl' if section in SDXL_SECTIONS else 'sd15'


def _sizes(section: str, args) -> list:
  """The configs of a section: batch sizes, image counts, or 1."""
  return {'lora': sorted(args.batch_sizes), 'sdxl_lora': sorted(args.sdxl_batch_sizes),
          'hyper': [args.hyper_batch], 'sample': [args.sample_images],
          'sdxl_sample': [args.sdxl_sample_images]}.get(section, [1])


def _sample_steps(section: str, args) -> int:
  return args.sdxl_sample_steps if section == 'sdxl_sample' else args.sample_steps


def _job(bench, section: str, n: int, folder: Optional[str], args):
  """fn(row, *more) running one row of ``section`` at ``n`` on ``bench`` (for a
  TorchBench, ``more`` is ``compiled``); None where the bench has no such row."""
  if section in ('lora', 'sdxl_lora'):
    return lambda row, *more: bench.lora_train(row, n, *more)
  if section == 'hyper':
    return lambda row, *more: bench.hyper_train(row, n, *more)
  if section in ('sample', 'sdxl_sample'):
    return lambda row, *more: bench.sample(row, n, _sample_steps(section, args), *more)
  if section == 'latency':
    return lambda row, *more: bench.latency(row, folder, *more)
  return None  # latency_parts: ours only (JaxBench.latency_parts)


def _torch_rows(args, shapes: dict, folder, rows, notes) -> None:
  """Every selected PyTorch row, eager ones first; their memory is given back before
  JAX takes its own."""
  for family, s in shapes.items():
    try:
      bench = TorchBench(args, s)
    except Exception as e:  # pylint: disable=broad-except
      print(f'PyTorch rows skipped: cannot import torch/diffusers/peft ({e}).')
      notes.append(f'PyTorch rows skipped: import failed ({type(e).__name__}: {e}).')
      return
    if not any(n.startswith('torch ') for n in notes):
      notes.append(bench.versions() + '.')
    compile_skip = ('skipped (flag)' if args.skip_compile_torch else
                    None if bench.cuda else 'skipped (CPU)')
    jobs = [(section, n, fn) for section in SECTIONS
            if section in args.only and _family(section) == family
            for n in _sizes(section, args)
            if (fn := _job(bench, section, n, folder, args)) is not None]
    for compiled in (False, True):
      for section, n, fn in jobs:
        impl = TORCH_IMPLS[section][compiled]
        if compiled and section == 'latency':
          impl += f' ({args.latency_compile_mode})'
        row = _row(section, n, impl, args, 'compiled' if compiled else 'eager')
        rows.append(row)
        if compiled and compile_skip:
          row.status = compile_skip
          continue
        _log(f'{row.config}: {row.impl} ...')
        _run_torch(bench, row, fn, compiled)
        _log(f'{row.config}: {row.impl}: {row.value or row.status}')
        _save(args, rows, notes)


# Ours in the order of their expected peaks (smallest first), so that each config's
# process peak is its own.
_OUR_ORDER = ('sample', 'latency', 'latency_parts', 'lora', 'hyper', 'sdxl_sample',
              'sdxl_lora')


def _our_rows(args, shapes: dict, folder, rows, notes) -> None:
  for family, s in shapes.items():
    bench = JaxBench(args, s)
    for section in _OUR_ORDER:
      if section not in args.only or _family(section) != family:
        continue
      if section == 'latency_parts':
        make_row = lambda name: dataclasses.replace(_row(section, 1, '', args), impl=name)
        rows += bench.latency_parts(folder, make_row)
        _save(args, rows, notes)
        continue
      for n in _sizes(section, args):
        row = _row(section, n, OURS[section], args)
        _log(f'{row.config}: {row.impl} ...')
        _run_ours(row, _job(bench, section, n, folder, args))
        _log(f'{row.config}: {row.impl}: {row.value or row.status}')
        rows.append(row)
        _save(args, rows, notes)
    del bench  # its UNet params go back to JAX's pool for the next family
    gc.collect()


def start_backend(args):
  """JAX's device, its backend started before torch loads CUDA, under our GPU XLA flags
  (as a user's training run gets them) and --xla_flags; --tiny: the cheapest compile."""
  if args.tiny and 'XLA_FLAGS' not in os.environ:  # nothing to measure: compile fast
    os.environ['XLA_FLAGS'] = cli.FAST_COMPILE_XLA_FLAGS
  cli.set_default_xla_flags(args.xla_flags)
  return jax.local_devices()[0]


def _torch_rows_in_child(args, folder) -> tuple:
  """(rows, notes) of this script's PyTorch rows, run as a child process with
  --skip_ours (before this process starts JAX's backend, so each has the GPU alone),
  on the latency rows' `folder` (None: none)."""
  own = ('--torch_in_child', '--json', '--out', '--profile_dir', '--skip_torch')
  argv, skip = [], False
  for a in args.argv:  # drop this process' own outputs, '--flag value' forms too
    if not skip and not a.startswith(own):
      argv.append(a)
    skip = a in own[1:4]
  with tempfile.TemporaryDirectory() as scratch:
    path = os.path.join(scratch, 'torch_rows.json')
    _log('PyTorch rows in a child process ...')
    argv += [f'--latency_folder={folder}'] if folder else []
    child = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, '--skip_ours',
                            f'--json={path}'], check=False)
    if not os.path.exists(path):
      return [], [f'PyTorch rows: the child process failed (exit {child.returncode}) '
                  'before it wrote a row.']
    with open(path) as f:
      data = json.load(f)
  note = ('PyTorch rows: measured in a child process of their own just before ours '
          '(--torch_in_child), on the same machine.')
  # One run: its ratios are as if one process had measured both sides.
  return ([dataclasses.replace(Row(**r), process=_PROCESS) for r in data['rows']],
          data['notes'] + [note])


def run(args):
  """Runs the selected rows; returns (rows, notes)."""
  scratch = folder = None
  if args.only & {'latency', 'latency_parts'}:
    folder = args.latency_folder or tempfile.mkdtemp(prefix='hyperlora_bench_')
    scratch = None if args.latency_folder else folder
  try:
    return _run_rows(args, folder)
  finally:
    if scratch:
      shutil.rmtree(scratch, ignore_errors=True)


def _latency_pipeline(folder: str, shapes: Shapes, rank: int) -> str:
  """The latency rows' random SD pipeline in `folder`, written unless it is there (a
  --torch_in_child child wrote it; its LoRA file is written last)."""
  pipe = os.path.join(folder, 'pipeline')
  if os.path.exists(os.path.join(pipe, LORA_FILE)):
    return pipe
  _log('writing the latency rows\' random-weight SD folder ...')
  return write_random_pipeline(shapes, folder, rank)


def _run_rows(args, folder):
  """`run`'s rows and notes, the latency rows' pipeline written in `folder` (or None)."""
  child_rows, child_notes = ([], []) if args.skip_torch or not args.torch_in_child else (
      _torch_rows_in_child(args, folder))
  device = start_backend(args)
  attention = args.attention
  if attention == 'auto':
    attention = 'cudnn' if device.platform == 'gpu' else 'xla'
  _use_attention(attention)
  families = [f for f in ('sd15', 'sdxl') if any(_family(s) == f for s in args.only)]
  shapes = {f: _shapes(args, f) for f in families}
  config = defaults.get_config('hyperlora')
  counts = {}
  for family in families:
    _hypernet_config(config, shapes[family], args)
    counts[family] = model_flops(shapes[family], config.hypernet)
    _log(f'{shapes[family].name}: forward FLOPs per item '
         + ', '.join(f'{k} {v / 1e12:.4g} T' for k, v in counts[family].items()))
  rows = list(child_rows)
  pipe = folder and _latency_pipeline(folder, shapes['sd15'], args.rank)
  notes = [f'JAX {jax.__version__} on {device.device_kind} ({device.platform}), Python '
           f'{platform.python_version()}, XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}.']
  if not (args.skip_torch or args.torch_in_child):
    _torch_rows(args, shapes, pipe, rows, notes)
  if not args.skip_ours:
    _our_rows(args, shapes, pipe, rows, notes)
  for row in rows:
    row.flops_per_item = _work(row, counts[_family(row.section)], args)
  notes += _notes(args, shapes, counts, attention, config)
  return rows, notes + [n for n in child_notes if all(n[:12] != m[:12] for m in notes)]


def _notes(args, shapes: dict, counts: dict, attention: str, config) -> list:
  """What each row runs and how it is counted, for the sections that ran."""
  only, notes = args.only, []
  tflop = lambda f: f'{f / 1e12:.4g} TFLOP'
  for family, s in shapes.items():
    added = (f', pooled text {s.pooled_dim} + 6 time ids ({s.pixels} px)' if s.pooled_dim
             else '')
    notes.append(
        f'{s.name} UNet with random weights: latents {s.latent}x{s.latent}x4, text '
        f'{s.text_len}x{s.text_dim}{added}; {args.dtype} compute, our frozen weights '
        f'stored as {args.unet_param_dtype}; our attention: jax.nn.dot_product_attention '
        f'({attention!r}); remat={args.remat!r}, ViT encoder remat='
        f'{config.hypernet.encoder.remat!r}.' + _fallback_note())
  d, vit = shapes[next(iter(shapes))].decoder, shapes[next(iter(shapes))].vit
  hyper = (f'a ViT encoder ({vit["num_hidden_layers"]}x{vit["hidden_size"]} at '
           f'{vit["image_size"]} px) and a transformer decoder (width {d["width"]}, depth '
           f'{d["depth"]}, {d["rounds"]} rounds) predict a rank-{args.rank} LoRA per image '
           'on every cross-attention projection')
  if only & {'lora', 'sdxl_lora'}:
    notes.append(
        f'LoRA rows: rank {args.rank} (alpha {args.rank}) on to_q/to_k/to_v/to_out of every '
        'self- and cross-attention, eps MSE at random timesteps, AdamW + grad-norm clip '
        f'1.0; diffusers as its train_text_to_image_lora.py ({args.dtype} frozen weights, '
        f'fp32 LoRA, autocast, SDPA{", gradient checkpointing" * args.torch_checkpointing}).')
  if 'hyper' in only:
    notes.append(
        f'HyperLoRA rows: {hyper} (trainable), through the frozen UNet. The PyTorch peer '
        '(benchmarks/torch_peer.py) is the same step as a PyTorch user writes it: '
        "transformers' CLIPVisionModel (SDPA), a torch decoder of our decoder's design and "
        "size, diffusers' UNet whose attention processors add each sample's LoRA (einsums "
        'over the batch), fp32 master weights, bf16 autocast, AdamW; its MFU counts the '
        'same FLOPs as ours.')
  if only & {'sample', 'sdxl_sample'}:
    notes.append(
        f'Sampling: DDIM, guidance {args.guidance}; ours: one jit with the hypernetwork '
        '(a LoRA per image: ' + hyper + ') and a lax.scan over steps; diffusers: its UNet '
        'in a Python loop with DDIMScheduler and one shared, unfused peft LoRA on the '
        'cross-attention projections. Evaluations/s = 2 (CFG) x images x steps / s.')
  if only & {'latency', 'latency_parts'}:
    s = shapes['sd15']
    notes.append(
        f'Batch-1 image ({s.pixels} px, DDIM-{args.latency_steps}, guidance '
        f'{args.guidance}, text tower and VAE decoder included): both sides load one '
        'random-weight SD folder (the UNet above, CLIP ViT-L/14 text, SD\'s VAE). Ours: '
        f'sample.generate (tokenizing, {hyper}, both prompts, the sampler and the '
        'decoder in one compiled call); diffusers: StableDiffusionPipeline with the '
        'LoRA file (our writer\'s) loaded, fused and unloaded; compiled: UNet and VAE '
        f'decoder channels_last under torch.compile(mode={args.latency_compile_mode!r}, '
        f'fullgraph=True). {args.latency_runs} timed images after {args.latency_warmup}; '
        "latency_parts time each of ours' parts alone.")
  per_family = '; '.join(
      f'{shapes[f].name}: ' + ', '.join(f'{k} {tflop(v)}' for k, v in c.items())
      for f, c in counts.items())
  notes += [
      f'MFU = items/s x FLOPs per item / {args.peak_flops:.4g} FLOP/s. FLOPs: forward '
      'model FLOPs counted on our jaxprs as torch.utils.flop_counter counts them (2 x the '
      "multiply-adds of matmuls and convolutions, attention as its two matmuls; equal to "
      "its count of diffusers' SD1.5 UNet), per item: " + per_family + '. A training '
      'image = 2 UNet forwards (+ 3 hypernetwork forwards in the HyperLoRA rows); a '
      'sampling evaluation = 1 UNet forward; a batch-1 image = 2 x steps UNet forwards + '
      '2 text-tower forwards + the VAE decoder (+ the hypernetwork, ours only).',
      'Peak memory: torch.cuda.max_memory_allocated per row; ours: device.memory_stats()'
      "['peak_bytes_in_use'], or (~) XLA's plan for the executable where an earlier "
      'config had set the process peak. JAX may take up to '
      f'{_mem_fraction()} of the card (XLA_CLIENT_MEM_FRACTION), without preallocation.',
      f'Compile: ours = trace + lower + XLA compile (sample.generate: first call minus a '
      f'steady one); torch = first call minus a steady one (torch.compile '
      f'mode {args.torch_compile_mode!r}, dynamic=False). Timed: {args.steps} train steps '
      f'after {args.warmup} warmup, {args.sample_runs} sampling runs after 1. Ratios: '
      'PyTorch rows of the same config measured by the same run (this process, or with '
      '--torch_in_child its child just before).',
  ]
  return notes


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


def report(args, rows, notes) -> None:
  """A finished benchmark's output: --json, the table printed and written to --out (this
  file's main and every benchmark that shares its table)."""
  _save(args, rows, notes)
  table = format_table(rows, notes, args.peak_flops)
  print('\n' + table)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(table)


def main(argv=None):
  args = parse_args(argv)
  if args.merge:
    rows, notes = _merge(args.merge.split(','))
  else:
    rows, notes = run(args)
  report(args, rows, notes)
  return rows


if __name__ == '__main__':
  main()
