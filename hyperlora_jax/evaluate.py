r"""Evaluation: synthetic-task accuracy, CLIP metrics, comparison tables and grids.

  python -m hyperlora_jax.evaluate --workdir=RUN --split=test [--clip=CLIP_FOLDER]

writes RUN/eval/results.json, results.md and grid.png for the run's modes:

  hyperlora    scene prompt (with S*) + the LoRA predicted from the context image
  single_lora  scene prompt + the run's one shared LoRA (unet_lora runs)
  no_lora      scene prompt, base model alone
  oracle       full prompt (names the item), base model alone (synthetic only)

Synthetic metrics: each generated image's item color and pattern are read at
the ground-truth box with `synthetic.color_and_pattern_of` and compared with
the held-out item's; accuracy over examples (and sampling seeds).

CLIP metrics (the recontextualization paper, after Ruiz et al.): cosine
similarities of CLIP image embeddings, C2G (context, generated), T2G (target,
generated), T2Gdiff = |C2G - C2T| (C2T: context, target); CLIP-T (prompt,
generated; the full prompt on synthetic data) where the CLIP folder has a text
tower with its projection. Means and stds over examples.

`compare` evaluates rows from several runs on the same examples and seeds, and
reports the fraction of the no-LoRA -> oracle gap each row recovers.
`evaluate_fn` is the training loop's eval hook.
"""
import collections
import functools
import json
import os
from typing import Any, Mapping, NamedTuple, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from hyperlora_jax import cli
from hyperlora_jax import objectives
from hyperlora_jax import runs
from hyperlora_jax import sample
from hyperlora_jax.convert import clip_folders, core
from hyperlora_jax.data import images as image_io
from hyperlora_jax.data import pipeline
from hyperlora_jax.data import synthetic
from hyperlora_jax.models import clip

# mode -> (prompt, the kind of LoRA it applies: the run's `Spec.lora_kind`, or None for
# the base model alone)
MODES = {
    'hyperlora': ('scene', 'predicted'),
    'single_lora': ('scene', 'shared'),
    'no_lora': ('scene', None),
    'oracle': ('full', None),
}
SYNTHETIC = ('color_acc', 'pattern_acc')
CLIP_METRICS = ('C2G', 'T2G', 'T2Gdiff', 'CLIP-T')


def own_mode(spec: objectives.Spec) -> str:
  """The mode of a run's own output: its LoRA's, or the oracle (the base model it
  trains, given the full prompt) for runs without a LoRA."""
  return next((m for m, (_, kind) in MODES.items() if kind and kind == spec.lora_kind),
              'oracle')


def default_modes(config) -> tuple:
  own = own_mode(objectives.spec(config.objective))
  modes = (() if own == 'oracle' else (own,)) + ('no_lora',)
  return modes + ('oracle',) if config.data.name == 'synthetic' else modes


def check_mode_name(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f'Unknown mode {mode!r}; one of {sorted(MODES)}.')


def check_mode(config, mode: str) -> None:
  check_mode_name(mode)
  prompt, kind = MODES[mode]
  spec = objectives.spec(config.objective)
  if kind is not None and kind != spec.lora_kind:
    having = [s.name for s in objectives.REGISTRY.values() if s.lora_kind == kind]
    raise ValueError(f'Mode {mode!r} needs a {" or ".join(having)} run; '
                     f'this is a {spec.name} run.')
  if prompt == 'full' and config.data.name != 'synthetic':
    raise ValueError(f'Mode {mode!r} needs full prompts (synthetic data); the '
                     f'run uses {config.data.name!r} data.')


def _prompts(batch, kind: str) -> list:
  key = 'prompt_full' if kind == 'full' else (
      'prompt_scene' if 'prompt_scene' in batch else 'prompt')
  return [p.decode() if isinstance(p, bytes) else str(p) for p in batch[key]]


def batches(config, split: str, num_examples: Optional[int], batch_size: int):
  """(batch, rows to use) over the split in order. Batches keep one shape
  (padding included), so the sampler compiles once."""
  left = num_examples or np.inf
  for batch in pipeline.create_dataset(
      config.data, split, process_index=0, process_count=1, num_epochs=1,
      shuffle=False, batch_size=batch_size):
    n = int(min(batch['valid'].sum(), left))  # Padding rows come last.
    if n <= 0:
      return
    yield batch, n
    left -= n


def score_synthetic(images, batch) -> dict:
  """Per-example correctness {color_acc, pattern_acc} [B] of images [B, H, W,
  3] against the batch's ground truth, read at its item boxes."""
  read = np.array([synthetic.color_and_pattern_of(image, box)
                   for image, box in zip(np.asarray(images), batch['box'])])
  return {'color_acc': (read[:, 0] == batch['color']).astype(np.float32),
          'pattern_acc': (read[:, 1] == batch['pattern']).astype(np.float32)}


# ---------------------------------------------------------------- CLIP


class CLIPScorer(NamedTuple):
  vision: Any
  vision_params: Any
  text: Optional[Any]  # None: no CLIP-T (see note)
  text_params: Optional[Any]
  text_projection: Optional[np.ndarray]  # [d_text, d_proj]
  tokenizer: Optional[Any]
  note: str


def load_clip(folder: str) -> CLIPScorer:
  """Our CLIP towers from a local transformers folder (a CLIPModel, or a
  vision tower alone: then CLIP-T is skipped and `note` says why)."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'No such CLIP folder: {folder}')
  vision, vision_params, config = clip_folders.load_vision_model(folder)
  if vision.projection_dim is None:
    raise ValueError(f'{folder} is a CLIP vision tower without its projection; '
                     'the metrics compare projected image embeddings.')
  missing = []
  if not config.get('text_config'):
    missing.append('a text tower (it is not a CLIPModel)')
  else:
    state = core.read_model_folder(folder)[1]
    if 'text_projection.weight' not in state:
      missing.append('text_projection.weight')
    if not os.path.exists(os.path.join(folder, 'vocab.json')):
      missing.append('tokenizer files (vocab.json, merges.txt)')
  if missing:
    return CLIPScorer(vision, vision_params, None, None, None, None,
                      f'CLIP-T skipped: {folder} has no {" and no ".join(missing)}.')
  text, text_params, _ = clip_folders.load_text_model(folder)
  return CLIPScorer(vision, vision_params, text, text_params,
                    state['text_projection.weight'].T, clip_folders.load_tokenizer(folder), '')


@jax.jit
def _unit(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def image_embeddings(scorer: CLIPScorer, images) -> np.ndarray:
  """Unit CLIP image embeddings [N, D] of images [N, H, W, 3] in [-1, 1]."""
  pixels = clip.preprocess_images((jnp.asarray(images) + 1) / 2,
                                  scorer.vision.image_size)
  out = _apply(scorer.vision, scorer.vision_params, pixels)
  return np.asarray(_unit(out.image_embeds))


def text_embeddings(scorer: CLIPScorer, prompts: Sequence[str]) -> np.ndarray:
  ids = clip.tokenize(scorer.tokenizer, prompts, scorer.text.max_position_embeddings)
  pooled = _apply(scorer.text, scorer.text_params, jnp.asarray(ids)).pooler_output
  return np.asarray(_unit(pooled @ scorer.text_projection))


@functools.partial(jax.jit, static_argnums=0)
def _apply(module, params, x):
  return module.apply({'params': params}, x)


def clip_scores(scorer: CLIPScorer, generated, context, target,
                prompts: Optional[Sequence[str]] = None) -> dict:
  """Per-example C2G, T2G, T2Gdiff (and CLIP-T) [N] as numpy arrays."""
  g, c, t = (image_embeddings(scorer, x) for x in (generated, context, target))
  c2g, t2g, c2t = (np.sum(a * b, -1) for a, b in ((c, g), (t, g), (c, t)))
  out = {'C2G': c2g, 'T2G': t2g, 'T2Gdiff': np.abs(c2g - c2t)}
  if scorer.text is not None and prompts is not None:
    out['CLIP-T'] = np.sum(text_embeddings(scorer, prompts) * g, -1)
  return out


# ---------------------------------------------------------------- one mode


def _summary(per_seed: Sequence[Mapping[str, np.ndarray]]) -> dict:
  """metric -> mean, std over examples (of each example's mean over seeds)
  and, with several seeds, seed_std (of the per-seed means); plus
  'num_examples'."""
  out = {'num_examples': len(next(iter(per_seed[0].values()), ()))}
  for name in per_seed[0]:
    a = np.stack([s[name] for s in per_seed])  # [seeds, examples]
    out[name] = {'mean': float(a.mean()), 'std': float(a.mean(0).std())}
    if len(a) > 1:
      out[name]['seed_std'] = float(a.mean(1).std())
  return out


def evaluate_mode(run: runs.Run, mode: str, **kwargs):
  """Generates the split's first `num_examples` (None: all) in `mode` for
  every seed and scores them (keyword arguments: `score_mode`'s).

  Returns:
    (metrics, kept): metrics as `_summary`; kept holds
    'context', 'target', 'generated' [<= keep, H, W, 3] of the first seed.
  """
  per_seed, kept = score_mode(run, mode, **kwargs)
  return _summary(per_seed), kept


def score_mode(run: runs.Run, mode: str, *, split='test',
               num_examples: Optional[int] = None, num_steps=25, guidance=3.0,
               seeds=(0,), sampler='ddim', batch_size: Optional[int] = None,
               scorer: Optional[CLIPScorer] = None, keep: int = 0):
  """`evaluate_mode` before the summary: ([{metric: [examples]} per seed], kept)."""
  check_mode(run.config, mode)
  prompt_kind, lora_kind = MODES[mode]
  per_seed, kept = [], collections.defaultdict(list)
  for i, seed in enumerate(seeds):
    scores = collections.defaultdict(list)
    for batch, n in batches(run.config, split, num_examples,
                            batch_size or run.config.train.batch_size):
      prompts = _prompts(batch, prompt_kind)
      images = np.asarray(sample.generate(
          run, batch['context'], prompts, num_steps=num_steps, guidance=guidance,
          sampler=sampler, seed=seed, use_lora=lora_kind is not None,
          image_ids=batch['index'], inputs={k: batch[k] for k in run.spec.lora_inputs}))
      found = score_synthetic(images, batch) if 'color' in batch else {}
      if scorer is not None:
        # CLIP-T against what the image should show: the full prompt if any.
        described = _prompts(batch, 'full') if 'prompt_full' in batch else prompts
        found.update(clip_scores(scorer, images, batch['context'],
                                 batch['target'], described))
      for name, values in found.items():
        scores[name].append(values[:n])
      room = keep - sum(len(x) for x in kept['generated'])
      if i == 0 and room > 0:
        for name, x in (('context', batch['context']),
                        ('target', batch['target']), ('generated', images)):
          kept[name].append(np.asarray(x)[:min(n, room)])
    per_seed.append({k: np.concatenate(v) for k, v in scores.items()})
  return per_seed, {k: np.concatenate(v) for k, v in kept.items() if v}


# ---------------------------------------------------------------- compare


def _gaps(rows: dict) -> None:
  """Adds gap_recovered = (row - no_lora) / (oracle - no_lora) per synthetic
  metric to every row, when a no_lora and an oracle row exist."""
  ends = [next((r for r in rows.values() if r['mode'] == m), None)
          for m in ('no_lora', 'oracle')]
  if None in ends:
    return
  low, high = (e['metrics'] for e in ends)
  for row in rows.values():
    row['gap_recovered'] = {
        k: (row['metrics'][k]['mean'] - low[k]['mean'])
        / (high[k]['mean'] - low[k]['mean'])
        if k in low and high[k]['mean'] != low[k]['mean'] else None
        for k in SYNTHETIC if k in row['metrics']}


def markdown_table(results: dict) -> str:
  rows = results['rows']
  first = next(iter(rows.values()))['metrics']
  synth = [k for k in SYNTHETIC if k in first]
  clip_cols = [k for k in CLIP_METRICS if k in first]
  gaps = any('gap_recovered' in r for r in rows.values())
  seeds = len(results['settings']['seeds'])
  head = (['Row', 'Mode'] + [k.replace('_acc', ' acc (%)') for k in synth]
          + [f'{k.split("_")[0]} gap recovered' for k in synth if gaps]
          + clip_cols)
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for name, row in rows.items():
    m = row['metrics']
    spread = lambda v: v.get('seed_std', v['std']) if seeds > 1 else v['std']
    cells = [name, row['mode']]
    cells += [f'{100 * m[k]["mean"]:.1f} ± {100 * spread(m[k]):.1f}' for k in synth]
    if gaps:
      gap = row.get('gap_recovered', {})
      cells += ['' if gap.get(k) is None else f'{round(100 * gap[k])}%'
                for k in synth]
    cells += [f'{m[k]["mean"]:.3f} ± {m[k]["std"]:.3f}' for k in clip_cols]
    lines.append('| ' + ' | '.join(cells) + ' |')
  s = results['settings']
  notes = [f'{first["num_examples"]} {s["split"]} examples, {s["num_steps"]} '
           f'{s["sampler"]} steps, guidance {s["guidance"]}, sampling seeds '
           f'{s["seeds"]}. Accuracy ± is the std over '
           + (f'the {seeds} seeds (rows of several runs: one run per training '
              'seed, sampled with its seed; other rows: the sampling seeds).'
              if seeds > 1 else 'examples.')]
  if clip_cols:
    notes.append('CLIP metrics: mean ± std over examples.')
  if gaps:
    notes.append('Gap recovered: (row - no_lora) / (oracle - no_lora).')
  notes += [results['clip_note']] if results.get('clip_note') else []
  return '\n'.join(lines) + '\n\n' + ' '.join(notes) + '\n'


def compare(rows: Mapping[str, tuple], out_dir: str, *, split='test',
            num_examples: Optional[int] = 200, num_steps=25, guidance=3.0,
            seeds=(0,), sampler='ddim', batch_size: Optional[int] = None,
            grid_examples=8, clip_folder: Optional[str] = None) -> dict:
  """Evaluates rows {name: (workdir, mode)} on the same examples and seeds.

  A row's workdir may be a list of runs that differ only in their training
  seed, as many as `seeds`: run k is sampled with seeds[k], and the row's
  spread is over those runs. A single run is sampled with every seed. A
  workdir may also be a `runs.Run` already in memory (e.g. fine-tuned ones).

  Writes out_dir/results.json, results.md (one table row per entry, in
  order) and grid.png (first `grid_examples` examples; columns: context,
  ground truth, then each row, its first run). Returns the results dict.
  """
  several = lambda w: isinstance(w, (list, tuple)) and not isinstance(w, runs.Run)
  where = lambda w: (f'{w.workdir} ({w.spec.name}, in memory)' if isinstance(w, runs.Run)
                     else str(w))
  for name, (workdirs, mode) in rows.items():
    check_mode_name(mode)
    if several(workdirs) and len(workdirs) != len(seeds):
      raise ValueError(f'Row {name!r} has {len(workdirs)} runs but there are '
                       f'{len(seeds)} seeds: give one run per seed.')
  scorer = load_clip(clip_folder) if clip_folder else None
  restored, results, columns = {}, {}, []
  for name, (workdirs, mode) in rows.items():
    pairs = (list(zip(workdirs, [(s,) for s in seeds]))
             if several(workdirs) else [(workdirs, tuple(seeds))])
    per_seed = []
    for k, (workdir, run_seeds) in enumerate(pairs):
      if isinstance(workdir, runs.Run):
        run = workdir
      else:
        if workdir not in restored:
          restored[workdir] = runs.restore(workdir)
        run = restored[workdir]
      logging.info('Evaluating %s: %s in %s, seeds %s.', name, mode, where(workdir),
                   run_seeds)
      scores, kept = score_mode(
          run, mode, split=split, num_examples=num_examples,
          num_steps=num_steps, guidance=guidance, seeds=run_seeds, sampler=sampler,
          batch_size=batch_size, scorer=scorer, keep=grid_examples if k == 0 else 0)
      per_seed += scores
      if k == 0:
        if columns and not np.array_equal(kept['context'], columns[0]):
          raise ValueError(f'Row {name!r} ({where(workdir)}) sees other {split} examples '
                           'than the first row: compare runs of one data config.')
        columns = columns or [kept['context'], kept['target']]
        columns.append(kept['generated'])
    results[name] = {'workdir': [where(w) for w, _ in pairs] if len(pairs) > 1
                                else where(pairs[0][0]),
                     'mode': mode, 'objective': run.spec.name,
                     'metrics': _summary(per_seed)}
  _gaps(results)
  out = {'settings': dict(split=split, num_examples=num_examples,
                          num_steps=num_steps, guidance=guidance,
                          seeds=list(seeds), sampler=sampler),
         'rows': results, 'clip_note': scorer.note if scorer else ''}
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'results.json'), 'w') as f:
    json.dump(out, f, indent=2)
  with open(os.path.join(out_dir, 'results.md'), 'w') as f:
    f.write(markdown_table(out))
  image_io.grid(np.stack(columns, axis=1), ['context', 'ground truth'] + list(rows)
                ).save(os.path.join(out_dir, 'grid.png'))
  return out


# ---------------------------------------------------------------- train hook


def evaluate_fn(config, objective, params, step, writer):
  """The training loop's eval hook: accuracy of the run's own mode on a few
  test examples with a short sampler (config.eval); synthetic data only."""
  settings = config.eval
  if (config.data.name != 'synthetic' or not settings.num_examples
      or jax.process_count() > 1):  # Hosts would each need the whole batch.
    return None
  mode = own_mode(objective.spec)
  metrics, kept = evaluate_mode(
      runs.Run(config, objective, params, step=step), mode,
      num_examples=settings.num_examples, num_steps=settings.num_steps,
      guidance=settings.guidance, keep=4)
  scalars = {f'eval/{mode}/{k}': v['mean'] for k, v in metrics.items()
             if isinstance(v, dict)}
  logging.info('step %d  %s', step,
               '  '.join(f'{k} {v:.3f}' for k, v in scalars.items()))
  if writer is not None:
    cells = np.stack([kept['context'], kept['target'], kept['generated']], 1)
    writer.write_images(step, {f'eval/{mode}/samples': np.asarray(image_io.grid(
        cells, ['context', 'target', mode], min_cell=32))})
  return scalars


# ---------------------------------------------------------------- CLI


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  modes = f.modes or default_modes(runs.load_config(f.workdir))
  out = f.out or os.path.join(f.workdir, 'eval')
  results = compare({m: (f.workdir, m) for m in modes}, out, split=f.split,
                    num_examples=f.num_examples or None, num_steps=f.num_steps,
                    guidance=f.guidance, seeds=[int(s) for s in f.seeds],
                    sampler=f.sampler, batch_size=f.batch_size,
                    grid_examples=f.grid_examples, clip_folder=f.clip)
  print(markdown_table(results))
  print(f'Wrote results.json, results.md and grid.png to {out}')


def _flags():
  flags.DEFINE_string('workdir', None, 'A training run.')
  flags.DEFINE_string('split', 'test', 'Data split.')
  flags.DEFINE_string('clip', None, 'A local transformers CLIP folder: adds '
                      'C2G, T2G, T2Gdiff (and CLIP-T with a text tower).')
  flags.DEFINE_list('modes', None, f'Modes ({", ".join(MODES)}); default: '
                    'every mode the run has.')
  flags.DEFINE_integer('num_examples', 200, 'Examples (0: the whole split).')
  flags.DEFINE_integer('num_steps', 25, 'Sampler steps.')
  flags.DEFINE_float('guidance', 3.0, 'Classifier-free guidance scale.')
  flags.DEFINE_list('seeds', ['0'], 'Sampling seeds.')
  flags.DEFINE_enum('sampler', 'ddim', ('ddim', 'dpmpp_2m'), 'Sampler.')
  flags.DEFINE_integer('batch_size', None, 'Default: the run\'s batch size.')
  flags.DEFINE_integer('grid_examples', 8, 'Examples in grid.png.')
  flags.DEFINE_string('out', None, 'Output folder (default <workdir>/eval).')
  flags.mark_flags_as_required(['workdir'])


def run():
  """The console script (`hyperlora-evaluate`)."""
  _flags()
  cli.run(__name__, cli.main_with_errors(main))


if __name__ == '__main__':
  run()
