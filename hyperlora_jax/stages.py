"""Multi-stage experiments: several training runs and a report under one workdir.

A config with ``stages`` (name -> a complete training config) and ``stage_order`` is
run stage by stage, each in <workdir>/<name>; a finished stage is reused, an
interrupted one resumes. ``model.pretrained = 'stage:<name>'`` points a stage at the
diffusers folder that a finished stage whose objective trains the base model
(`Spec.trains_base`, e.g. ``unet_full``) exports to <workdir>/<name>/pipeline, so a base
model trained here is loaded exactly like a downloaded SD folder. An optional ``report``
section then compares the stages on held-out data (`evaluate.compare`).
"""
import os
from typing import Callable

import jax
from absl import logging
from PIL import Image

from hyperlora_jax import checkpoint
from hyperlora_jax import evaluate
from hyperlora_jax import export
from hyperlora_jax import objectives
from hyperlora_jax import runs
from hyperlora_jax.convert import pipeline
from hyperlora_jax.data import images

PIPELINE = 'pipeline'


def _finished(workdir: str, num_steps: int) -> bool:
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return False
  return checkpoint.make_manager(directory).latest_step() == num_steps


def export_pipeline(workdir: str) -> str:
  """Writes a trained run's base model as a diffusers folder; returns its path."""
  folder = os.path.join(workdir, PIPELINE)
  if not os.path.exists(os.path.join(folder, 'unet', 'config.json')):
    run = runs.restore(workdir)
    m, params = run.objective.models, runs.base_params(run)
    if jax.process_index() == 0:
      pipeline.save_pipeline(folder, params['unet'], m.unet_config, params['text'],
                             m.text_config, m.tokenizer_folder, m.scheduler_config,
                             params.get('text2'), m.text2_config, m.tokenizer2_folder)
  return folder


def run(config, workdir: str, train_one: Callable) -> None:
  """Trains each stage with `train_one(stage_config, stage_dir)`, then reports."""
  for i, name in enumerate(config.stage_order):
    stage = config.stages[name]
    pretrained = stage.model.get('pretrained') or ''
    if pretrained.startswith('stage:'):
      with stage.unlocked():
        stage.model.pretrained = os.path.join(workdir, pretrained[len('stage:'):], PIPELINE)
    stage_dir = os.path.join(workdir, name)
    logging.info('Stage %d/%d: %s (%s) in %s', i + 1, len(config.stage_order), name,
                 stage.objective, stage_dir)
    if not _finished(stage_dir, stage.train.num_steps):
      train_one(stage, stage_dir)
    if objectives.spec(stage.objective).trains_base:
      export_pipeline(stage_dir)
  if 'report' in config:
    report(config, workdir)


def report(config, workdir: str) -> dict:
  """Compares the stages on held-out items; writes <workdir>/report/.

  Rows: the base model with the S* prompt and no LoRA, the single shared LoRA, each
  hypernetwork, each hypernetwork on the robustness split's contexts (the same items
  drawn by other code: `synthetic.robust_context`), and the oracle (the base model
  given the full prompt). A row that
  ``report.runs`` maps to several stages (one per report seed, differing in their
  training seed) reports the spread over those runs (`evaluate.compare`). The first
  hypernetwork's predicted LoRA for one test context is exported in diffusers format.
  """
  r = config.report
  seeds = tuple(r.get('seeds', (0,)))
  # report.runs (optional): row -> the stages that train it, one per seed.
  runs_of = dict(r.get('runs') or {n: [n] for n in config.stage_order})
  def row(name):
    dirs = [os.path.join(workdir, n) for n in runs_of[name]]
    return dirs if len(dirs) > 1 else dirs[0]
  lora_kind = lambda name: objectives.spec(config.stages[runs_of[name][0]].objective
                                           ).lora_kind
  hyper = [n for n in runs_of if lora_kind(n) == 'predicted']
  first_hyper = os.path.join(workdir, runs_of[hyper[0]][0])
  rows = {'no LoRA (S* prompt)': (first_hyper, 'no_lora')}
  rows.update({n: (row(n), 'single_lora') for n in runs_of if lora_kind(n) == 'shared'})
  rows.update({n: (row(n), 'hyperlora') for n in hyper})
  rows.update({f'{n} (robust contexts)': (row(n), 'hyperlora_robust') for n in hyper})
  rows['oracle (full prompt)'] = (first_hyper, 'oracle')
  out_dir = os.path.join(workdir, 'report')
  results = evaluate.compare(rows, out_dir, num_examples=r.num_examples,
                             num_steps=r.num_steps, guidance=r.guidance, seeds=seeds)
  first = runs.restore(first_hyper)
  batch, _ = next(evaluate.batches(first.config, 'test', 1, 1))
  export.export_lora(first, 'diffusers', os.path.join(out_dir, 'predicted_lora.safetensors'),
                     context=batch['context'][:1])
  Image.fromarray(images.to_uint8(batch['context'][0])).save(
      os.path.join(out_dir, 'predicted_lora_context.png'))
  with open(os.path.join(out_dir, 'results.md')) as f:
    logging.info('Results (%s):\n%s', out_dir, f.read())
  return results
