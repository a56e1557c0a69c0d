r"""Rank-relaxed fast fine-tuning (HyperDreamBooth, phase 2): context image -> a LoRA file.

  python -m hyperlora_jax.finetune --workdir=RUN --context=face.png --steps=40 --rank=4 \
      --out=face_lora.safetensors [--format=kohya] [--export_rank=4]
  python -m hyperlora_jax.finetune --workdir=RUN --context=FACES_DIR ... --out=LORA_DIR

The run's hypernetwork predicts each subject's LoRA from its context image (plain or
LiDB: weights that can be relaxed); the prediction is held as a fixed LoRA and a fresh
LoRA of rank --rank, up factor at zero, is added to it and trained for --steps steps of
the diffusion loss on the context image with the supervisory prompt (--prompt; default
the run's static prompt, e.g. 'a [V] face'). A folder's N images are N subjects trained
together as one batch of per-sample LoRAs, and the whole loop is one compiled call (a
lora_bank objective's `train.fit`). --steps=0 is the hypernetwork alone; --from_scratch
leaves it out (and works for runs without one): the fresh LoRA alone, from the run's base
model (the "No Hyper" baseline; DreamBooth-LoRA at more steps).

Each subject becomes one standard LoRA file (--format: diffusers for diffusers/peft,
kohya = comfyui = a1111): the predicted and the relaxed factors side by side, exactly
(rank r_pred + --rank), or their sum SVD-compressed to --export_rank (the relative error
is printed). --out is the file for one image, the folder (<image name>.safetensors) for
a folder.
"""
import functools
import json
import os
import time
from typing import Any, NamedTuple, Optional, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from hyperlora_jax import cli
from hyperlora_jax import lora as lora_lib
from hyperlora_jax import runs
from hyperlora_jax import traced
from hyperlora_jax import train
from hyperlora_jax.convert import lora_files
from hyperlora_jax.data import builders
from hyperlora_jax.data import images as image_io
from hyperlora_jax.objectives import lora_bank

FORMATS = ('diffusers', 'kohya', 'comfyui', 'a1111')


class Personal(NamedTuple):
  """Personal models of N subjects: ``run`` is a lora_bank run (``runs.lora(run,
  {'subject': ...})``, `sample.generate(run, None, prompts, inputs={'subject': ...})`)
  whose subject n applies its fixed prediction plus its relaxed LoRA."""
  run: runs.Run
  predicted: Optional[Any]  # the hypernetwork's per-sample tree, None from scratch
  num_subjects: int
  steps: int
  lora: Any  # each subject's LoRA as the personal run applies it (leading axis N)
  prepare_s: float  # the hypernetwork's prediction and the images' VAE latents
  compile_s: float  # the fine-tuning loop's tracing and compilation (0: compiled before)
  trace_s: float  # of which tracing and lowering to StableHLO (or reading it: traced.py)
  fit_s: float  # the fine-tuning loop itself, all subjects


def check(run: runs.Run, steps: int, rank: int, from_scratch: bool) -> None:
  """Refuses what cannot be fine-tuned, naming why."""
  if steps < 0:
    raise ValueError(f'--steps must be >= 0 (0: the hypernetwork alone), not {steps}.')
  if rank < 1:
    raise ValueError(f'--rank must be >= 1, not {rank}.')
  if from_scratch:
    if not steps:
      raise ValueError('--from_scratch with --steps=0 has nothing to write: give steps.')
    return
  if run.objective.models.hypernet is None:
    raise ValueError(f'A {run.spec.name} run has no hypernetwork to start from: fine-tune '
                     'a fresh LoRA with --from_scratch, or give a hyperlora run.')
  kind = run.config.hypernet.param.kind
  if kind not in lora_lib.FACTOR_KINDS:
    raise ValueError(f'The run predicts {kind!r} LoRAs, which cannot be rank-relaxed here: '
                     f'fine-tuning starts from a {" or ".join(lora_lib.FACTOR_KINDS)} '
                     'prediction (or use --from_scratch).')


def bank_config(config, rank: int, num_subjects: int):
  """The run's config as a lora_bank of fresh plain rank-`rank` LoRAs, no prompt dropout."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.objective = 'lora_bank'
    config.bank.param.update(kind='plain', rank=rank)
    config.bank.subjects_per_step = num_subjects
    config.model.prompt_dropout = 0.0
  return config


def personalize(run: runs.Run, contexts, *, steps: int, rank: int, lr: float,
                from_scratch: bool = False, prompt: Optional[str | Sequence[str]] = None,
                seed: int = 0, log_every: int = 0, subject_key: str = 'subject') -> Personal:
  """Fine-tunes one relaxed LoRA per context image [N, H, W, 3] in [-1, 1], all at once,
  with the supervisory `prompt` (default the run's static prompt), or N prompts, one per
  subject (e.g. each photo's caption, so the LoRA need not learn what the words say).
  The personal run's LoRA input is `subject_key` (`lora_bank.bank`): subject n is row n."""
  check(run, steps, rank, from_scratch)
  contexts = np.asarray(contexts, np.float32)
  n = len(contexts)
  prompt = prompt or builders.static_prompt(run.config.data)
  prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
  if len(prompts) != n:
    raise ValueError(f'{len(prompts)} prompts for {n} subjects: give one, or one each.')
  models = run.objective.models
  base = dict(runs.base_params(run), **{k: v for k, v in run.objective.frozen.items()
                                        if k == 'vae'})
  start = time.perf_counter()  # (The first calls of both compile.)
  predicted = None if from_scratch else runs.lora(run, {'context': contexts})
  data = jax.block_until_ready(lora_bank.cache_latents(models, base, lora_bank.subject_data(
      models, contexts[:, None], [[p] for p in prompts])))
  prepare_s = time.perf_counter() - start
  config = bank_config(run.config, rank, n)
  objective = lora_bank.bank(config, models, base, jax.random.key(seed), n, predicted,
                             subject_key)
  args = (objective.trainable, objective.frozen, data, np.int32(steps), np.float32(lr),
          jax.random.key(seed + 1))
  compiled, compile_s, trace_s = _compiled_fit(objective, config, subject_key, log_every,
                                               args)
  start = time.perf_counter()
  params, tree = jax.block_until_ready(compiled(*args))
  fit_s = time.perf_counter() - start
  personal = runs.Run(config, objective._replace(trainable=None), params, run.workdir,
                      run.step)
  return Personal(personal, predicted, n, steps, tree, prepare_s, compile_s, trace_s, fit_s)


# The last few compiled loops, keyed by what their program depends on: the models (by
# identity; the entry holds them, so the id stays theirs) and traced.key's digest of the
# bank's config, the loop's options, the models' configs and the arguments' shapes. A
# program only reads its arguments, so the next subjects of the same run, shapes and rank
# reuse it: no tracing (~10 s at SD1.5 shape), no compile, no first-run setup.
_FITS: dict = {}
_FITS_KEPT = 4


def _compiled_fit(objective, config, subject_key: str, log_every: int, args):
  """(the compiled fine-tuning loop for `args`, seconds compiling, of which tracing).
  The loop returns the trained params and every subject's LoRA tree: gathering it in
  the same program spares the export a compile per personal run (1.3 s on the H200)."""
  models = objective.models
  description = json.dumps(
      [config.to_json(sort_keys=True), subject_key, log_every, models.unet_config,
       models.text_config, models.text2_config, models.scheduler_config],
      sort_keys=True, default=str)
  key = (id(models), traced.key(description, args))
  if key in _FITS:
    return _FITS[key][1], 0.0, 0.0
  fit = train.fit(objective.loss_fn, functools.partial(lora_bank.subject_batch,
                                                       key=subject_key),
                  config.optim, log_every=log_every)
  subjects = {subject_key: jnp.arange(config.bank.subjects_per_step)}

  def fit_and_gather(trainable, frozen, *rest):
    params, _ = fit(trainable, frozen, *rest)
    return params, objective.lora(params, frozen, subjects)

  start = time.perf_counter()
  lowered = traced.lower(fit_and_gather, args, description)
  trace_s = time.perf_counter() - start
  compiled = lowered.compile()
  while len(_FITS) >= _FITS_KEPT:
    _FITS.pop(next(iter(_FITS)))
  _FITS[key] = (models, compiled)
  return compiled, time.perf_counter() - start, trace_s


def loras(personal: Personal, export_rank: int = 0) -> tuple[list, list]:
  """(one shared plain LoRA tree per subject, the relative error of each one's
  compression, 0 when exact). --steps=0 gives the prediction alone."""
  if personal.steps == 0:
    tree = personal.predicted
  else:
    tree = personal.lora
  trees = runs.plain_loras(tree)
  if not export_rank:
    return trees, [0.0] * len(trees)
  pairs = [lora_lib.compress(t, export_rank) for t in trees]
  return [t for t, _ in pairs], [e for _, e in pairs]


def write(tree, fmt: str, path: str, unet_config: dict, metadata: dict) -> None:
  if fmt == 'diffusers':
    lora_files.save_diffusers_lora(tree, path, metadata=metadata)
  else:
    lora_files.save_kohya_lora(tree, path, metadata=metadata, unet_config=unet_config)


# ---------------------------------------------------------------- CLI


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  files = image_io.image_files(f.context)  # Fails before the slow restore.
  cli.use_compilation_cache(f.compilation_cache)
  run = runs.restore(f.workdir, f.step)
  check(run, f.steps, f.rank, f.from_scratch)
  contexts, names = image_io.load_images(f.context, run.config.data.resolution)
  fmt = 'diffusers' if f.format == 'diffusers' else 'kohya'
  what = 'from scratch' if f.from_scratch else 'from the hypernetwork\'s prediction'
  print(f'Fine-tuning {len(names)} subject(s) {what}: {f.steps} steps, rank {f.rank}, '
        f'lr {f.lr}.', flush=True)
  personal = personalize(run, contexts, steps=f.steps, rank=f.rank, lr=f.lr,
                         from_scratch=f.from_scratch, prompt=f.prompt, seed=f.seed,
                         log_every=f.log_every)
  print(f'Prediction and latents: {personal.prepare_s:.2f} s (compile included).')
  print(f'Fine-tuning loop: compiled in {personal.compile_s:.1f} s, ran in '
        f'{personal.fit_s:.2f} s ({personal.fit_s / len(names):.3f} s per subject).')
  trees, errors = loras(personal, f.export_rank)
  folder = os.path.isdir(f.context)
  if folder:
    os.makedirs(f.out, exist_ok=True)
  for name, tree, error, source in zip(names, trees, errors, files):
    path = os.path.join(f.out, f'{name}.safetensors') if folder else f.out
    rank = max(v['down'].shape[0] for v in tree.values())
    write(tree, fmt, path, run.objective.models.unet_config, {
        'hyperlora_jax.source': f.workdir, 'hyperlora_jax.context': source,
        'hyperlora_jax.finetune_steps': str(f.steps), 'hyperlora_jax.relaxed_rank': str(f.rank),
        'hyperlora_jax.from_scratch': str(f.from_scratch),
        'hyperlora_jax.export_relative_error': f'{error:.3g}'})
    note = f', SVD to rank {f.export_rank}: relative error {error:.2e}' if f.export_rank else ''
    print(f'Wrote {fmt} LoRA of rank {rank} to {path}{note}')


def _flags():
  flags.DEFINE_string('workdir', None, 'A training run (a hyperlora run, or any run with '
                      '--from_scratch).')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).')
  flags.DEFINE_string('context', None, 'A context image, or a folder of them (one '
                      'subject each, fine-tuned together).')
  flags.DEFINE_integer('steps', 40, 'Fine-tuning steps (0: the hypernetwork alone).')
  flags.DEFINE_integer('rank', 4, 'Rank of the relaxed LoRA added to the prediction.')
  flags.DEFINE_float('lr', 1e-3, 'AdamW learning rate (constant).')
  flags.DEFINE_string('prompt', None, 'Supervisory prompt (default: the run\'s static '
                      'prompt).')
  flags.DEFINE_bool('from_scratch', False, 'Leave the hypernetwork out: a fresh LoRA from '
                    'the base model (the "No Hyper" baseline).')
  flags.DEFINE_integer('export_rank', 0, 'SVD-compress each LoRA to this rank (0: the '
                       'exact stacked factors).')
  flags.DEFINE_enum('format', 'diffusers', FORMATS, 'diffusers (diffusers/peft) or kohya '
                    '(= comfyui, a1111).')
  flags.DEFINE_integer('seed', 0, 'Seed of the fresh LoRA, the noise and the timesteps.')
  flags.DEFINE_integer('log_every', 0, 'Print the loss every N steps from inside the loop '
                       '(0: never). A loop that prints is traced again in every process: '
                       'the traced-program cache (hyperlora_jax/traced.py) cannot keep it.')
  cli.define_compilation_cache_flag()
  flags.DEFINE_string('out', None, 'The LoRA file (one context image) or folder.')
  flags.mark_flags_as_required(['workdir', 'context', 'out'])


def run():
  """The console script (`hyperlora-finetune`)."""
  _flags()
  cli.run(__name__, cli.main_with_errors(main))


if __name__ == '__main__':
  run()
