r"""Evaluation: synthetic-task accuracy, CLIP metrics, comparison tables and grids; the
HyperDreamBooth paper's DINO, CLIP-I and CLIP-T on folders of images.

  python -m hyperlora_jax.evaluate --workdir=RUN --split=test [--clip=CLIP_FOLDER]

writes RUN/eval/results.json, results.md and grid.png for the run's modes:

  hyperlora    scene prompt (with S*) + the LoRA predicted from the context image
  single_lora  scene prompt + the run's one shared LoRA (unet_lora runs)
  ip_adapter   scene prompt + the image tokens of the context (ip_adapter runs, or a
               run with an IP-Adapter add-on), no LoRA
  no_lora      scene prompt, base model alone
  oracle       full prompt (names the item), base model alone (synthetic only)

A run's add-ons (config.model.controlnet / ip_adapter, or attached for the evaluation:
`compare`'s rows, `runs.restore(attach=...)`) are part of every mode: a ControlNet's
residuals from each example's condition image (its pose map), image tokens.

and, on synthetic data, each one's edit twin (hyperlora_edit, single_lora_edit,
no_lora_edit, oracle_edit; not run unless --modes names them): the same context
image and LoRA, the prompt asking for another scene than the example's
(`edit_prompts`), every metric scored against that asked scene: editability.

Synthetic metrics: each generated image's item color and pattern are read at
the ground-truth box with `synthetic.color_and_pattern_of`, its background and
figure position with `synthetic.scene_of`, and compared with the held-out
example's; accuracy over examples (and sampling seeds). On posed data
(data.pose), pose_acc: whether the figure is where and as large as the pose map
says (`synthetic.pose_adherence`: center within 0.06 of the side, vertical
spread within 10%), and pose_err, the center's distance (fraction of the side).

CLIP metrics (the recontextualization paper, after Ruiz et al.): cosine
similarities of CLIP image embeddings, C2G (context, generated), T2G (target,
generated), T2Gdiff = |C2G - C2T| (C2T: context, target); CLIP-T (prompt,
generated; the full prompt on synthetic data) where the CLIP folder has a text
tower with its projection. Means and stds over examples.

`compare` evaluates rows from several runs on the same examples and seeds, and
reports the fraction of the no-LoRA -> oracle gap each row recovers.
`evaluate_fn` is the training loop's eval hook.

Folder mode, for images made anywhere (`score_folders`):

  python -m hyperlora_jax.evaluate --generated=DIR --references=DIR \
    [--prompts=PROMPTS.json] --dino=DINO_FOLDER --clip=CLIP_FOLDER --out=DIR

pairs each generated image with the reference of the same file name and writes
results.json (mean, std and every pair's scores) and results.md: DINO (cosine of a
DINO ViT's CLS embeddings, e.g. facebook/dino-vits16), CLIP-I (of CLIP image
embeddings), CLIP-T (generated image vs its prompt, from {name: prompt}), as
DreamBooth defines them and HyperDreamBooth reports them.

Merge mode, one table from reports sampled with other seeds (`merge_reports`: e.g. a
three-seed table trained as two launches, seeds 0 and 1 and then seed 2):

  python -m hyperlora_jax.evaluate --merge=REPORT_A,REPORT_B --out=DIR
"""
import collections
import functools
import json
import os
import shutil
from typing import Any, Mapping, NamedTuple, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from hyperlora_jax import cli
from hyperlora_jax import files
from hyperlora_jax import objectives
from hyperlora_jax import runs
from hyperlora_jax import sample
from hyperlora_jax.convert import clip_folders, core, vit_folders
from hyperlora_jax.data import images as image_io
from hyperlora_jax.data import pipeline
from hyperlora_jax.data import subjects
from hyperlora_jax.data import synthetic
from hyperlora_jax.models import clip, init_variables, vit

# mode -> (prompt, the kind of LoRA it applies: the run's `Spec.lora_kind`, or None for
# the base model alone, or 'tokens' for none beside the image tokens of an IP-Adapter,
# the context images: the split's own or the robustness split's, drawn by
# `synthetic.robust_context` for the same held-out items)
MODES = {
    'hyperlora': ('scene', 'predicted', 'dataset'),
    'hyperlora_robust': ('scene', 'predicted', 'robust'),
    'single_lora': ('scene', 'shared', 'dataset'),
    'ip_adapter': ('scene', 'tokens', 'dataset'),
    'no_lora': ('scene', None, 'dataset'),
    'oracle': ('full', None, 'dataset'),
}
LORA_KINDS = ('predicted', 'shared')
# Per attribute value, the accuracy of the metric that reads it.
BREAKDOWNS = {'color': ('color_acc', synthetic.COLORS),
              'pattern': ('pattern_acc', synthetic.PATTERNS)}
# The robustness split's framing of an example (`synthetic.robust_factors`), for its rows'
# accuracy by how far a context is from the training contexts: the item's side against
# theirs (synthetic.CONTEXT_SIDE), the backdrop, the JPEG quality in thirds.
# attr -> (factor, bin edges or None for a category id, a name per bin).
_LO, _HI = synthetic.ROBUST_JPEG_QUALITY
_JPEG_EDGES = tuple(_LO + (_HI + 1 - _LO) * k // 3 for k in (1, 2))
ROBUST_BREAKDOWNS = {
    'robust_side': ('item_side', synthetic.CONTEXT_SIDE,
                    ('item smaller than in training', 'as in training', 'larger')),
    'robust_backdrop': ('backdrop', None, synthetic.ROBUST_BACKDROPS),
    'robust_jpeg': ('jpeg_quality', _JPEG_EDGES,
                    tuple(f'JPEG {a}-{b - 1}' for a, b in zip(
                        (_LO,) + _JPEG_EDGES, _JPEG_EDGES + (_HI + 1,)))),
}
# Each mode's edit twin (editability): the same subject (context image, LoRA) asked
# for another scene than its example's, scored against the asked scene (`edit_batch`).
EDIT = '_edit'
MODES.update({mode + EDIT: value for mode, value in list(MODES.items())})
SYNTHETIC = ('color_acc', 'pattern_acc')
SCENE = ('background_acc', 'position_acc')  # synthetic too; no gap columns
POSE = ('pose_acc', 'pose_err')  # posed synthetic data (data.pose)
CLIP_METRICS = ('C2G', 'T2G', 'T2Gdiff', 'CLIP-T')


def _has_tokens(spec: objectives.Spec, config=None) -> bool:
  """Whether a run's UNet calls take image tokens: its own (an ip_adapter run) or,
  given its config, an IP-Adapter add-on's (config.model.ip_adapter)."""
  return 'context' in spec.unet_inputs or bool(
      config is not None and config.model.ip_adapter.weights)


def own_mode(spec: objectives.Spec) -> str:
  """The mode of a run's own output: its LoRA's or its image tokens', or the oracle
  (the base model it trains, given the full prompt) for runs without either."""
  kind = spec.lora_kind or ('tokens' if _has_tokens(spec) else None)
  return next((m for m, (_, k, _) in MODES.items() if k and k == kind), 'oracle')


def default_modes(config) -> tuple:
  own = own_mode(objectives.spec(config.objective))
  modes = (() if own == 'oracle' else (own,)) + ('no_lora',)
  return modes + ('oracle',) if config.data.name == 'synthetic' else modes


def check_mode_name(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f'Unknown mode {mode!r}; one of {sorted(MODES)}.')


def check_mode(config, mode: str) -> None:
  check_mode_name(mode)
  prompt, kind, contexts = MODES[mode]
  spec = objectives.spec(config.objective)
  if kind == 'tokens' and not _has_tokens(spec, config):
    raise ValueError(f'Mode {mode!r} needs image tokens: an ip_adapter run, or a run '
                     f'with config.model.ip_adapter; this is a {spec.name} run without.')
  if kind in LORA_KINDS and kind != spec.lora_kind:
    having = [s.name for s in objectives.REGISTRY.values() if s.lora_kind == kind]
    raise ValueError(f'Mode {mode!r} needs a run with a {kind} LoRA ({", ".join(having)}); '
                     f'this is a {spec.name} run.')
  if (prompt == 'full' or contexts == 'robust') and config.data.name != 'synthetic':
    raise ValueError(f'Mode {mode!r} needs the synthetic task (full prompts, the '
                     f'robustness split); the run uses {config.data.name!r} data.')
  if mode.endswith(EDIT) and config.data.name != 'synthetic':
    raise ValueError(f'Mode {mode!r} asks for other synthetic scenes; the run uses '
                     f'{config.data.name!r} data.')


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
  """Per-example correctness {color_acc, pattern_acc, background_acc,
  position_acc} [B] of images [B, H, W, 3] against the batch's ground truth:
  the item read at its box, the scene with `synthetic.scene_of`; on posed data
  also pose_acc and pose_err (`synthetic.pose_adherence` against the target)."""
  read = np.array([synthetic.color_and_pattern_of(image, box)
                   for image, box in zip(np.asarray(images), batch['box'])])
  scene = np.array([synthetic.scene_of(image, box[2] - box[0])
                    for image, box in zip(np.asarray(images), batch['box'])])
  return {'color_acc': (read[:, 0] == batch['color']).astype(np.float32),
          'pattern_acc': (read[:, 1] == batch['pattern']).astype(np.float32),
          'background_acc': (scene[:, 0] == batch['background']).astype(np.float32),
          'position_acc': (scene[:, 1] == batch['position']).astype(np.float32),
          **_pose_scores(images, batch)}


def _pose_scores(images, batch) -> dict:
  if 'pose' not in batch:
    return {}
  found = np.array([synthetic.pose_adherence(image, target)
                    for image, target in zip(np.asarray(images), batch['target'])])
  return {'pose_acc': found[:, 0].astype(np.float32), 'pose_err': found[:, 1].astype(np.float32)}


def edit_prompts(batch, seed: int, kind: str = 'scene'):
  """Prompts that ask each example's item into another scene than its own.

  The asked scene differs from the example's in both background and position,
  so a model that draws the example's own scene whatever the prompt says
  scores zero on both; it is drawn from (seed, the example's index), so every
  row of a comparison asks for the same scenes.

  Args:
    batch: a synthetic batch (its item attributes, scene and 'index').
    seed: the draw's seed (`score_mode` passes the sampling seed).
    kind: 'scene' (S* for the item, as the LoRA modes) or 'full' (the item in
      words, the oracle's).

  Returns:
    (prompts [B], background [B], position [B]): the asked scenes' ids.
  """
  prompts, backgrounds, positions = [], [], []
  for i in range(len(batch['index'])):
    rng = np.random.default_rng([seed, int(batch['index'][i])])
    background = int(rng.choice([b for b in range(len(synthetic.BACKGROUNDS))
                                 if b != batch['background'][i]]))
    position = int(rng.choice([p for p in range(len(synthetic.POSITIONS))
                               if p != batch['position'][i]]))
    item = [int(batch[k][i]) for k in ('shape', 'color', 'pattern', 'color2')]
    prompts.append(synthetic.prompts(*item, background, position)[f'prompt_{kind}'])
    backgrounds.append(background)
    positions.append(position)
  return prompts, np.array(backgrounds, np.int32), np.array(positions, np.int32)


def edit_batch(batch, seed: int) -> dict:
  """The batch asking for `edit_prompts`' scenes: its prompts, scene ids, item
  boxes and targets (the ground truth of the asked scene, rendered) replaced;
  the context images, items and indices kept. On posed data the figure keeps its
  pose at the asked position, and its pose map ('condition') is drawn there."""
  scene, background, position = edit_prompts(batch, seed)
  full = edit_prompts(batch, seed, 'full')[0]
  resolution, size = batch['target'].shape[1], int(batch['box'][0][2] - batch['box'][0][0])
  targets, boxes, conditions = [], [], []
  for i in range(len(scene)):
    item = [int(batch[k][i]) for k in ('shape', 'color', 'pattern', 'color2')]
    pose = tuple(float(v) for v in batch['pose'][i]) if 'pose' in batch else None
    target, _, box = synthetic.target_image(item, background[i], position[i],
                                            resolution, size, pose)
    targets.append(image_io.normalize(target))
    boxes.append(box)
    conditions.append(image_io.normalize(synthetic.pose_map(resolution, position[i], pose)))
  more = {'condition': np.stack(conditions)} if 'pose' in batch else {}
  return dict(batch, prompt_scene=scene, prompt_full=full, background=background,
              position=position, box=np.stack(boxes), target=np.stack(targets), **more)


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
    missing.append('text tower (it is not a CLIPModel)')
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


def _summary(per_seed: Sequence[Mapping[str, np.ndarray]],
             labels: Optional[Mapping[str, np.ndarray]] = None) -> dict:
  """metric -> mean, std over examples (of each example's mean over seeds), se (the
  standard error of the mean over examples) and, with several seeds, seed_std (of the
  per-seed means); plus 'num_examples'. With the examples' ground-truth `labels`
  ('color', 'pattern'), 'by_color' / 'by_pattern': name -> mean, se, n of the metric
  that reads that attribute, over the examples of each value."""
  out = {'num_examples': len(next(iter(per_seed[0].values()), ()))}
  for name in per_seed[0]:
    a = np.stack([s[name] for s in per_seed])  # [seeds, examples]
    per_example = a.mean(0)
    out[name] = {'mean': float(a.mean()), 'std': float(per_example.std()),
                 'se': float(per_example.std() / np.sqrt(len(per_example)))}
    if len(a) > 1:
      out[name]['seed_std'] = float(a.mean(1).std())
  def groups(metric, label, names):
    per_example = np.stack([s[metric] for s in per_seed]).mean(0)
    found = {}
    for value, name in enumerate(names):
      x = per_example[label == value]
      if len(x):
        found[name] = {'mean': float(x.mean()), 'se': float(x.std() / np.sqrt(len(x))),
                       'n': int(len(x))}
    return found

  labels = labels or {}
  for attr, (metric, names) in BREAKDOWNS.items():
    if attr in labels and metric in per_seed[0]:
      out[f'by_{attr}'] = groups(metric, labels[attr], names)
  for attr, (_, _, names) in ROBUST_BREAKDOWNS.items():
    if attr in labels:
      out[f'by_{attr}'] = {m: groups(m, labels[attr], names)
                           for m in SYNTHETIC if m in per_seed[0]}
  return out


def evaluate_mode(run: runs.Run, mode: str, **kwargs):
  """Generates the split's first `num_examples` (None: all) in `mode` for
  every seed and scores them (keyword arguments: `score_mode`'s).

  Returns:
    (metrics, kept): metrics as `_summary`; kept holds
    'context', 'target', 'generated' [<= keep, H, W, 3] of the first seed.
  """
  per_seed, kept, labels = score_mode(run, mode, **kwargs)
  return _summary(per_seed, labels), kept


# Options of a row beside its mode (`compare`'s third element, `score_mode`'s keywords):
#   lora_scale      a number, or {part: scale} for a LoRA of parts (`Spec.lora_parts`):
#                   {'id': 1, 'base': 0} is a hyperlora_basis run's ID-LoRA alone
#   trigger         False: the prompts without the synthetic task's trigger S*
#   context_images  k: of each subject's set of context images, the first k only
#   attach          add-ons to restore the row's runs with ({section: keys}, `runs.restore`)
ROW_OPTIONS = ('lora_scale', 'trigger', 'context_images', 'attach')


def _lora_inputs(run: runs.Run, batch, context_images: Optional[int]):
  """The run's LoRA inputs from a batch (`Spec.lora_inputs`), its sets cut to their
  first `context_images` pictures."""
  inputs = {k: batch[k] for k in run.spec.lora_inputs}
  if context_images:
    if 'set_mask' not in inputs:
      raise ValueError(f'context_images={context_images}: a {run.spec.name} run reads one '
                       'context image per example, not a set.')
    mask = np.asarray(inputs['set_mask'])
    inputs['set_mask'] = mask & (np.arange(mask.shape[1]) < context_images)
  return inputs


def _first_context(context) -> np.ndarray:
  """One context image per example: the first of each set."""
  context = np.asarray(context)
  return context[:, 0] if context.ndim == 5 else context


def score_mode(run: runs.Run, mode: str, *, split='test',
               num_examples: Optional[int] = None, num_steps=25, guidance=3.0,
               seeds=(0,), sampler='ddim', batch_size: Optional[int] = None,
               scorer: Optional[CLIPScorer] = None, keep: int = 0, lora_scale=1.0,
               trigger: bool = True, context_images: Optional[int] = None):
  """`evaluate_mode` before the summary: ([{metric: [examples]} per seed], kept,
  the examples' ground-truth {'color', 'pattern'} on synthetic data). `lora_scale`,
  `trigger`, `context_images`: see `ROW_OPTIONS`."""
  check_mode(run.config, mode)
  if not trigger and run.config.data.name != 'synthetic':
    raise ValueError('trigger=False takes the synthetic task\'s S* out of its prompts; '
                     f'the run uses {run.config.data.name!r} data.')
  if num_examples is not None and num_examples < 0:
    raise ValueError(f'num_examples={num_examples}: must be >= 0 (0 or None: all).')
  prompt_kind, lora_kind, contexts = MODES[mode]
  per_seed, kept, labels = [], collections.defaultdict(list), collections.defaultdict(list)
  for i, seed in enumerate(seeds):
    scores = collections.defaultdict(list)
    for batch, n in batches(run.config, split, num_examples,
                            batch_size or run.config.train.batch_size):
      if contexts == 'robust':
        batch = dict(batch, context=robust_contexts(batch, run.config.data))
      if mode.endswith(EDIT):
        batch = edit_batch(batch, seed)
      prompts = _prompts(batch, prompt_kind)
      if not trigger:
        prompts = [subjects.without_trigger(p, synthetic.TOKEN) for p in prompts]
      images = np.asarray(sample.generate(
          run, None, prompts, num_steps=num_steps, guidance=guidance, sampler=sampler,
          seed=seed, use_lora=lora_kind in LORA_KINDS, image_ids=batch['index'],
          lora_scale=lora_scale, inputs=dict(
              {k: batch[k] for k in run.objective.unet_input_keys if k in batch},
              **_lora_inputs(run, batch, context_images))))
      found = score_synthetic(images, batch) if 'color' in batch else {}
      if scorer is not None:
        # CLIP-T against what the image should show: the full prompt if any.
        described = _prompts(batch, 'full') if 'prompt_full' in batch else prompts
        found.update(clip_scores(scorer, images, _first_context(batch['context']),
                                 batch['target'], described))
      for name, values in found.items():
        scores[name].append(values[:n])
      if i == 0 and 'color' in batch:
        for attr in BREAKDOWNS:
          labels[attr].append(np.asarray(batch[attr])[:n])
        for attr, values in robust_labels(batch['index'][:n], run.config.data).items():
          labels[attr].append(values)
      room = keep - sum(len(x) for x in kept['generated'])
      if i == 0 and room > 0:
        for name, x in (('context', _first_context(batch['context'])),
                        ('target', batch['target']), ('generated', images),
                        ('condition', batch.get('condition'))):
          if x is not None:
            kept[name].append(np.asarray(x)[:min(n, room)])
    per_seed.append({k: np.concatenate(v) for k, v in scores.items()})
  return (per_seed, {k: np.concatenate(v) for k, v in kept.items() if v},
          {k: np.concatenate(v) for k, v in labels.items()})


def robust_contexts(batch, data) -> np.ndarray:
  """The robustness split's contexts [B, R, R, 3] in [-1, 1] for a synthetic batch: the
  same held-out items, drawn by `synthetic.robust_context`."""
  return image_io.normalize(np.stack([synthetic.robust_context(
      int(i), *(int(batch[k][j]) for k in ('shape', 'color', 'pattern', 'color2')),
      resolution=data.resolution, seed=data.seed) for j, i in enumerate(batch['index'])]))


def robust_labels(indices, data) -> dict:
  """{attr: [B] int} of `ROBUST_BREAKDOWNS` for examples `indices` of a synthetic split:
  the bin of each one's robustness-split framing (every row's examples have one)."""
  factors = [synthetic.robust_factors(int(i), resolution=data.resolution, seed=data.seed)
             for i in indices]
  return {attr: np.array([getattr(f, key) if edges is None else np.digitize(getattr(f, key),
                                                                             edges)
                          for f in factors], np.int32)
          for attr, (key, edges, _) in ROBUST_BREAKDOWNS.items()}


# ---------------------------------------------------------------- compare


def _gaps(rows: dict) -> None:
  """Adds gap_recovered = (row - no_lora) / (oracle - no_lora) per synthetic
  metric to every row, when a no_lora and an oracle row exist (for edit rows:
  no_lora_edit and oracle_edit, which were asked for the same scenes)."""
  for row in rows.values():
    suffix = EDIT if row['mode'].endswith(EDIT) else ''
    ends = [next((r for r in rows.values() if r['mode'] == m + suffix), None)
            for m in ('no_lora', 'oracle')]
    if None in ends:
      continue
    low, high = (e['metrics'] for e in ends)
    row['gap_recovered'] = {
        k: (row['metrics'][k]['mean'] - low[k]['mean'])
        / (high[k]['mean'] - low[k]['mean'])
        if k in low and high[k]['mean'] != low[k]['mean'] else None
        for k in SYNTHETIC if k in row['metrics']}


def _breakdown_tables(rows: dict) -> list:
  """Markdown lines: each row's accuracy per item color and per pattern, and how far
  its worst value falls below its mean."""
  lines = []
  for attr, (metric, names) in BREAKDOWNS.items():
    groups = [r['metrics'].get(f'by_{attr}') for r in rows.values()]
    if not any(groups):
      continue
    counts = next(g for g in groups if g)
    head = ['Row'] + [f'{n} (n={counts[n]["n"]})' for n in names if n in counts]
    head.append('worst - mean')
    lines += ['', f'Per item {attr} ({metric}, %):', '',
              '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for (name, row), group in zip(rows.items(), groups):
      if not group:
        continue
      cells = [name] + [f'{100 * group[n]["mean"]:.0f} ± {100 * group[n]["se"]:.0f}'
                        for n in names if n in group]
      worst = min(v['mean'] for v in group.values()) - row['metrics'][metric]['mean']
      lines.append('| ' + ' | '.join(cells + [f'{100 * worst:+.0f}']) + ' |')
  return lines


def _robust_table(rows: dict) -> list:
  """Markdown lines: the robustness split's rows, color / pattern accuracy by how their
  contexts were framed (`ROBUST_BREAKDOWNS`)."""
  robust = {n: r['metrics'] for n, r in rows.items()
            if MODES[r['mode']][2] == 'robust' and 'by_robust_side' in r['metrics']}
  if not robust:
    return []
  columns = [(attr, name) for attr, (_, _, names) in ROBUST_BREAKDOWNS.items()
             for name in names]
  first = next(iter(robust.values()))
  count = lambda attr, name: next(iter(first[f'by_{attr}'].values())).get(name, {}).get('n', 0)
  head = ['Row'] + [f'{name} (n={count(attr, name)})' for attr, name in columns]
  lines = ['', 'Robust contexts by their framing (color / pattern acc, %): the item\'s side '
           'against the training contexts\' (synthetic.CONTEXT_SIDE), the backdrop, the JPEG '
           'quality:', '', '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for name, m in robust.items():
    cells = [' / '.join(f'{100 * g[value]["mean"]:.0f}' if value in g else '-'
                        for g in m[f'by_{attr}'].values()) for attr, value in columns]
    lines.append('| ' + ' | '.join([name] + cells) + ' |')
  return lines


def markdown_table(results: dict) -> str:
  rows = results['rows']
  first = next(iter(rows.values()))['metrics']
  synth = [k for k in SYNTHETIC if k in first]
  scene = [k for k in SCENE + POSE if k in first]
  clip_cols = [k for k in CLIP_METRICS if k in first]
  gaps = any('gap_recovered' in r for r in rows.values())
  seeds = len(results['settings']['seeds'])
  head = (['Row', 'Mode'] + [k.replace('_acc', ' acc (%)') for k in synth]
          + [f'{k.split("_")[0]} gap recovered' for k in synth if gaps]
          + [k.replace('_acc', ' acc (%)').replace('_err', ' err (% of side)')
             for k in scene] + clip_cols)
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for name, row in rows.items():
    m = row['metrics']
    spread = lambda v: v.get('seed_std', v['std']) if seeds > 1 else v['se']
    cells = [name, row['mode']]
    cells += [f'{100 * m[k]["mean"]:.1f} ± {100 * spread(m[k]):.1f}' for k in synth]
    if gaps:
      gap = row.get('gap_recovered', {})
      cells += ['' if gap.get(k) is None else f'{round(100 * gap[k])}%'
                for k in synth]
    cells += [f'{100 * m[k]["mean"]:.1f} ± {100 * spread(m[k]):.1f}' for k in scene]
    cells += [f'{m[k]["mean"]:.3f} ± {m[k]["std"]:.3f}' for k in clip_cols]
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines += _breakdown_tables(rows) + _robust_table(rows)
  s = results['settings']
  notes = [f'{first["num_examples"]} {s["split"]} examples, {s["num_steps"]} '
           f'{s["sampler"]} steps, guidance {s["guidance"]}, sampling seeds '
           f'{s["seeds"]}. Accuracy ± is the std over '
           + (f'the {seeds} seeds (rows of several runs: one run per training '
              'seed, sampled with its seed; other rows: the sampling seeds).'
              if seeds > 1 else 'examples, divided by sqrt(examples): the standard '
              'error.') + ' Per color / pattern: accuracy ± its standard error over that '
           "value's examples."]
  if clip_cols:
    notes.append('CLIP metrics: mean ± std over examples.')
  if gaps:
    notes.append('Gap recovered: (row - no_lora) / (oracle - no_lora).')
  if any(row['mode'].endswith(EDIT) for row in rows.values()):
    notes.append(f'Modes *{EDIT} ask for another scene than the example\'s; their '
                 'accuracies are against the asked scene (editability).')
  notes += [results['clip_note']] if results.get('clip_note') else []
  return '\n'.join(lines) + '\n\n' + ' '.join(notes) + '\n'


def group_row(row: str, group: str) -> str:
  """The name of `row` in evaluation group `group` (`compare`'s row, `grouped_table`)."""
  return f'{row}, {group}'


# The columns of `grouped_table`: metric -> (heading, percent?)
GROUPED_COLUMNS = {'color_acc': ('color', True), 'pattern_acc': ('pattern', True),
                   'pose_acc': ('pose', True), 'C2G': ('C2G', False), 'T2G': ('T2G', False),
                   'T2Gdiff': ('T2Gdiff', False)}


def grouped_table(results: dict, row_names: Sequence[str], groups: Sequence[str]) -> str:
  """`compare`'s results of rows evaluated in several groups (`group_row` names) as one
  markdown table: a row per name, a column group per group (the recontextualization
  paper's Table 1: without and with pose), accuracies (%) and CLIP metrics."""
  first = results['rows'][group_row(row_names[0], groups[0])]['metrics']
  cols = [k for k in GROUPED_COLUMNS if k in first]
  seeds = len(results['settings']['seeds'])
  head = ['Row'] + [f'{g}: {GROUPED_COLUMNS[k][0]}' for g in groups for k in cols]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for name in row_names:
    cells = [name]
    for group in groups:
      m = results['rows'][group_row(name, group)]['metrics']
      for k in cols:
        v, percent = m[k], GROUPED_COLUMNS[k][1]
        spread = v.get('seed_std', v['std']) if seeds > 1 else v['se' if percent else 'std']
        cells.append(f'{100 * v["mean"]:.1f} ± {100 * spread:.1f}' if percent
                     else f'{v["mean"]:.3f} ± {spread:.3f}')
    lines.append('| ' + ' | '.join(cells) + ' |')
  s = results['settings']
  notes = [f'{first["num_examples"]} {s["split"]} examples, {s["num_steps"]} {s["sampler"]} '
           f'steps, guidance {s["guidance"]}, sampling seeds {s["seeds"]}. color, pattern: '
           'item accuracy (%); pose: pose adherence (%), the figure where and as large as '
           'the pose map says (center within 0.06 of the side, vertical spread within '
           '10%); ± ' + ('the std over the seeds.' if seeds > 1 else
                         'the standard error over examples (CLIP metrics: the std).')]
  notes += [results['clip_note']] if results.get('clip_note') else []
  return '\n'.join(lines) + '\n\n' + ' '.join(notes) + '\n'


def random_clip(folder: str, vit: Mapping[str, Any], seed: int) -> str:
  """Writes a CLIP vision tower with random weights (shaped by the CLIPVisionConfig dict
  `vit`, drawn from `seed`) as a transformers folder, unless it is there; returns it.
  A stand-in scorer for C2G / T2G / T2Gdiff where no trained CLIP fits (the synthetic
  task): random features still carry color and layout, but not CLIP's semantics."""
  if not os.path.exists(os.path.join(folder, 'config.json')):
    module = clip.vision_from_config(dict(vit))
    params = init_variables(module, jax.random.key(seed), *module.dummy_inputs())['params']
    clip_folders.save_vision_model(params, module, folder)
  return folder


def compare(rows: Mapping[str, tuple], out_dir: str, *, split='test',
            num_examples: Optional[int] = 200, num_steps=25, guidance=3.0,
            seeds=(0,), sampler='ddim', batch_size: Optional[int] = None,
            grid_examples=8, clip_folder: Optional[str] = None) -> dict:
  """Evaluates rows {name: (workdir, mode[, options])} on the same examples and seeds.

  A row's workdir may be a list of runs that differ only in their training
  seed, as many as `seeds`: run k is sampled with seeds[k], and the row's
  spread is over those runs. A single run is sampled with every seed. A
  workdir may also be a `runs.Run` already in memory (e.g. fine-tuned ones).
  Options (a dict of `ROW_OPTIONS`) sample the row's run another way, e.g. one
  part of its LoRA alone, or with add-ons attached (`runs.restore`'s attach: e.g. a
  ControlNet for pose guidance).

  Writes out_dir/results.json, results.md (one table row per entry, in
  order; then each row's accuracy per item color and per pattern), scores.json
  (every example's score per row and seed, which `merge_reports` pools) and grid.png
  (first `grid_examples` examples; columns: context, ground truth, then each
  row, its first run, after its own contexts where they are other images:
  the robustness split's). Returns the results dict.
  """
  several = lambda w: isinstance(w, (list, tuple)) and not isinstance(w, runs.Run)
  where = lambda w: (f'{w.workdir} ({w.spec.name}, in memory)' if isinstance(w, runs.Run)
                     else str(w))
  rows = {name: (row[0], row[1], dict(row[2] if len(row) > 2 else {}))
          for name, row in rows.items()}
  for name, (workdirs, mode, options) in rows.items():
    check_mode_name(mode)
    unknown = sorted(set(options) - set(ROW_OPTIONS))
    if unknown:
      raise ValueError(f'Row {name!r}: unknown options {unknown}; known: {ROW_OPTIONS}.')
    if several(workdirs) and len(workdirs) != len(seeds):
      raise ValueError(f'Row {name!r} has {len(workdirs)} runs but there are '
                       f'{len(seeds)} seeds: give one run per seed.')
  scorer = load_clip(clip_folder) if clip_folder else None
  restored, results, columns, labels = {}, {}, [], ['context', 'ground truth']
  every = {}  # row -> metric -> per-seed lists of every example's score (scores.json)
  truths = {}  # '' or EDIT -> the ground truth its rows are scored against
  for name, (workdirs, mode, options) in rows.items():
    pairs = (list(zip(workdirs, [(s,) for s in seeds]))
             if several(workdirs) else [(workdirs, tuple(seeds))])
    per_seed, truth = [], None
    for k, (workdir, run_seeds) in enumerate(pairs):
      attach = options.get('attach')
      if isinstance(workdir, runs.Run):
        run = workdir
      else:
        key = (workdir, json.dumps(attach, sort_keys=True))
        if key not in restored:
          restored[key] = runs.restore(workdir, attach=attach)
        run = restored[key]
      logging.info('Evaluating %s: %s in %s, seeds %s.', name, mode, where(workdir),
                   run_seeds)
      scores, kept, truth = score_mode(
          run, mode, split=split, num_examples=num_examples,
          num_steps=num_steps, guidance=guidance, seeds=run_seeds, sampler=sampler,
          batch_size=batch_size, scorer=scorer, keep=grid_examples if k == 0 else 0,
          **{k: v for k, v in options.items() if k != 'attach'})
      per_seed += scores
      if k == 0:
        # Edit rows draw other scenes: their ground truth is the first edit row's.
        family = EDIT if mode.endswith(EDIT) else ''
        if family in truths and not np.array_equal(kept['target'], truths[family]):
          raise ValueError(f'Row {name!r} ({where(workdir)}) sees other {split} examples '
                           'than the first row: compare runs of one data config.')
        if not columns:
          columns = [kept['context'], kept['target']]
        elif family not in truths:
          columns.append(kept['target'])
          labels.append('other scene: ground truth')
        truths.setdefault(family, kept['target'])
        if 'condition' in kept and 'pose map' not in labels:
          columns.append(kept['condition'])
          labels.append('pose map')
        if not np.array_equal(kept['context'], columns[0]):
          columns.append(kept['context'])
          labels.append(f'{name}: context')
        columns.append(kept['generated'])
        labels.append(name)
    results[name] = {'workdir': [where(w) for w, _ in pairs] if len(pairs) > 1
                                else where(pairs[0][0]),
                     'mode': mode, 'objective': run.spec.name,
                     'metrics': _summary(per_seed, truth),
                     **({'options': options} if options else {})}
    every[name] = {m: [s[m].tolist() for s in per_seed] for m in per_seed[0]}
  settings = dict(split=split, num_examples=num_examples, num_steps=num_steps,
                  guidance=guidance, seeds=list(seeds), sampler=sampler)
  out = _write_results(out_dir, settings, results, every, truth,
                       scorer.note if scorer else '')
  files.save_image(image_io.grid(np.stack(columns, axis=1), labels),
                   os.path.join(out_dir, 'grid.png'))
  return out


def _write_results(out_dir, settings, rows, scores, labels, clip_note='') -> dict:
  """results.json, results.md and scores.json of `compare` (or `merge_reports`):
  `rows` with their summaries, `scores` row -> metric -> per-seed lists of every
  example's score, `labels` the examples' ground truth (or None)."""
  _gaps(rows)
  out = {'settings': settings, 'rows': rows, 'clip_note': clip_note}
  files.write_json(os.path.join(out_dir, 'scores.json'), {
      'labels': {k: np.asarray(v).tolist() for k, v in (labels or {}).items()},
      'rows': scores})
  files.write_json(os.path.join(out_dir, 'results.json'), out)
  files.write_text(os.path.join(out_dir, 'results.md'), markdown_table(out))
  return out


def _read_report(folder: str) -> tuple:
  """(results, scores) of a `compare` folder, with a clear error if it is not one."""
  found = []
  for name in ('results.json', 'scores.json'):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
      raise FileNotFoundError(
          f'{folder} has no {name}: give report folders written by compare (a '
          'quickstart\'s <workdir>/report, or hyperlora-evaluate --out); one written '
          'before compare kept scores.json cannot be merged.')
    with open(path) as f:
      found.append(json.load(f))
  return tuple(found)


def merge_reports(folders: Sequence[str], out_dir: str) -> dict:
  """One table from `compare` reports of the same rows on the same examples, each
  sampled with other seeds: e.g. a table over three training seeds run as two launches
  (seeds 0, 1 and seed 2) where one device session cannot hold it. Each row's per-seed
  scores are pooled and summarized as if one compare had sampled them all (a row of
  several runs: one run per training seed; its other rows, such as no-LoRA, pool their
  sampling seeds). Writes out_dir/results.json, results.md and scores.json, and the
  first folder's grid.png. Returns the results dict."""
  if len(folders) < 2:
    raise ValueError(f'merge_reports needs two report folders or more, got {list(folders)}.')
  reports = [_read_report(f) for f in folders]
  (first, first_scores), seeds = reports[0], []
  same = lambda r: {k: v for k, v in r['settings'].items() if k != 'seeds'}
  metrics = lambda scores: {n: sorted(r) for n, r in scores['rows'].items()}
  # Labels that one report has and another lacks (written before they existed) are of
  # the same examples: compared where both have them, pooled from whichever has them.
  shared = lambda a, b: {k: v for k, v in a['labels'].items() if k in b['labels']}
  for folder, (results, scores) in zip(folders, reports):
    problems = [f'settings {same(results)} (the first: {same(first)})'
                if same(results) != same(first) else '',
                f'rows {list(results["rows"])} (the first: {list(first["rows"])})'
                if [(n, r['mode']) for n, r in results['rows'].items()]
                != [(n, r['mode']) for n, r in first['rows'].items()] else '',
                'other examples (their ground truth differs)'
                if shared(scores, first_scores) != shared(first_scores, scores) else '',
                'other metrics per row' if metrics(scores) != metrics(first_scores) else '']
    problems = [p for p in problems if p]
    if problems:
      raise ValueError(f'{folder} is not a report of the same table as {folders[0]}: '
                       + '; '.join(problems) + '.')
    seeds += results['settings']['seeds']
  if len(set(seeds)) != len(seeds):
    raise ValueError(f'The reports share sampling seeds ({seeds}): each must bring its '
                     'own, or the pooled spread counts a seed twice.')
  labels = {}
  for _, report_scores in reports:
    for k, v in report_scores['labels'].items():
      labels.setdefault(k, np.asarray(v))
  rows, scores = {}, {}
  for name, row in first['rows'].items():
    scores[name] = {m: sum((s['rows'][name][m] for _, s in reports), [])
                    for m in first_scores['rows'][name]}
    per_seed = [{m: np.asarray(v) for m, v in zip(scores[name], seed)}
                for seed in zip(*scores[name].values())]
    listed = [r['rows'][name]['workdir'] for r, _ in reports]
    # gap_recovered: recomputed by _write_results (the rows' modes are the first's).
    rows[name] = dict(row, workdir=sum((w if isinstance(w, list) else [w] for w in listed), []),
                      metrics=_summary(per_seed, labels or None))
  out = _write_results(out_dir, dict(first['settings'], seeds=seeds), rows, scores,
                       labels, first.get('clip_note', ''))
  with files.atomic_file(os.path.join(out_dir, 'grid.png')) as tmp:
    shutil.copyfile(os.path.join(folders[0], 'grid.png'), tmp)
  return out


# ---------------------------------------------------------------- folders: DINO, CLIP-I, CLIP-T

FOLDER_METRICS = ('DINO', 'CLIP-I', 'CLIP-T')


class DINOScorer(NamedTuple):
  module: Any  # models.vit.ViTModel
  params: Any
  preprocess: dict  # vit.preprocess_images' settings from the folder


def load_dino(folder: str) -> DINOScorer:
  """A DINO ViT (e.g. facebook/dino-vits16) from a local transformers ViTModel folder."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'No such DINO folder: {folder}')
  module, params, _ = vit_folders.load_vit(folder)
  return DINOScorer(module, params, vit_folders.load_image_processor(folder, module))


_vit_pixels = jax.jit(vit.preprocess_images, static_argnames=('size', 'resample', 'mean', 'std'))
_clip_pixels = jax.jit(clip.preprocess_images, static_argnums=1)


def dino_embeddings(scorer: DINOScorer, images: Sequence[np.ndarray]) -> np.ndarray:
  """Unit DINO embeddings [N, D] (the CLS token after the final layernorm) of uint8
  images [h, w, 3], each of any size."""
  pixels = jnp.concatenate([_vit_pixels(x, **scorer.preprocess) for x in images])
  return np.asarray(_unit(_apply(scorer.module, scorer.params, pixels).last_hidden_state[:, 0]))


def clip_image_embeddings(scorer: CLIPScorer, images: Sequence[np.ndarray]) -> np.ndarray:
  """`image_embeddings` of uint8 images [h, w, 3], each of any size (CLIPImageProcessor's
  8-bit resize, as image files are)."""
  size = scorer.vision.image_size
  pixels = jnp.concatenate([_clip_pixels(x, size) for x in images])
  return np.asarray(_unit(_apply(scorer.vision, scorer.vision_params, pixels).image_embeds))


def _read_prompts(path: str, names: Sequence[str]) -> dict:
  if not os.path.exists(path):
    raise FileNotFoundError(f'No such prompts file: {path}')
  with open(path) as f:
    try:
      prompts = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path} is not JSON ({e}); give {{image name: prompt}}.') from None
  if not isinstance(prompts, dict):
    raise ValueError(f'{path} holds a {type(prompts).__name__}; give {{image name: prompt}}.')
  missing = [n for n in names if not isinstance(prompts.get(n), str)]
  if missing:
    raise ValueError(f'{path} has no prompt for {len(missing)} generated images: '
                     + ', '.join(missing[:5]) + (', ...' if len(missing) > 5 else ''))
  return prompts


def score_folders(generated: str, references: str, out_dir: str, *,
                  prompts_file: Optional[str] = None, dino_folder: Optional[str] = None,
                  clip_folder: Optional[str] = None, batch_size: int = 16) -> dict:
  """The HyperDreamBooth paper's metrics (DreamBooth's definitions) of generated images
  against their references, paired by file name (`images.pair_images`):

    DINO    cosine of the DINO ViT's embeddings of the generated and reference image
    CLIP-I  cosine of their CLIP image embeddings
    CLIP-T  cosine of the generated image's CLIP embedding and its prompt's
            (`prompts_file`: JSON {image name: prompt}; needs a CLIPModel folder)

  Writes out_dir/results.json (settings, mean and std over pairs, per-image scores)
  and results.md. Returns the results dict.
  """
  if not dino_folder and not clip_folder:
    raise ValueError('Nothing to score: give a DINO folder (--dino) and/or a CLIP folder '
                     '(--clip).')
  if prompts_file and not clip_folder:
    raise ValueError('CLIP-T (--prompts) needs a CLIP folder (--clip).')
  pairs = image_io.pair_images(generated, references)
  names = [name for name, _, _ in pairs]
  prompts = _read_prompts(prompts_file, names) if prompts_file else None
  dino = load_dino(dino_folder) if dino_folder else None
  scorer = load_clip(clip_folder) if clip_folder else None
  scores = collections.defaultdict(list)
  for start in range(0, len(pairs), batch_size):
    chunk = pairs[start:start + batch_size]
    n = len(chunk)
    chunk = chunk + chunk[-1:] * (batch_size - n)  # One batch shape: one compile.
    gen, ref = ([image_io.read_rgb(p[k]) for p in chunk] for k in (1, 2))
    if dino is not None:
      g, r = dino_embeddings(dino, gen), dino_embeddings(dino, ref)
      scores['DINO'].append(np.sum(g * r, -1)[:n])
    if scorer is not None:
      g, r = clip_image_embeddings(scorer, gen), clip_image_embeddings(scorer, ref)
      scores['CLIP-I'].append(np.sum(g * r, -1)[:n])
      if prompts is not None and scorer.text is not None:
        t = text_embeddings(scorer, [prompts[name] for name, _, _ in chunk])
        scores['CLIP-T'].append(np.sum(t * g, -1)[:n])
  scores = {k: np.concatenate(v) for k, v in scores.items()}
  note = scorer.note if scorer is not None and prompts is not None else ''
  results = {
      'settings': dict(generated=generated, references=references, prompts=prompts_file,
                       dino=dino_folder, clip=clip_folder),
      'metrics': {'num_pairs': len(pairs),
                  **{k: {'mean': float(v.mean()), 'std': float(v.std())}
                     for k, v in scores.items()}},
      'per_image': {name: {k: float(v[i]) for k, v in scores.items()}
                    for i, name in enumerate(names)},
      'clip_note': note}
  files.write_json(os.path.join(out_dir, 'results.json'), results)
  files.write_text(os.path.join(out_dir, 'results.md'), folder_table(results))
  return results


def folder_table(results: dict) -> str:
  """`score_folders`' results as a markdown table (mean ± std) with its notes."""
  m = results['metrics']
  cols = [k for k in FOLDER_METRICS if k in m]
  lines = ['| Pairs | ' + ' | '.join(cols) + ' |', '|' + '---|' * (len(cols) + 1),
           f'| {m["num_pairs"]} | '
           + ' | '.join(f'{m[k]["mean"]:.3f} ± {m[k]["std"]:.3f}' for k in cols) + ' |']
  notes = ['Mean ± std over the pairs (generated, reference), paired by file name. '
           "DreamBooth's metrics, as HyperDreamBooth reports them: DINO and CLIP-I are the "
           'cosine similarities of the two images\' DINO ViT (CLS token) and CLIP image '
           "embeddings, CLIP-T that of the generated image's CLIP embedding and its prompt's."]
  notes += [results['clip_note']] if results.get('clip_note') else []
  return '\n'.join(lines) + '\n\n' + ' '.join(notes) + '\n'


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
             if isinstance(v, dict) and 'mean' in v}
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
  if f.generated:
    return main_folders(f)
  if f.merge:
    if not f.out:
      raise ValueError('--merge needs --out: the folder for the merged table.')
    cli.check_output(f.out)
    print(markdown_table(merge_reports(f.merge, f.out)))
    return print(f'Wrote results.json, results.md, scores.json and grid.png to {f.out}')
  cli.check_flags(positive=('num_steps', 'batch_size'),
                  non_negative=('num_examples', 'grid_examples'))
  out = f.out or os.path.join(f.workdir, 'eval')
  cli.check_output(out)
  cli.use_compilation_cache(f.compilation_cache)
  modes = f.modes or default_modes(runs.load_config(f.workdir))
  attach = {'controlnet': {'folder': f.controlnet}} if f.controlnet else {}
  results = compare({m: (f.workdir, m, attach) for m in modes}, out, split=f.split,
                    num_examples=f.num_examples or None, num_steps=f.num_steps,
                    guidance=f.guidance, seeds=[int(s) for s in f.seeds],
                    sampler=f.sampler, batch_size=f.batch_size,
                    grid_examples=f.grid_examples, clip_folder=f.clip)
  print(markdown_table(results))
  print(f'Wrote results.json, results.md and grid.png to {out}')


def main_folders(f):
  """The folder mode: `score_folders` on --generated and --references."""
  for name, what in (('references', 'the folder of reference images'),
                     ('out', 'the folder for results.json and results.md')):
    if not f[name].value:
      raise ValueError(f'--generated needs --{name}: {what}.')
  results = score_folders(f.generated, f.references, f.out, prompts_file=f.prompts,
                          dino_folder=f.dino, clip_folder=f.clip,
                          batch_size=f.batch_size or 16)
  print(folder_table(results))
  print(f'Wrote results.json and results.md to {f.out}')


def _flags():
  flags.DEFINE_string('workdir', None, 'A training run.')
  flags.DEFINE_string('split', 'test', 'Data split.')
  flags.DEFINE_string('clip', None, 'A local transformers CLIP folder: adds '
                      'C2G, T2G, T2Gdiff (and CLIP-T with a text tower); in folder '
                      'mode CLIP-I (and CLIP-T with --prompts).')
  flags.DEFINE_list('modes', None, f'Modes ({", ".join(MODES)}); default: '
                    'every mode the run has.')
  flags.DEFINE_string('controlnet', None, 'A diffusers controlnet/ folder to sample every '
                      "mode with, frozen, on each example's condition image (pose "
                      'guidance; the data needs condition images).')
  flags.DEFINE_integer('num_examples', 200, 'Examples (0: the whole split).')
  flags.DEFINE_integer('num_steps', 25, 'Sampler steps.')
  flags.DEFINE_float('guidance', 3.0, 'Classifier-free guidance scale.')
  flags.DEFINE_list('seeds', ['0'], 'Sampling seeds.')
  flags.DEFINE_enum('sampler', 'ddim', ('ddim', 'dpmpp_2m'), 'Sampler.')
  flags.DEFINE_integer('batch_size', None, 'Default: the run\'s batch size (folder '
                       'mode: 16 image pairs).')
  flags.DEFINE_integer('grid_examples', 8, 'Examples in grid.png.')
  flags.DEFINE_string('out', None, 'Output folder (default <workdir>/eval).')
  flags.DEFINE_string('generated', None, 'Folder mode, instead of --workdir: a folder of '
                      'generated images, scored against --references (DINO with --dino, '
                      'CLIP-I and CLIP-T with --clip).')
  flags.DEFINE_string('references', None, 'Folder mode: the reference images, one per '
                      'generated image, of the same file name (any image extension).')
  flags.DEFINE_string('prompts', None, 'Folder mode: a JSON file {image name: prompt} '
                      '(names without extension) for CLIP-T.')
  flags.DEFINE_string('dino', None, 'Folder mode: a local transformers ViTModel folder '
                      '(e.g. facebook/dino-vits16) for the DINO score.')
  flags.DEFINE_list('merge', None, 'Merge mode, instead of --workdir: report folders '
                    '(results.json and scores.json) of the same rows and examples, each '
                    'sampled with its own seeds, pooled into one table in --out.')
  flags.register_multi_flags_validator(
      ['workdir', 'generated', 'merge'], lambda v: sum(map(bool, v.values())) == 1,
      'Give --workdir (a run to sample and score), --generated (a folder of images) or '
      '--merge (report folders), one of the three.')
  cli.define_compilation_cache_flag()


def run():
  """The console script (`hyperlora-evaluate`)."""
  _flags()
  cli.run(__name__, cli.main_with_errors(main))


if __name__ == '__main__':
  run()
