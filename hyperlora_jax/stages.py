"""Multi-stage experiments: several training runs and a report under one workdir.

A config with ``stages`` (name -> a complete training config) and ``stage_order`` is
run stage by stage, each in <workdir>/<name>; a finished stage is reused, an
interrupted one resumes. ``model.pretrained = 'stage:<name>'`` points a stage at the
diffusers folder that a finished stage whose objective trains the base model
(`Spec.trains_base`, e.g. ``unet_full``) exports to <workdir>/<name>/pipeline, so a base
model trained here is loaded exactly like a downloaded SD folder; ``model.init_from =
'stage:<name>'`` starts a stage from an earlier stage's trained params (the recipe of
`objectives.hyperlora_basis`), recorded with that stage's step. An optional ``report``
section then compares the stages on held-out data (`evaluate.compare`).

Nothing stale is built on: a pre-empted stage stops the whole run (`train.Preempted`
reaches the caller; the next launch resumes it). An export records the step it was made
from (<stage>/pipeline_export.json) and is redone when the stage's newest step differs; a
stage trained on an export records that export (<stage>/base_export.json) and is
retrained when the export changed, its old folder kept beside it as <stage>.stale-<n>;
likewise a stage started from another (<stage>/init_from.json) when that one trained on.
"""
import hashlib
import json
import os
import time
from typing import Callable, Optional

import jax
from absl import logging
from PIL import Image

from hyperlora_jax import checkpoint
from hyperlora_jax import evaluate
from hyperlora_jax import export
from hyperlora_jax import files
from hyperlora_jax import objectives
from hyperlora_jax import runs
from hyperlora_jax import slider
from hyperlora_jax.convert import pipeline
from hyperlora_jax.data import images

PIPELINE = 'pipeline'
EXPORT_RECORD = 'pipeline_export.json'  # Beside pipeline/: the step it was made from.
BASE_RECORD = 'base_export.json'  # In a stage folder: the export it trained on.
INIT_RECORD = 'init_from.json'  # In a stage folder: the stage and step it started from.


def _finished(workdir: str, num_steps: int) -> bool:
  step = checkpoint.newest_intact_step(os.path.join(workdir, 'checkpoints'))
  return step == num_steps


def _read_record(path: str) -> Optional[dict]:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _fingerprint(folder: str) -> str:
  """A digest of a pipeline folder's weights: what a stage trained on it depends on."""
  digest = hashlib.sha256()
  for root, dirs, names in sorted(os.walk(folder)):
    dirs.sort()
    for name in sorted(n for n in names if n.endswith('.safetensors')):
      with open(os.path.join(root, name), 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 24), b''):
          digest.update(chunk)
  return digest.hexdigest()[:16]


def export_pipeline(workdir: str) -> str:
  """Writes a trained run's base model as a diffusers folder; returns its path.

  The folder is written whole or not at all (`files.atomic_folder`); then
  <workdir>/pipeline_export.json records the step it was made from, so a folder of
  another step (or of none recorded) is exported again."""
  folder = os.path.join(workdir, PIPELINE)
  record_path = os.path.join(workdir, EXPORT_RECORD)
  newest = checkpoint.newest_intact_step(os.path.join(workdir, 'checkpoints'))
  record = _read_record(record_path)
  if record is None or record['step'] != newest or not os.path.isdir(folder):
    run = runs.restore(workdir)
    m, params = run.objective.models, runs.base_params(run)
    if jax.process_index() == 0:
      logging.info('Exporting the base model of %s (step %d) to %s.', workdir, run.step,
                   folder)
      pipeline.save_pipeline(folder, params['unet'], m.unet_config, params['text'],
                             m.text_config, m.tokenizer_folder, m.scheduler_config,
                             params.get('text2'), m.text2_config, m.tokenizer2_folder)
      files.write_json(record_path, {'step': run.step, 'fingerprint': _fingerprint(folder)})
  return folder


def _trained_on(stage_dir: str, base_folder: str) -> None:
  """Retrains a stage whose base export changed since it trained on it: its folder is
  moved aside (<stage>.stale-<i>), and the export it now trains on is recorded."""
  _depends_on(stage_dir, BASE_RECORD, _read_record(
      os.path.join(os.path.dirname(base_folder), EXPORT_RECORD)), 'the base model of step')


def _initialized_from(stage_dir: str, source_dir: str) -> int:
  """The newest step of the finished stage `source_dir` that a stage (model.init_from)
  starts from; a stage that started from another step is retrained (`_depends_on`)."""
  step = checkpoint.newest_intact_step(os.path.join(source_dir, 'checkpoints'))
  if step is None:
    raise ValueError(f'{stage_dir} starts from {source_dir} (model.init_from), which has '
                     'no checkpoint: list that stage before it in stage_order.')
  _depends_on(stage_dir, INIT_RECORD, {'stage': source_dir, 'step': step},
              f'{os.path.basename(source_dir)} of step')
  return step


def _depends_on(stage_dir: str, record_name: str, source: Optional[dict], what: str) -> None:
  """Records in <stage>/`record_name` what a stage is trained on (`source`); when that
  changed since, the stage's folder is moved aside (<stage>.stale-<i>) to retrain."""
  record_path = os.path.join(stage_dir, record_name)
  had = _read_record(record_path)
  if jax.process_index() and had != source:
    raise ValueError(f'{stage_dir} was trained on another {what.rsplit(" ", 2)[0]}: run '
                     'the stages on one process to retrain it.')
  if had is not None and had != source and os.path.isdir(stage_dir):
    i = 0
    while os.path.exists(f'{stage_dir}.stale-{i}'):
      i += 1
    os.rename(stage_dir, f'{stage_dir}.stale-{i}')
    logging.warning('%s trained on %s %s, now step %s: retraining it (the old run is kept '
                    'in %s.stale-%d).', stage_dir, what, had.get('step'),
                    (source or {}).get('step'), stage_dir, i)
  if source is not None and had != source:
    files.write_json(record_path, source)


def _eta(seconds: float) -> str:
  s = int(seconds)
  return f'{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}'


def run(config, workdir: str, train_one: Callable) -> None:
  """Trains each stage with `train_one(stage_config, stage_dir)`, then reports.
  A pre-empted stage's train.Preempted stops the run before any later stage."""
  workdir = os.path.abspath(workdir)  # Stage configs name their base by this path.
  order = config.stage_order
  steps = {n: config.stages[n].train.num_steps for n in order}
  started, trained = time.time(), 0  # Steps trained by this launch, for the ETA.
  for i, name in enumerate(order):
    stage = config.stages[name]
    pretrained = stage.model.get('pretrained') or ''
    stage_dir = os.path.join(workdir, name)
    if pretrained.startswith('stage:'):
      with stage.unlocked():
        stage.model.pretrained = os.path.join(workdir, pretrained[len('stage:'):], PIPELINE)
      _trained_on(stage_dir, stage.model.pretrained)
    init_from = stage.model.get('init_from') or ''
    if init_from.startswith('stage:'):
      source = os.path.join(workdir, init_from[len('stage:'):])
      step = _initialized_from(stage_dir, source)
      with stage.unlocked():
        stage.model.init_from, stage.model.init_step = source, step
    left = sum(steps[n] for n in order[i:])
    eta = (f', ETA of the remaining stages {_eta(left * (time.time() - started) / trained)}'
           if trained else '')
    logging.info('Stage %d/%d: %s (%s) in %s%s', i + 1, len(order), name,
                 stage.objective, stage_dir, eta)
    if not _finished(stage_dir, stage.train.num_steps):
      train_one(stage, stage_dir)
      trained += steps[name]
    if objectives.spec(stage.objective).trains_base:
      export_pipeline(stage_dir)
  if 'report' in config:
    logging.info('Report: evaluating the stages on held-out items...')
    report(config, workdir)


def report(config, workdir: str) -> dict:
  """Compares the stages on held-out items; writes <workdir>/report/.

  Rows: the base model with the S* prompt and no LoRA, the single shared LoRA, each
  hypernetwork, each hypernetwork on the robustness split's contexts (the same items
  drawn by other code: `synthetic.robust_context`), and the oracle (the base model
  given the full prompt); or the rows ``report.rows`` lists, (row name, a key of
  ``report.runs`` or a stage, mode, options: `evaluate.ROW_OPTIONS`). A row that
  ``report.runs`` maps to several stages (one per report seed, differing in their
  training seed) reports the spread over those runs (`evaluate.compare`). The first
  hypernetwork's predicted LoRA for one test context is exported in diffusers format
  (and each of its parts alone, for a LoRA of parts). ``report.slider`` (row, the two
  test examples, scales) adds a concept slider between two of them (`slider.write`).
  """
  r = config.report
  seeds = tuple(r.get('seeds', (0,)))
  # report.runs (optional): row -> the stages that train it, one per seed.
  runs_of = dict(r.get('runs') or {n: [n] for n in config.stage_order})
  stages_of = lambda key: runs_of.get(key, [key])  # A stage not in report.runs: itself.
  def row(name):
    dirs = [os.path.join(workdir, n) for n in stages_of(name)]
    return dirs if len(dirs) > 1 else dirs[0]
  lora_kind = lambda name: objectives.spec(config.stages[stages_of(name)[0]].objective
                                           ).lora_kind
  if r.get('rows'):
    listed = [(name, key, mode, _plain(options)) for name, key, mode, options in r.rows]
    rows = {name: (row(key), mode, options) for name, key, mode, options in listed}
    hyper = [key for _, key, _, _ in listed if lora_kind(key) == 'predicted']
  else:
    hyper = [n for n in runs_of if lora_kind(n) == 'predicted']
    first = os.path.join(workdir, stages_of(hyper[0])[0])
    rows = {'no LoRA (S* prompt)': (first, 'no_lora')}
    rows.update({n: (row(n), 'single_lora') for n in runs_of if lora_kind(n) == 'shared'})
    rows.update({n: (row(n), 'hyperlora') for n in hyper})
    rows.update({f'{n} (robust contexts)': (row(n), 'hyperlora_robust') for n in hyper})
    rows['oracle (full prompt)'] = (first, 'oracle')
  out_dir = os.path.join(workdir, 'report')
  results = evaluate.compare(rows, out_dir, num_examples=r.num_examples,
                             num_steps=r.num_steps, guidance=r.guidance, seeds=seeds)
  first = runs.restore(os.path.join(workdir, stages_of(hyper[0])[0]))
  batch, _ = next(evaluate.batches(first.config, 'test', 1, 1))
  inputs = {k: batch[k][:1] for k in first.spec.lora_inputs}
  lora_path = lambda part: os.path.join(out_dir, f'predicted_lora{part}.safetensors')
  export.export_lora(first, 'diffusers', lora_path(''), context=inputs)
  for part in first.spec.lora_parts:
    export.export_lora(first, 'diffusers', lora_path(f'_{part}'), context=inputs, parts=[part])
  context = batch['context'][0]
  files.save_image(Image.fromarray(images.to_uint8(context[0] if context.ndim == 4 else context)),
                   os.path.join(out_dir, 'predicted_lora_context.png'))
  if 'region' in inputs:  # Its identity region, where `runs.inputs_from_files` reads it.
    files.write_json(os.path.join(out_dir, 'predicted_lora_context.json'),
                     {'box': [round(float(v)) for v in inputs['region'][0, 0]]})
  if r.get('slider'):
    _slider(r, os.path.join(workdir, stages_of(r.slider.row)[0]), out_dir)
  with open(os.path.join(out_dir, 'results.md')) as f:
    logging.info('Results (%s):\n%s', out_dir, f.read())
  return results


def _plain(options) -> dict:
  """A row's options as plain dicts (a ConfigDict's are not Mappings)."""
  options = options or {}
  return {k: v.to_dict() if hasattr(v, 'to_dict') else v for k, v in dict(options).items()}


def _slider(r, workdir: str, out_dir: str) -> None:
  """A concept slider between two test examples of a run (`slider.write`), prompted
  with the first one's scene prompt."""
  run = runs.restore(workdir)
  a, b = r.slider.examples
  batch, _ = next(evaluate.batches(run.config, 'test', max(a, b) + 1, max(a, b) + 1))
  one = lambda i: {k: batch[k][i:i + 1] for k in run.spec.lora_inputs}
  prompt = batch['prompt'][a]
  slider.write(run, one(a), one(b), os.path.join(out_dir, 'slider'),
               [prompt.decode() if isinstance(prompt, bytes) else str(prompt)],
               list(r.slider.scales), num_steps=r.num_steps, guidance=r.guidance)
