"""Multi-stage experiments: several training runs and a report under one workdir.

A config with ``stages`` (name -> a complete training config) and ``stage_order`` is
run stage by stage, each in <workdir>/<name>; a finished stage is reused, an
interrupted one resumes. ``model.pretrained = 'stage:<name>'`` points a stage at the
diffusers folder that a finished stage whose objective trains the base model
(`Spec.trains_base`, e.g. ``unet_full``) exports to <workdir>/<name>/pipeline, so a base
model trained here is loaded exactly like a downloaded SD folder. A stage whose objective
trains an add-on (`Spec.part`: ``controlnet``, ``ip_adapter``) exports it to
<workdir>/<name>/<part>, which ``model.controlnet.folder`` / ``model.ip_adapter.weights``
and ``.image_encoder`` name as 'stage:<name>'; ``train.init_from = 'stage:<name>'``
starts a stage from another's trained params (a prompt schedule's second stage). An
optional ``report`` section then compares the stages on held-out data
(`evaluate.compare`): by default the quickstart's rows; with ``report.rows`` and
``report.groups``, those rows in each group of add-ons (`grouped_report`: the
recontextualization paper's Table 1, without and with pose guidance).

Nothing stale is built on: a pre-empted stage stops the whole run (`train.Preempted`
reaches the caller; the next launch resumes it). An export records the step it was made
from (<stage>/pipeline_export.json) and is redone when the stage's newest step differs; a
stage trained on an export records that export (<stage>/base_export.json) and is
retrained when the export changed, its old folder kept beside it as <stage>.stale-<n>.
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
from hyperlora_jax.convert import pipeline
from hyperlora_jax.data import images

PIPELINE = 'pipeline'
EXPORT_RECORD = 'pipeline_export.json'  # Beside pipeline/: the step it was made from.
BASE_RECORD = 'base_export.json'  # In a stage folder: the export it trained on.
DEPENDS_RECORD = 'depends.json'  # In a stage folder: the other stages' outputs it used.
# Config keys that may name another stage's output as 'stage:<name>': the path under
# that stage's folder they mean ('' the folder itself: a training run).
STAGE_KEYS = {'model.controlnet.folder': 'controlnet',
              'model.ip_adapter.weights': 'ip_adapter/ip-adapter.safetensors',
              'model.ip_adapter.image_encoder': 'ip_adapter/image_encoder',
              'train.init_from': ''}


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


def _export_once(workdir: str, folder: str, record_name: str, write: Callable) -> str:
  """Runs ``write(run)`` (which writes `folder`, whole or not at all) for the newest
  step of the run in `workdir` unless <workdir>/<record_name> records that step; then
  records it, so an export of another step (or of none recorded) is made again."""
  record_path = os.path.join(workdir, record_name)
  newest = checkpoint.newest_intact_step(os.path.join(workdir, 'checkpoints'))
  record = _read_record(record_path)
  if record is None or record['step'] != newest or not os.path.exists(folder):
    run = runs.restore(workdir)
    if jax.process_index() == 0:
      logging.info('Exporting %s of %s (step %d).', folder, workdir, run.step)
      write(run)
      files.write_json(record_path, {'step': run.step, 'fingerprint': _fingerprint(folder)})
  return folder


def export_pipeline(workdir: str) -> str:
  """Writes a trained run's base model as a diffusers folder; returns its path.

  The folder is written whole or not at all (`files.atomic_folder`); then
  <workdir>/pipeline_export.json records the step it was made from, so a folder of
  another step (or of none recorded) is exported again."""
  folder = os.path.join(workdir, PIPELINE)

  def write(run):
    m, params = run.objective.models, runs.base_params(run)
    pipeline.save_pipeline(folder, params['unet'], m.unet_config, params['text'],
                           m.text_config, m.tokenizer_folder, m.scheduler_config,
                           params.get('text2'), m.text2_config, m.tokenizer2_folder)
  return _export_once(workdir, folder, EXPORT_RECORD, write)


def export_part(workdir: str, part: str) -> str:
  """Writes the add-on a run trains (`Spec.part`) to <workdir>/<part> (its objective's
  `export_part`), recorded in <workdir>/<part>_export.json as `export_pipeline`'s."""
  folder = os.path.join(workdir, part)
  return _export_once(workdir, folder, f'{part}_export.json', lambda run: (
      run.objective.export_part(run.params, run.objective.frozen, folder)))


def _trained_on(stage_dir: str, base_folder: str) -> None:
  """Retrains a stage whose base export changed since it trained on it: its folder is
  moved aside (<stage>.stale-<i>), and the export it now trains on is recorded."""
  base = _read_record(os.path.join(os.path.dirname(base_folder), EXPORT_RECORD))
  _retrain_if_changed(stage_dir, BASE_RECORD, base)


def _resolve_stage_keys(stage, workdir: str) -> Optional[dict]:
  """Replaces 'stage:<name>' in `STAGE_KEYS` by paths under `workdir`; returns what the
  stage depends on through them ({key: the source's export record, or its newest step
  for a run}), None when nothing."""
  depends = {}
  for key, sub in STAGE_KEYS.items():
    *parents, leaf = key.split('.')
    section = stage
    for name in parents:
      section = section.get(name) if section is not None else None
    value = section.get(leaf) if section is not None else None
    if not isinstance(value, str) or not value.startswith('stage:'):
      continue
    source = os.path.join(workdir, value[len('stage:'):])
    with stage.unlocked():
      section[leaf] = os.path.join(source, sub) if sub else source
    part = sub.split('/')[0]
    depends[key] = (_read_record(os.path.join(source, f'{part}_export.json')) if part else
                    {'step': checkpoint.newest_intact_step(os.path.join(source, 'checkpoints'))})
  return depends or None


def _retrain_if_changed(stage_dir: str, record_name: str, now: Optional[dict]) -> None:
  """Moves a stage aside (<stage>.stale-<i>) when what it was trained on (the record
  <stage>/<record_name>) is not `now`, and records `now`."""
  base, record_path = now, os.path.join(stage_dir, record_name)
  had = _read_record(record_path)
  if jax.process_index() and had != base:
    raise ValueError(f'{stage_dir} was trained on another export or run ({had}, now '
                     f'{base}): run the stages on one process to retrain it.')
  if had is not None and had != base and os.path.isdir(stage_dir):
    i = 0
    while os.path.exists(f'{stage_dir}.stale-{i}'):
      i += 1
    os.rename(stage_dir, f'{stage_dir}.stale-{i}')
    logging.warning('%s trained on %s, now %s: retraining it (the old run is kept in '
                    '%s.stale-%d).', stage_dir, had, base, stage_dir, i)
  if base is not None and had != base:
    files.write_json(record_path, base)


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
    # A copy: resolving 'stage:' keys below must not write through the config's
    # field references (keys a config shares between its stages).
    stage = config.stages[name].copy_and_resolve_references()
    pretrained = stage.model.get('pretrained') or ''
    stage_dir = os.path.join(workdir, name)
    if pretrained.startswith('stage:'):
      with stage.unlocked():
        stage.model.pretrained = os.path.join(workdir, pretrained[len('stage:'):], PIPELINE)
      _trained_on(stage_dir, stage.model.pretrained)
    depends = _resolve_stage_keys(stage, workdir)
    if depends:
      _retrain_if_changed(stage_dir, DEPENDS_RECORD, depends)
    left = sum(steps[n] for n in order[i:])
    eta = (f', ETA of the remaining stages {_eta(left * (time.time() - started) / trained)}'
           if trained else '')
    logging.info('Stage %d/%d: %s (%s) in %s%s', i + 1, len(order), name,
                 stage.objective, stage_dir, eta)
    if not _finished(stage_dir, stage.train.num_steps):
      train_one(stage, stage_dir)
      trained += steps[name]
    spec = objectives.spec(stage.objective)
    if spec.trains_base:
      export_pipeline(stage_dir)
    if spec.part:
      export_part(stage_dir, spec.part)
  if 'report' in config:
    logging.info('Report: evaluating the stages on held-out items...')
    (grouped_report if 'rows' in config.report else report)(config, workdir)


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
  files.save_image(Image.fromarray(images.to_uint8(batch['context'][0])),
                   os.path.join(out_dir, 'predicted_lora_context.png'))
  with open(os.path.join(out_dir, 'results.md')) as f:
    logging.info('Results (%s):\n%s', out_dir, f.read())
  return results


def _attachment(addons: dict, workdir: str) -> dict:
  """An evaluation group's add-ons ({section: keys}) with 'stage:<name>' resolved."""
  out = {}
  for name, keys in (addons or {}).items():
    out[name] = {}
    for key, value in dict(keys).items():
      sub = STAGE_KEYS.get(f'model.{name}.{key}', '')
      if isinstance(value, str) and value.startswith('stage:'):
        value = os.path.join(workdir, value[len('stage:'):], sub)
      out[name][key] = value
  return out


def grouped_report(config, workdir: str) -> dict:
  """``report.rows`` ((row, stage or [one stage per seed], mode), ...) evaluated in each
  of ``report.groups`` ((group, add-ons to attach), ...: e.g. 'with pose' and a
  controlnet stage's ControlNet), on the same held-out examples and seeds
  (`evaluate.compare`); writes <workdir>/report/: results.json/md (a row per row and
  group), table.md (the rows, a column group per group: `evaluate.grouped_table`) and
  grid.png. With ``report.clip`` 'random', the CLIP metrics use a random CLIP vision
  tower (report/clip_random/, shaped by report.clip_vit, drawn from the report's first
  seed): a stand-in, which the table says."""
  r = config.report
  seeds = tuple(r.get('seeds', (0,)))
  out_dir = os.path.join(workdir, 'report')
  clip_folder = r.get('clip') or None
  if clip_folder == 'random':
    clip_folder = evaluate.random_clip(os.path.join(out_dir, 'clip_random'),
                                       r.clip_vit.to_dict(), seeds[0])
  rows = {}
  for group, addons in r.groups:
    attach = _attachment(addons, workdir)
    for name, stage_names, mode in r.rows:
      dirs = [os.path.join(workdir, n) for n in
              (stage_names if isinstance(stage_names, (list, tuple)) else [stage_names])]
      rows[evaluate.group_row(name, group)] = (dirs if len(dirs) > 1 else dirs[0], mode,
                                               attach)
  results = evaluate.compare(rows, out_dir, num_examples=r.num_examples,
                             num_steps=r.num_steps, guidance=r.guidance, seeds=seeds,
                             clip_folder=clip_folder)
  table = evaluate.grouped_table(results, [row[0] for row in r.rows],
                                 [group for group, _ in r.groups])
  if r.get('clip') == 'random':
    table += ('\nC2G, T2G, T2Gdiff: cosines of a CLIP vision tower with random weights '
              '(no CLIP trained on this task exists here): a stand-in that sees colors and '
              'layout, not the semantics of a real CLIP.\n')
  files.write_text(os.path.join(out_dir, 'table.md'), table)
  logging.info('Results (%s):\n%s', out_dir, table)
  return results
