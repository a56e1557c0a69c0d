"""Multi-stage experiments: several training runs and a report under one workdir.

A config with ``stages`` (name -> a complete training config) and ``stage_order`` is
run stage by stage, each in <workdir>/<name>; a finished stage is reused, an
interrupted one resumes. ``model.pretrained = 'stage:<name>'`` points a stage at the
diffusers folder that a finished stage whose objective trains the base model
(`Spec.trains_base`, e.g. ``unet_full``) exports to <workdir>/<name>/pipeline, so a base
model trained here is loaded exactly like a downloaded SD folder. A stage whose objective
trains an add-on (`Spec.part`: ``controlnet``, ``ip_adapter``) exports it to
<workdir>/<name>/<part>, which ``model.controlnet.folder`` / ``model.ip_adapter.weights``
and ``.image_encoder`` name as 'stage:<name>'. ``train.init_from = 'stage:<name>'``
starts a stage from another's params (a prompt schedule's second stage; the stages of
`objectives.hyperlora_basis`' recipe), recorded with that stage's step (as
``train.init_step``); ``hypernet.loss.targets = 'stage:<name>'`` points at a finished
per-subject stage's target weights (a lora_bank pre-optimization). An optional
``report`` section then evaluates the stages on held-out data, by ``report.kind``
(`REPORTS`): 'compare' (the default: the quickstart's rows, or ``report.rows``,
`evaluate.compare`), 'grouped' (those rows in each of ``report.groups`` of add-ons: the
recontextualization paper's Table 1, without and with pose guidance) or
'personalization' (HyperDreamBooth's Table 3: each row's personal models of held-out
subjects, a run's prediction, fast fine-tuning of it or from zero, their fidelity and
editability, steps and time) or 'merging' (LoRA.rar's table: held-out content-style
pairs merged by each method, their content and style accuracy and merge time per pair).

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
import numpy as np
from absl import logging
from PIL import Image

from hyperlora_jax import checkpoint
from hyperlora_jax import defaults
from hyperlora_jax import diffusion
from hyperlora_jax import evaluate
from hyperlora_jax import export
from hyperlora_jax import files
from hyperlora_jax import finetune
from hyperlora_jax import lora as lora_lib
from hyperlora_jax import merge
from hyperlora_jax import merging
from hyperlora_jax import objectives
from hyperlora_jax import preoptimize
from hyperlora_jax import runs
from hyperlora_jax import sample
from hyperlora_jax import slider
from hyperlora_jax.convert import lora_files
from hyperlora_jax.convert import pipeline
from hyperlora_jax.data import images
from hyperlora_jax.data import pipeline as data_pipeline
from hyperlora_jax.data import synthetic
from hyperlora_jax.objectives import lora_bank, lorarar

PIPELINE = 'pipeline'
EXPORT_RECORD = 'pipeline_export.json'  # Beside pipeline/: the step it was made from.
BASE_RECORD = 'base_export.json'  # In a stage folder: the export it trained on.
INIT_RECORD = 'init_from.json'  # In a stage folder: the stage and step it started from.
DEPENDS_RECORD = 'depends.json'  # In a stage folder: the other stages' outputs it used.
# Config keys that may name another stage's exported add-on as 'stage:<name>': the path
# under that stage's folder they mean.
STAGE_KEYS = {'model.controlnet.folder': 'controlnet',
              'model.ip_adapter.weights': 'ip_adapter/ip-adapter.safetensors',
              'model.ip_adapter.image_encoder': 'ip_adapter/image_encoder'}


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


def _stage_folder(value, workdir: str) -> Optional[str]:
  """The folder under `workdir` of the stage that a 'stage:<name>' value names; None
  for any other value (a path, '', a number)."""
  if isinstance(value, str) and value.startswith('stage:'):
    return os.path.join(workdir, value[len('stage:'):])
  return None


def _resolve_stages(stage, workdir: str, stage_dir: str) -> None:
  """'stage:<name>' in model.pretrained (its pipeline folder), train.init_from (its
  workdir, with the step it had: train.init_step), hypernet.loss.targets and
  merger.content / .style (its workdir) and `STAGE_KEYS` -> paths under `workdir`; a
  stage is retrained when what it was trained on changed (`_depends_on`)."""
  with stage.unlocked():
    source = _stage_folder(stage.model.get('pretrained'), workdir)
    if source:
      stage.model.pretrained = os.path.join(source, PIPELINE)
      _trained_on(stage_dir, stage.model.pretrained)
    source = _stage_folder(stage.train.get('init_from'), workdir)
    if source:
      stage.train.init_from = source
      stage.train.init_step = _initialized_from(stage_dir, source)
    # Per-subject stages' folders: a hypernetwork's target weights, a merger's LoRA zoo.
    for section, key in (('hypernet.loss', 'targets'), ('merger', 'content'),
                         ('merger', 'style')):
      parent = stage
      for name in section.split('.'):
        parent = parent.get(name) or {}
      source = _stage_folder(parent.get(key), workdir)
      if source:
        parent[key] = source
  depends = _resolve_stage_keys(stage, workdir)
  if depends:
    _depends_on(stage_dir, DEPENDS_RECORD, depends, 'add-on')


def _trained_on(stage_dir: str, base_folder: str) -> None:
  """Retrains a stage whose base export changed since it trained on it: its folder is
  moved aside (<stage>.stale-<i>), and the export it now trains on is recorded."""
  _depends_on(stage_dir, BASE_RECORD, _read_record(
      os.path.join(os.path.dirname(base_folder), EXPORT_RECORD)), 'base model export')


def _initialized_from(stage_dir: str, source_dir: str) -> int:
  """The newest step of the finished stage `source_dir` that a stage (train.init_from)
  starts from; a stage that started from another step is retrained (`_depends_on`)."""
  step = checkpoint.newest_intact_step(os.path.join(source_dir, 'checkpoints'))
  if step is None:
    raise ValueError(f'{stage_dir} starts from {source_dir} (train.init_from), which has '
                     'no checkpoint: list that stage before it in stage_order.')
  _depends_on(stage_dir, INIT_RECORD, {'stage': source_dir, 'step': step},
              'initial params')
  return step


def _resolve_stage_keys(stage, workdir: str) -> Optional[dict]:
  """Replaces 'stage:<name>' in `STAGE_KEYS` by paths under `workdir`; returns what the
  stage depends on through them ({key: the source's export record}), None when
  nothing."""
  depends = {}
  for key, sub in STAGE_KEYS.items():
    *parents, leaf = key.split('.')
    section = stage
    for name in parents:
      section = section.get(name) if section is not None else None
    source = _stage_folder(section.get(leaf) if section is not None else None, workdir)
    if not source:
      continue
    with stage.unlocked():
      section[leaf] = os.path.join(source, sub)
    depends[key] = _read_record(os.path.join(source, f'{sub.split("/")[0]}_export.json'))
  return depends or None


def _depends_on(stage_dir: str, record_name: str, source: Optional[dict], what: str) -> None:
  """Records in <stage>/`record_name` what a stage is trained on (`source`); when that
  changed since, the stage's folder is moved aside (<stage>.stale-<i>) to retrain."""
  record_path = os.path.join(stage_dir, record_name)
  had = _read_record(record_path)
  if jax.process_index() and had != source:
    raise ValueError(f'{stage_dir} was trained on another {what} ({had}, now {source}): '
                     'run the stages on one process to retrain it.')
  if had is not None and had != source and os.path.isdir(stage_dir):
    i = 0
    while os.path.exists(f'{stage_dir}.stale-{i}'):
      i += 1
    os.rename(stage_dir, f'{stage_dir}.stale-{i}')
    logging.warning('%s trained on the %s %s, now %s: retraining it (the old run is kept '
                    'in %s.stale-%d).', stage_dir, what, had, source, stage_dir, i)
  if source is not None and had != source:
    files.write_json(record_path, source)


def _eta(seconds: float) -> str:
  s = int(seconds)
  return f'{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}'


def needs(stage) -> set:
  """The stages a stage config names as 'stage:<name>' anywhere in it."""
  found = set()

  def walk(value):
    if isinstance(value, str) and value.startswith('stage:'):
      found.add(value[len('stage:'):])
    elif hasattr(value, 'items'):
      for v in value.values():
        walk(v)
    elif isinstance(value, (tuple, list)):
      for v in value:
        walk(v)
  walk(stage)
  return found


def stage_finished(stage, stage_dir: str) -> bool:
  """Whether the stage in `stage_dir` trained all its steps (or fitted every subject)."""
  if objectives.spec(stage.objective).per_subject:
    return preoptimize.finished(stage_dir)
  return _finished(stage_dir, stage.train.num_steps)


def chosen_stages(config, only=()) -> list:
  """The stages of `config` in stage_order, ``only`` those when given (each must be one)."""
  unknown = sorted(set(only) - set(config.stage_order))
  if unknown:
    raise ValueError(f'No stage {", ".join(unknown)} in this config; its stages: '
                     f'{", ".join(config.stage_order)}.')
  return [n for n in config.stage_order if not only or n in only]


def run(config, workdir: str, train_one: Callable, only=()) -> None:
  """Trains each stage with `train_one(stage_config, stage_dir)`, then reports.
  A pre-empted stage's train.Preempted stops the run before any later stage.

  ``only`` (names in stage_order): trains just those stages, in stage_order, and no
  report; every other stage they use must be finished. Processes given disjoint names
  can train side by side (one per accelerator, or several on one); a launch without
  ``only`` then finds them finished and reports."""
  workdir = os.path.abspath(workdir)  # Stage configs name their base by this path.
  order = config.stage_order
  chosen = chosen_stages(config, only)
  for name in chosen:  # A typo in the last stage fails now, not after the others trained.
    try:
      defaults.check_keys(config.stages[name])
    except ValueError as e:
      raise ValueError(f'Stage {name}: {e}') from None
  steps = {n: config.stages[n].train.num_steps for n in chosen}
  started, trained = time.time(), 0  # Steps trained by this launch, for the ETA.
  for i, name in enumerate(order):
    stage_dir = os.path.join(workdir, name)
    if name not in chosen:
      # Not trained here; used by a chosen stage only if finished (and then exported).
      if not stage_finished(config.stages[name], stage_dir):
        users = [n for n in chosen if name in needs(config.stages[n])]
        if users:
          raise ValueError(f'Stage {users[0]} uses stage {name}, which is not finished: '
                           f'train it first, or name it too.')
        continue
    # A copy: resolving 'stage:' keys below must not write through the config's
    # field references (keys a config shares between its stages).
    stage = config.stages[name].copy_and_resolve_references()
    spec = objectives.spec(stage.objective)
    if name in chosen:
      _resolve_stages(stage, workdir, stage_dir)
      left = sum(steps[n] for n in chosen[chosen.index(name):])
      eta = (f', ETA of the remaining stages {_eta(left * (time.time() - started) / trained)}'
             if trained else '')
      logging.info('Stage %d/%d: %s (%s) in %s%s', i + 1, len(order), name,
                   stage.objective, stage_dir, eta)
      if not stage_finished(stage, stage_dir):
        train_one(stage, stage_dir)
        trained += steps[name]
    if spec.trains_base:
      export_pipeline(stage_dir)
    if spec.part:
      export_part(stage_dir, spec.part)
  if only:
    logging.info('Trained %s; no report (a launch without the stage list reports).',
                 ', '.join(chosen))
  elif 'report' in config:
    logging.info('Report: evaluating the stages on held-out items...')
    REPORTS[config.report.get('kind', 'compare')](config, workdir)


def report_dir(report, workdir: str) -> str:
  """Where a config's ``report`` goes: <workdir>/<report.folder> ('report'; a launch of
  some of a table's seeds names its own, `quickstart.size_of`, so launches can share a
  workdir)."""
  return os.path.join(workdir, report.get('folder', 'report'))


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
  out_dir = report_dir(config.report, workdir)
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
# ---------------------------------------------------------------- personalization
PERSONAL_METRICS = ('color_acc', 'pattern_acc', 'background_acc', 'position_acc')


def _asked(mode: str) -> str:
  """The mode's editability twin (another scene than the reference's, `evaluate`'s
  '<mode>_edit'), where evaluate has it."""
  return mode + '_edit' if mode + '_edit' in evaluate.MODES else mode


def _predict_seconds(run: runs.Run, contexts) -> float:
  """The hypernetwork's forward per subject, compiled (the 'Only Hyper' cost)."""
  jax.block_until_ready(runs.lora(run, {'context': contexts}))
  start = time.perf_counter()
  jax.block_until_ready(runs.lora(run, {'context': contexts}))
  return (time.perf_counter() - start) / len(contexts)


def personalization_report(config, workdir: str) -> dict:
  """HyperDreamBooth's Table 3 on the first ``report.num_examples`` test examples, each
  one held-out subject whose context image is its reference photo; writes
  <workdir>/report/results.md, results.json and grid.png.

  ``report.rows``: in order, {name, runs: the stage(s) it uses (one per report seed, or
  one for all), mode: 'hyperlora' (the run's LoRA) | 'no_lora' | 'oracle', and for
  fine-tuned rows steps, from_scratch, rank, lr (`finetune.personalize`; the
  fine-tuning seed is the report seed) and prompt: 'static' (the supervisory prompt, the
  default) | 'caption' (each subject's own prompt, its scene in words)}. Every personal
  model is asked for another scene than its reference's where evaluate scores
  editability (`_asked`), with the S* prompt (the oracle: the item in words). Columns:
  the item's color and pattern (fidelity), the background and figure position
  (editability), steps, seconds per subject.
  """
  r = config.report
  seeds, n = tuple(r.seeds), r.num_examples
  restored, rows, costs, records_of = {}, {}, {}, {}
  for row in r.rows:
    name = row['name']
    stage_dirs = [os.path.join(workdir, s) for s in row['runs']]
    for d in stage_dirs:
      if d not in restored:
        restored[d] = runs.restore(d)
    first = restored[stage_dirs[0]]
    data = first.config.data.to_json(sort_keys=True)  # Rows' runs share it: read once.
    if data not in records_of:
      records_of[data] = data_pipeline.load_records(first.config.data, 'test', range(n))
    records = records_of[data]
    contexts = records['context']
    if row.get('steps') is None:
      rows[name] = (stage_dirs if len(stage_dirs) > 1 else stage_dirs[0],
                    _asked(row['mode']))
      costs[name] = (0, _predict_seconds(first, contexts) if row['mode'] == 'hyperlora'
                     else 0.0)
      continue
    personal = [finetune.personalize(
        restored[stage_dirs[k % len(stage_dirs)]], contexts, steps=row['steps'],
        rank=row['rank'], lr=row['lr'], from_scratch=row['from_scratch'], seed=seed,
        prompt=_fine_prompts(row.get('prompt', 'static'), records), subject_key='index')
        for k, seed in enumerate(seeds)]
    rows[name] = ([p.run for p in personal] if len(seeds) > 1 else personal[0].run,
                  _asked(row['mode']))
    costs[name] = (row['steps'], float(np.mean([(p.prepare_s + p.fit_s) / n
                                                for p in personal])))
  out_dir = report_dir(config.report, workdir)
  results = evaluate.compare(rows, out_dir, num_examples=n, num_steps=r.num_steps,
                             guidance=r.guidance, seeds=seeds, batch_size=n)
  for name, (steps, seconds) in costs.items():
    results['rows'][name].update(steps=steps, seconds_per_subject=seconds)
  files.write_json(os.path.join(out_dir, 'results.json'), results)
  files.write_text(os.path.join(out_dir, 'results.md'), personalization_table(results))
  logging.info('Results (%s):\n%s', out_dir, personalization_table(results))
  return results


def _fine_prompts(kind: str, records: dict):
  """A fine-tuned row's prompts: None (the static one) or each subject's caption (its
  scene prompt, with S*)."""
  if kind not in ('static', 'caption'):
    raise ValueError(f"report row prompt={kind!r}: 'static' or 'caption'.")
  if kind == 'static':
    return None
  if 'prompt_scene' not in records:
    raise ValueError('report row prompt=caption: these examples have no scene prompt '
                     '(the synthetic task has).')
  return [str(p) for p in records['prompt_scene']]


def personalization_table(results: dict) -> str:
  rows = results['rows']
  first = next(iter(rows.values()))['metrics']
  metrics = [k for k in PERSONAL_METRICS if k in first]
  seeds = results['settings']['seeds']
  spread = lambda v: v.get('seed_std', v['std']) if len(seeds) > 1 else v['std']
  head = ['Row'] + [k.replace('_acc', ' acc (%)') for k in metrics] + [
      'steps', 's / subject']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for name, row in rows.items():
    m = row['metrics']
    lines.append('| ' + ' | '.join(
        [name] + [f'{100 * m[k]["mean"]:.1f} ± {100 * spread(m[k]):.1f}' for k in metrics]
        + [str(row['steps']), f'{row["seconds_per_subject"]:.3f}']) + ' |')
  asked = any(row['mode'].endswith('_edit') for row in rows.values())
  notes = (f'{first["num_examples"]} held-out subjects (test examples; the reference '
           'photo is the context image), '
           + ("each asked for another scene than its reference's (background and "
              'position both differ), scored against that scene. '
              if asked else "each asked for its reference's own scene. ")
           + f'{results["settings"]["num_steps"]} DDIM steps, guidance '
           f'{results["settings"]["guidance"]}, seeds {seeds}; ± is the std over '
           + ('the seeds (one training / fine-tuning run each).' if len(seeds) > 1
              else 'subjects.') + ' s / subject: the hypernetwork and the fine-tuning '
           'loop after compilation, all subjects in one batch, divided by their number.')
  return '\n'.join(lines) + '\n\n' + notes + '\n'


def _attachment(addons: dict, workdir: str) -> dict:
  """An evaluation group's add-ons ({section: keys}) with 'stage:<name>' resolved."""
  out = {}
  for name, keys in (addons or {}).items():
    out[name] = {}
    for key, value in dict(keys).items():
      source = _stage_folder(value, workdir)
      out[name][key] = (os.path.join(source, STAGE_KEYS.get(f'model.{name}.{key}', ''))
                        if source else value)
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
  out_dir = report_dir(config.report, workdir)
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
                                               {'attach': attach} if attach else {})
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


# ---------------------------------------------------------------- merging (LoRA.rar)
def _zoo(folder: str) -> tuple:
  """(subjects, their LoRA trees) of a zoo bank stage (its standard LoRA files)."""
  keys = lorarar.zoo_keys(folder)
  return keys, [lora_files.load_lora_file(preoptimize.lora_file(folder, k)) for k in keys]


def _timed(fn, items) -> tuple:
  """([fn(item)], seconds per item after the first call, which compiles)."""
  out = [jax.block_until_ready(fn(items[0]))]
  start = time.perf_counter()
  out += [jax.block_until_ready(fn(x)) for x in items[1:]]
  return out, (time.perf_counter() - start) / max(1, len(items) - 1)


def _generate(merger_run: runs.Run, trees, prompts, r, seed) -> np.ndarray:
  """Images of one LoRA per prompt: a bank Run whose fixed per-sample LoRAs are `trees`
  (`lora_bank.bank`, its own rows at zero), sampled as any per-sample run."""
  stacked = {p: {k: np.stack([np.asarray(lora_lib.to_plain(t[p])[k]) for t in trees])
                 for k in ('down', 'up')} for p in trees[0]}
  objective = lora_bank.bank(merger_run.config, merger_run.objective.models,
                             merger_run.objective.frozen, jax.random.key(0), len(trees),
                             stacked, subject_key='index')
  run = runs.Run(merger_run.config, objective._replace(trainable=None), objective.trainable)
  return np.asarray(sample.generate(run, None, prompts, inputs={'index': np.arange(
      len(trees))}, num_steps=r.num_steps, guidance=r.guidance, seed=seed))


def merging_report(config, workdir: str) -> dict:
  """LoRA.rar's table on held-out content-style pairs: every content LoRA of the
  ``report.content`` stage (held-out items: the test split's) with every style LoRA of
  ``report.style``, up to ``report.num_pairs``; none of these items was ever seen in a
  style. Rows: the content LoRA alone, the style LoRA alone, the direct sum, ZipLoRA
  (``report.ziplora_steps`` steps per pair through the base, on the content's and a
  style image's noised latents and the item's scene prompt), and LoRA.rar (the
  ``report.merger`` stages, one per training seed). Each image is asked for the item's
  scene prompt and scored analytically: content (the item's color in its box,
  `synthetic.color_and_pattern_of`), style (`synthetic.style_of`), both; merge seconds
  per pair (compiled). Writes <workdir>/report/results.md, results.json, grid.png."""
  r = config.report
  mergers = [runs.restore(os.path.join(workdir, s)) for s in r.merger]
  first = mergers[0]
  content_keys, contents = _zoo(os.path.join(workdir, r.content))
  style_keys, styles = _zoo(os.path.join(workdir, r.style))
  pairs = [(c, s) for c in range(len(contents)) for s in range(len(styles))][:r.num_pairs]
  data = first.config.data
  test = data_pipeline.subject_records(data, 'test', 'content')
  train = data_pipeline.subject_records(data, 'train', 'style')
  ex = data_pipeline.load_records(data, 'test', [test[content_keys[c]][0] for c, _ in pairs])
  style_ex = data_pipeline.load_records(data, 'train', [train[style_keys[s]][0]
                                                        for _, s in pairs])
  prompts = [str(p) for p in ex['prompt_scene']]
  models = first.objective.models
  predict = objectives.predictor(models, data.resolution)
  base = runs.base_params(first)
  ids = objectives.tokenize(models, prompts)
  noise = jax.random.normal(jax.random.key(1), ex['target'].shape[1:])
  t = np.array([models.schedule.num_train_timesteps // 2])

  def inputs(i):
    side = lambda image: {'x': diffusion.add_noise(models.schedule, image[None],
                                                    noise[None], t),
                          't': t, 'input_ids': tuple(x[i:i + 1] for x in ids)}
    return {'content': side(ex['target'][i]), 'style': side(style_ex['target'][i])}

  # (content, style, pair index) -> the LoRA; sum and LoRA.rar compiled, ZipLoRA (which
  # compiles its loop) optimized on pair i's inputs.
  direct_sum = jax.jit(lambda c, s: merging.merge(c, s))
  methods = {
      'content LoRA alone': lambda c, s, i: c,
      'style LoRA alone': lambda c, s, i: s,
      'direct sum': lambda c, s, i: direct_sum(c, s),
      f'ZipLoRA ({r.ziplora_steps} steps)': lambda c, s, i: merging.merge(
          c, s, 'ziplora', predict=predict, base=base, inputs=inputs(i),
          steps=r.ziplora_steps, lr=r.ziplora_lr),
  }
  for k, run in enumerate(mergers):
    # The params an argument, not constants: every seed's merger compiles to the same
    # program (read from the compilation cache after the first).
    m = merge.trained_merger(run)
    rar = jax.jit(lambda c, s, params, module=m.module: merging.merge(
        c, s, 'lorarar', merger=merging.TrainedMerger(module, params)))
    methods[f'LoRA.rar #{k}'] = lambda c, s, i, rar=rar, params=m.params: rar(c, s, params)
  truth = {'color': ex['color'], 'style': np.array([synthetic.STYLES.index(style_keys[s])
                                                    for _, s in pairs])}
  scores, seconds, shown = {}, {}, {}
  for name, fn in methods.items():
    logging.info('Merging report: %s on %d pairs', name, len(pairs))
    call = lambda i, fn=fn: fn(contents[pairs[i][0]], styles[pairs[i][1]], i)
    trees, seconds[name] = _timed(call, list(range(len(pairs))))
    for seed in r.seeds:
      images_ = _generate(first, trees, prompts, r, seed)
      shown.setdefault(name, images_)
      content = np.array([synthetic.color_and_pattern_of(x, b)[0]
                          for x, b in zip(images_, ex['box'])]) == truth['color']
      style = np.array([synthetic.style_of(x) for x in images_]) == truth['style']
      scores.setdefault(name.split(' #')[0], []).append(
          {'content_acc': content.mean(), 'style_acc': style.mean(),
           'both_acc': (content & style).mean(), 'seconds': seconds[name]})
  return _write_merging(workdir, r, scores, shown, ex, style_ex, len(pairs))


def _write_merging(workdir, r, scores, shown, ex, style_ex, num_pairs) -> dict:
  out_dir = report_dir(r, workdir)
  os.makedirs(out_dir, exist_ok=True)
  rows = {name: {k: {'mean': float(np.mean([x[k] for x in runs_])),
                     'std': float(np.std([x[k] for x in runs_]))} for k in runs_[0]}
          for name, runs_ in scores.items()}
  lines = ['| Row | content acc (%) | style acc (%) | both (%) | merge s / pair |',
           '|---|---|---|---|---|']
  for name, m in rows.items():
    lines.append(f'| {name} | ' + ' | '.join(
        f'{100 * m[k]["mean"]:.1f} ± {100 * m[k]["std"]:.1f}'
        for k in ('content_acc', 'style_acc', 'both_acc')) + f' | {m["seconds"]["mean"]:.2g} |')
  lines.append(f'\n{num_pairs} held-out content-style pairs (test items, never seen in a '
               f'style), sampling seeds {list(r.seeds)}; mean ± std over seeds and, for '
               'LoRA.rar, its training seeds. content: the item\'s color read in its box; '
               'style: the frame read on the border.')
  table = '\n'.join(lines)
  files.write_json(os.path.join(out_dir, 'results.json'),
                   {'rows': rows, 'num_pairs': num_pairs, 'seeds': list(r.seeds)}, indent=2)
  files.write_text(os.path.join(out_dir, 'results.md'), table + '\n')
  g = min(r.grid_pairs, num_pairs)
  cells = np.stack([ex['target'][:g], style_ex['target'][:g]]
                   + [v[:g] for v in shown.values()], 1)
  files.save_image(images.grid(cells, ['content image', 'style image', *shown]),
                   os.path.join(out_dir, 'grid.png'))
  logging.info('Results (%s):\n%s', out_dir, table)
  return {'rows': rows, 'table': table}


REPORTS = {'compare': report, 'grouped': grouped_report,
           'personalization': personalization_report, 'merging': merging_report}
