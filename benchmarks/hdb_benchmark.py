r"""HyperDreamBooth's speed and memory targets (issue 16) on SD1.5-shaped random weights.

  python benchmarks/hdb_benchmark.py --out=hdb.md                 # one GPU (H200)
  python benchmarks/hdb_benchmark.py --tiny --out=/tmp/tiny.md    # CPU smoke run (tests)

Writes a random SD1.5-shaped diffusers folder once (--folder: UNet, VAE, CLIP-L-shaped
text tower, a closed-vocabulary tokenizer), builds an untrained HyperDreamBooth
hypernetwork on it (ViT-L/14-shaped encoder, transformer decoder with K=4 rounds, LiDB
rank 1, a=100, b=50 over the UNet's self and cross attention and the text tower's
attention and MLP: the paper's 30K numbers) and times the library's own paths (bf16):

* one subject, context image -> LoRA file: `finetune.personalize` (the hypernetwork,
  the context's VAE latents, 40 relaxed rank-4 steps at 512 px in one compiled loop)
  and the stacked file written; seconds after compilation, and the loop's compile
  seconds: cold (this process' first call, unless --compilation_cache already held it)
  and warm (the second call, from the persistent cache)
* 16 subjects fine-tuned together: subjects per second
* pre-optimization, the lora_bank fit of LiDB weights: identities per second with 32
  identities per step (one compiled loop) and one at a time (the same loop for one
  identity, called once per identity), and their ratio
* the peak device memory of the 32-identity pre-optimization (process peak and XLA's plan)

Run it twice: the second run's cold numbers are the warm-cache ones (a fresh process whose
programs are all in the persistent cache). A row that fails
(e.g. out of memory) prints its error and the rest still run; --remat=dots_saveable
recomputes activations in the fits' backward.
"""
import os

# Before JAX starts: allocate as needed, so the peaks are real.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import contextlib  # pylint: disable=g-import-not-at-top,wrong-import-position
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_benchmark as gb  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np

from hyperlora_jax import cli, defaults, files, finetune, objectives, runs, train
from hyperlora_jax.convert import clip_folders
from hyperlora_jax.data import synthetic
from hyperlora_jax.objectives import lora_bank

GIB = 2 ** 30
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), norm_num_groups=32,
                down_block_types=('DownEncoderBlock2D',) * 4,
                up_block_types=('UpDecoderBlock2D',) * 4, scaling_factor=0.18215)
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, hidden_act='quick_gelu', vocab_size=49408,
                   max_position_embeddings=77, eos_token_id=1)
SIZES = {
    'sd15': dict(unet=dict(defaults.SD15_UNET, sample_size=64), vae=SD15_VAE,
                 text=CLIP_L_TEXT, resolution=512, vit=defaults.VIT_L14,
                 decoder=dict(width=768, depth=4, heads=8, rounds=4), a=100, b=50),
    'tiny': dict(unet=dict(defaults.tiny_unet((32, 64), 32, 2), in_channels=4, out_channels=4,
                           sample_size=16),
                 vae=dict(SD15_VAE, block_out_channels=(8, 8), norm_num_groups=4,
                          layers_per_block=1, down_block_types=('DownEncoderBlock2D',) * 2,
                          up_block_types=('UpDecoderBlock2D',) * 2),
                 text=dict(defaults.tiny_text(32, 1, 2), vocab_size=600,
                           max_position_embeddings=77, eos_token_id=1),
                 resolution=32, vit=dict(hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         image_size=32, patch_size=8, projection_dim=32),
                 decoder=dict(width=32, depth=1, heads=2, rounds=2), a=8, b=8),
}
TARGETS = 'cross_attn,self_attn,text_attn,text_mlp'


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--tiny', action='store_true', help='Tiny shapes on CPU (the smoke run).')
  p.add_argument('--out', default=None, help='Write the table (markdown) here.')
  p.add_argument('--json', default=None, help='Write the rows as JSON here.')
  p.add_argument('--folder', default=None, help='The random diffusers folder (written '
                 'once; default: a temporary folder).')
  p.add_argument('--compilation_cache', default=os.path.expanduser(
      '~/.cache/hyperlora_jax/xla'), help='JAX persistent compilation cache ("": off).')
  p.add_argument('--steps', type=int, default=None, help='Fine-tuning steps (40; tiny 2).')
  p.add_argument('--preopt_steps', type=int, default=None,
                 help='Pre-optimization steps per identity (40; tiny 2).')
  p.add_argument('--together', type=int, default=None, help='Subjects fine-tuned together '
                 '(16; tiny 2).')
  p.add_argument('--identities', type=int, default=None, help='Identities per '
                 'pre-optimization step (32; tiny 2).')
  p.add_argument('--one_by_one', type=int, default=None, help='Single-identity fits timed '
                 '(4; tiny 1).')
  p.add_argument('--only', default=','.join(MEASUREMENTS), help='Comma-separated measurements '
                 f'(of {",".join(MEASUREMENTS)}).')
  p.add_argument('--xla_flags', default='', help='Appended to XLA_FLAGS (a flag sweep: one '
                 'process per setting).')
  p.add_argument('--profile', default='', help='Write a jax.profiler trace of a 1-step '
                 'fine-tuning call here (one_subject).')
  p.add_argument('--remat', default='none', help='train.remat policy of the fits.')
  p.add_argument('--dtype', default=None, help='Compute dtype (bfloat16; tiny float32: '
                 'CPUs emulate bf16).')
  args = p.parse_args(argv)
  unknown = set(args.only.split(',')) - set(MEASUREMENTS)
  if unknown:
    p.error(f'--only: unknown {sorted(unknown)}; choose from {",".join(MEASUREMENTS)}.')
  tiny = {'steps': 2, 'preopt_steps': 2, 'together': 2, 'identities': 2, 'one_by_one': 1,
          'dtype': 'float32'}
  full = {'steps': 40, 'preopt_steps': 40, 'together': 16, 'identities': 32, 'one_by_one': 4,
          'dtype': 'bfloat16'}
  for key, value in (tiny if args.tiny else full).items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  return args


def write_folder(folder: str, size: dict) -> None:
  """A random diffusers folder of `size`'s shapes (skipped when already written)."""
  if os.path.exists(os.path.join(folder, 'vae', 'config.json')):
    return
  _log(f'Writing random weights to {folder}')
  tokenizer = os.path.join(tempfile.mkdtemp(), 'tokenizer')
  clip_folders.write_tokenizer(synthetic.vocabulary(), tokenizer, 77)
  gb.write_random_folder(folder, size['unet'], size['text'], size['vae'], tokenizer)


def hyper_run(folder: str, size: dict, remat: str, dtype: str) -> runs.Run:
  """An untrained HyperDreamBooth run on the folder's model, gamma 1 (a live LoRA)."""
  c = defaults.get_config('hyperlora')
  c.model.update(pretrained=folder, targets=TARGETS, max_length=77, prompt_dropout=0.0)
  c.data.update(name='single', resolution=size['resolution'], prompt='static')
  c.hypernet.encoder.update(kind='vit', vit=dict(size['vit']))
  c.hypernet.decoder.update(kind='transformer', **size['decoder'])
  c.hypernet.param.update(kind='lidb', rank=1, a=size['a'], b=size['b'])
  c.train.update(compute_dtype=dtype, remat=remat)
  objective = objectives.build(c, jax.random.key(0))
  params = dict(objective.trainable, gamma=np.float32(1.0))
  return runs.Run(c, objective._replace(trainable=None, frozen=runs.on_devices(
      objective.frozen)), runs.on_devices(params))


def _log(message: str) -> None:
  print(f'[{time.strftime("%H:%M:%S")}] {message}', flush=True)


def _profiled(folder):
  """A jax.profiler trace of the block into `folder` (benchmarks/trace_summary.py reads
  its perfetto file), or nothing."""
  return (jax.profiler.trace(folder, create_perfetto_trace=True) if folder
          else contextlib.nullcontext())


def _peak():
  stats = jax.local_devices()[0].memory_stats()
  return stats.get('peak_bytes_in_use') if stats else None


def _planned(compiled):
  try:
    m = compiled.memory_analysis()
    return float(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                 + m.temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except  (not every backend plans)
    return None


def _contexts(n: int, resolution: int) -> np.ndarray:
  return np.random.RandomState(n).uniform(-1, 1, (n, resolution, resolution, 3)).astype(
      np.float32)


def one_subject(run, args, rows):
  """Context -> LoRA file: this process' first subject (compiles), then a second one."""
  context = _contexts(1, run.config.data.resolution)
  kwargs = dict(steps=args.steps, rank=4, lr=1e-3)
  cold = finetune.personalize(run, context, **kwargs)
  warm = finetune.personalize(run, context, **kwargs)
  # One step through the same program (steps is its argument): the call's fixed cost.
  with _profiled(args.profile):
    one = finetune.personalize(run, context, **dict(kwargs, steps=1))
  path = os.path.join(tempfile.mkdtemp(), 'subject.safetensors')
  writes = []
  for personal in (cold, warm):  # the first call compiles plain_loras' fold (runs._to_plain)
    start = time.perf_counter()
    trees, _ = finetune.loras(personal)
    finetune.write(trees[0], 'diffusers', path, run.objective.models.unet_config, {})
    writes.append(time.perf_counter() - start)
  first = cold.prepare_s + cold.compile_s + cold.fit_s + writes[0]
  write_s = writes[1]
  total = warm.prepare_s + warm.fit_s + write_s
  rank = max(f['down'].shape[0] for f in trees[0].values())
  per_step = (warm.fit_s - one.fit_s) / max(1, args.steps - 1)
  rows += [
      ('one subject: context -> LoRA file, after compilation', f'{total:.3f} s',
       f'hypernetwork + latents {warm.prepare_s:.3f} s, {args.steps} steps '
       f'{warm.fit_s:.3f} s, file (rank {rank}, {os.path.getsize(path) / 2**20:.1f} MiB) '
       f'{write_s:.3f} s; target <= 1 s'),
      ('one subject: the loop, fixed cost per call + per step',
       f'{one.fit_s - per_step:.3f} s + {1000 * per_step:.1f} ms',
       f'from {args.steps} steps ({warm.fit_s:.3f} s) and 1 step ({one.fit_s:.3f} s) of the '
       'same program' + (f'; profile of the 1-step call in {args.profile}'
                         if args.profile else '')),
      ('one subject: compile of the fine-tuning loop', f'{cold.compile_s:.1f} s',
       f"this process' first subject, tracing {cold.trace_s:.1f} s of it (or reading the "
       'traced program back: hyperlora_jax/traced.py); the next '
       f'subjects of these shapes reuse the loop ({warm.compile_s:.1f} s); target <= 10 s '
       'from a warm persistent cache (a second run of the benchmark)'),
      ("one subject: this process' first context -> LoRA file, compiles included",
       f'{first:.1f} s', 'from a warm cache in a second run of the benchmark')]


def together(run, args, rows):
  contexts = _contexts(args.together, run.config.data.resolution)
  personal = [finetune.personalize(run, contexts, steps=args.steps, rank=4, lr=1e-3)
              for _ in range(2)][-1]
  seconds = personal.prepare_s + personal.fit_s
  rows.append((f'{args.together} subjects fine-tuned together',
               f'{args.together / seconds:.2f} subjects/s',
               f'{seconds:.3f} s for all, {args.steps} steps, after compilation'))


def preoptimization(run, args, rows):
  """The lora_bank fit at N identities per step vs one identity per call."""
  models = run.objective.models
  base = dict(runs.base_params(run), vae=run.objective.frozen['vae'])
  config = run.config.copy_and_resolve_references()
  config.bank.param.update(kind='lidb', rank=1, a=run.config.hypernet.param.a,
                           b=run.config.hypernet.param.b)
  speeds, peak, planned = {}, None, None
  for n in (args.identities, 1):
    objective = lora_bank.bank(config, models, base, jax.random.key(n), n)
    data = lora_bank.cache_latents(models, base, lora_bank.subject_data(
        models, _contexts(n, config.data.resolution)[:, None], [['a [V] face']] * n))
    fit = train.fit(objective.loss_fn, lora_bank.subject_batch, config.optim,
                    config.train.remat)
    call = (objective.trainable, objective.frozen, data, np.int32(args.preopt_steps),
            np.float32(1e-2), jax.random.key(0))
    compiled = fit.lower(*call).compile()
    jax.block_until_ready(compiled(*call))
    repeats = 1 if n > 1 else args.one_by_one
    start = time.perf_counter()
    for _ in range(repeats):  # one by one: a Python loop over identities
      jax.block_until_ready(compiled(*call))
    speeds[n] = n * repeats / (time.perf_counter() - start)
    if n > 1:
      peak, planned = _peak(), _planned(compiled)
  batched, single = speeds[args.identities], speeds[1]
  per_step = lambda speed: f'{1000 / (speed * args.preopt_steps):.1f} ms per identity-step'
  rows += [
      (f'pre-optimization, {args.identities} identities per step', f'{batched:.3f} '
       'identities/s', f'{args.preopt_steps} steps each, one compiled loop; '
       f'{per_step(batched)}'),
      ('pre-optimization, one identity at a time', f'{single:.3f} identities/s',
       f'the same loop per identity, {per_step(single)}; batched / one by one = '
       f'{batched / single:.1f}x (target >= 10x)'),
      (f'peak memory, pre-optimization at {args.identities} identities per step',
       'n/a' if peak is None else f'{peak / GIB:.1f} GiB',
       'process peak' + ('' if planned is None else
                         f'; XLA plan of the loop {planned / GIB:.1f} GiB'))]


MEASUREMENTS = {'preoptimization': preoptimization, 'one_subject': one_subject,
                'together': together}


def format_table(rows, notes) -> str:
  lines = ['| measurement | value | notes |', '|---|---|---|']
  lines += [f'| {a} | {b} | {c} |' for a, b, c in rows]
  return '\n'.join(lines) + '\n\n' + ' '.join(notes) + '\n'


def main(argv=None):
  args = parse_args(argv)
  cli.set_default_xla_flags(args.xla_flags)  # as finetune's CLI sets them
  if args.compilation_cache:
    jax.config.update('jax_compilation_cache_dir', args.compilation_cache)
  size = SIZES['tiny' if args.tiny else 'sd15']
  folder = args.folder or tempfile.mkdtemp(prefix='hdb_benchmark_')
  write_folder(folder, size)
  run = hyper_run(folder, size, args.remat, args.dtype)
  device = jax.devices()[0]
  rows = []
  for name in args.only.split(','):
    fn = MEASUREMENTS[name]
    _log(f'Measuring {name}')
    try:
      fn(run, args, rows)
    except Exception as e:  # pylint: disable=broad-except  (the other rows still run)
      traceback.print_exc()
      rows.append((name, f'failed: {type(e).__name__}', str(e).splitlines()[0][:200]))
  notes = [f'{device.device_kind} ({jax.default_backend()}), JAX {jax.__version__}, '
           f'{args.dtype} compute, {"tiny" if args.tiny else "SD1.5"}-shaped random weights at '
           f'{size["resolution"]} px, LiDB rank 1 a={size["a"]} b={size["b"]} over '
           f'{TARGETS}, remat {args.remat}, XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}.']
  table = format_table(rows, notes)
  files.print_and_write(table, args.out, args.json, {'rows': rows, 'notes': notes})


if __name__ == '__main__':
  main()
