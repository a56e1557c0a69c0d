"""Multi-stage experiments: several training runs and a report under one workdir.

A config with ``stages`` (name -> a complete training config) and ``stage_order`` is
run stage by stage, each in <workdir>/<name>; a finished stage is reused, an
interrupted one resumes. ``model.pretrained = 'stage:<name>'`` points a stage at the
diffusers folder that a finished ``unet_full`` stage exports to <workdir>/<name>/pipeline,
so a base model trained here is loaded exactly like a downloaded SD folder. An optional
``report`` section then compares the stages on held-out data (`evaluate.compare`).
"""
import os

import jax
from absl import logging
from PIL import Image

from hyperlora_jax import checkpoint
from hyperlora_jax import train
from hyperlora_jax.convert import pipeline

PIPELINE = 'pipeline'


def _finished(workdir: str, num_steps: int) -> bool:
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return False
  return checkpoint.make_manager(directory, 1).latest_step() == num_steps


def export_pipeline(workdir: str) -> str:
  """Writes a trained ``unet_full`` run as a diffusers folder; returns its path."""
  folder = os.path.join(workdir, PIPELINE)
  if not os.path.exists(os.path.join(folder, 'unet', 'config.json')):
    _, objective, params = train.restore_run(workdir)
    m = objective.models
    if jax.process_index() == 0:
      pipeline.save_pipeline(folder, params['unet'], m.unet_config, params['text'],
                             m.text_config, m.tokenizer_folder, m.scheduler_config)
  return folder


def run(config, workdir: str) -> None:
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
      train.train_and_evaluate(stage, stage_dir)
    if stage.objective == 'unet_full':
      export_pipeline(stage_dir)
  if 'report' in config:
    report(config, workdir)


def report(config, workdir: str) -> dict:
  """Compares the stages on held-out items; writes <workdir>/report/.

  Rows: the base model with the S* prompt and no LoRA, the single shared LoRA, each
  hypernetwork, and the oracle (the base model given the full prompt). A row that
  ``report.runs`` maps to several stages (one per report seed, differing in their
  training seed) reports the spread over those runs (`evaluate.compare`). The first
  hypernetwork's predicted LoRA for one test context is exported in diffusers format.
  """
  from hyperlora_jax import evaluate, export, sample  # pylint: disable=g-import-not-at-top
  r = config.report
  seeds = tuple(r.get('seeds', (0,)))
  # report.runs (optional): row -> the stages that train it, one per seed.
  runs = dict(r.get('runs') or {n: [n] for n in config.stage_order})
  def row(name):
    dirs = [os.path.join(workdir, n) for n in runs[name]]
    return dirs if len(dirs) > 1 else dirs[0]
  objective_of = lambda name: config.stages[runs[name][0]].objective
  hyper = [n for n in runs if objective_of(n) == 'hyperlora']
  first_hyper = os.path.join(workdir, runs[hyper[0]][0])
  rows = {'no LoRA (S* prompt)': (first_hyper, 'no_lora')}
  rows.update({n: (row(n), 'single_lora') for n in runs if objective_of(n) == 'unet_lora'})
  rows.update({n: (row(n), 'hyperlora') for n in hyper})
  rows['oracle (full prompt)'] = (first_hyper, 'oracle')
  out_dir = os.path.join(workdir, 'report')
  results = evaluate.compare(rows, out_dir, num_examples=r.num_examples,
                             num_steps=r.num_steps, guidance=r.guidance, seeds=seeds)
  run_config, objective, params = train.restore_run(first_hyper)
  batch, _ = next(evaluate.batches(run_config, 'test', 1, 1))
  export.export_lora(run_config, objective, params, 'diffusers',
                     os.path.join(out_dir, 'predicted_lora.safetensors'),
                     context=batch['context'][:1])
  Image.fromarray(sample.to_uint8(batch['context'][0])).save(
      os.path.join(out_dir, 'predicted_lora_context.png'))
  with open(os.path.join(out_dir, 'results.md')) as f:
    logging.info('Results (%s):\n%s', out_dir, f.read())
  return results
