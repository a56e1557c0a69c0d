"""The quickstart: the whole method on the synthetic task, from nothing to a results table.

  python -m hyperlora_jax.main --config=configs/quickstart.py --workdir=workdirs/quickstart
  python -m hyperlora_jax.main --config=configs/quickstart.py:gpu --workdir=...
  python -m hyperlora_jax.main --config=configs/quickstart.py:gpu_sweep --workdir=...
  python -m hyperlora_jax.main --config=configs/quickstart.py:gpu:seeds=2 --workdir=W
    (some of a size's training seeds: one launch of a table whose other seeds other
    launches train, in the same workdir W or not; each reports into
    W/report_seeds_<seeds>, and `python -m hyperlora_jax.evaluate
    --merge=W/report_seeds_0,W/report_seeds_1,W/report_seeds_2 --out=...` pools them)

Stages run in order, each in <workdir>/<stage>, and are reused when already finished:
  base         a tiny text-to-image model trained from scratch on full prompts (it
               names the item), exported as a diffusers folder <workdir>/base/pipeline
  single_lora  one LoRA on all training pairs with the S* scene prompt (the average)
  hyperlora_*  hypernetworks on the same data, one per decoder; half of their training
               contexts are augmented (smaller, moved, other backdrops, JPEG, low
               resolution: data/augment.py), so they do not learn the generator's framing
  report       held-out items: no-LoRA, single LoRA, HyperLoRA rows (also on the
               robustness split: the same items drawn by other code), the oracle (base
               model with the full prompt); accuracy per color and pattern; results.md,
               grid.png, one exported LoRA
"""
import ml_collections

from hyperlora_jax import defaults
from hyperlora_jax.data import synthetic

SIZES = {
    # resolution, item side as a fraction of it, unet channels, text width, base / lora /
    # hypernet steps, the hypernetworks' learning rate, batch, decoders (one row each) or
    # rows (name -> decoder, updates of its stage config), training seeds (each trained
    # row once per seed), held-out items scored (160 on CPU: a standard
    # error under 4 points at any accuracy), data loader processes, the base model's
    # prediction type (the later stages read it from the base's scheduler folder)
    #
    # cpu: 16 px with the item at 0.7 of the side: the item stays 11 px wide, as at 32 px
    # with 0.34 (the size the scorer reads exactly), but it is half of the target's pixels
    # instead of an eighth, and a UNet step costs ~4x less (0.38 s at batch 16 on 2 cores),
    # so the base model sees 2x the images in about the same time.
    # v-prediction: the item's color is settled at the noisiest steps, where an epsilon loss
    # gives it almost no weight (oracle color after 400 base steps: 90% vs 12%; RESULTS.md).
    # gpu: 3,000 hypernetwork steps took the transformer decoder from 54% to 89% of the
    # held-out pattern gap; the heads, with the attention pool and lr 3e-3, 41% to 50%
    # and color 78% to 96% (RESULTS.md, the H200 sweeps).
    'cpu': dict(resolution=16, item_frac=0.7, channels=(32, 64, 64), text=64, base=800,
                lora=100, hyper=400, hyper_lr=3e-3, batch=16, decoders=('heads',),
                num_train=4000,
                seeds=(0,), eval_examples=160, eval_steps=20, dtype='float32', workers=0,
                prediction='v_prediction'),
    'gpu': dict(resolution=64, item_frac=synthetic.ITEM_FRAC, channels=(64, 128, 256),
                text=128, base=4000, lora=500, hyper=3000, hyper_lr=1e-3, batch=128,
                rows={'heads': ('heads', dict(hypernet=dict(decoder=dict(pool='attention')),
                                              optim=dict(lr=3e-3))),
                      'transformer': ('transformer', {}), 'perceiver': ('perceiver', {})},
                num_train=20000,
                seeds=(0, 1, 2), eval_examples=200, eval_steps=25, dtype='bfloat16',
                workers=-1, prediction='v_prediction'),
    # The smallest end-to-end run (the Colab notebook's test): seconds, learns nothing.
    'smoke': dict(resolution=16, item_frac=synthetic.ITEM_FRAC, channels=(16, 32), text=32,
                  base=4, lora=2, hyper=2, hyper_lr=1e-3, batch=4, decoders=('heads',),
                  num_train=64,
                  seeds=(0,), eval_examples=4, eval_steps=2, dtype='float32', workers=0,
                  prediction='v_prediction'),
}


# Sweeps of issue 19 (gpu_sweep_<name>): one training seed, rows side by side on one base
# model; gpu_sweep (pattern) is the one to run next, robust after it; pool and levers ran
# once, and RESULTS.md has their tables:
#   pool     the heads' pooled embedding against their attention pool over the tokens
#   levers   at 3,000 steps the heads had 78% / 41% of the color / pattern gap, 88% / 41%
#            with the attention pool: their width, lr and a deeper encoder (a 4th stage,
#            31 px receptive field instead of 15), and the perceiver at 3,000 steps
#   pattern  the two-seed table at 3,000 steps (heads 98% / 64%, transformer 93% / 69%,
#            perceiver 88% / 61%): every decoder's color is there, pattern is not, and
#            every row's loss still falls at step 3,000 (1,000 -> 3,000 steps took the
#            transformer from 54% to 89% on an earlier base model): the heads and the
#            transformer for 6,000 steps, and the perceiver with plain LoRAs (its yellow
#            items, 30-52%, fail under a LoRA basis of 16 + 16 on every base so far)
#   robust   below
# The ~6-minute base and three rows (~3.3, 3.3 and 2 minutes) take two device calls.
_ATTENTION = dict(hypernet=dict(decoder=dict(pool='attention')))
_FAST = dict(optim=dict(lr=3e-3))
_LONG = dict(train=dict(num_steps=6000))
_ZOOM = dict(data=dict(augment=dict(scale=(0.35, 1.3))))  # zoom in as well as out
_SWEEPS = {
    'pool': {'heads': ('heads', {}), 'heads_attention': ('heads', _ATTENTION)},
    'levers': {
        'perceiver': ('perceiver', {}),
        'heads_attention_hidden256': ('heads', dict(hypernet=dict(decoder=dict(
            pool='attention', hidden=256)))),
        'heads_attention_fast_lr': ('heads', dict(_ATTENTION, **_FAST)),
        'heads_attention_encoder4': ('heads', dict(hypernet=dict(
            decoder=dict(pool='attention'), encoder=dict(channels=(32, 64, 128, 256)))))},
    'pattern': {
        'transformer_6000_steps': ('transformer', _LONG),
        'heads_6000_steps': ('heads', dict(_ATTENTION, **_FAST, **_LONG)),
        'perceiver_plain': ('perceiver', dict(hypernet=dict(param=dict(kind='plain'))))},
    # The two-seed table's robust contexts lose ~20 points of the pattern gap, most where
    # the item is larger than in any training context (the augmentation only shrank)
    # and under heavy JPEG: zooming in too (cpu_sweep_zoom: +2.5 points robust color on
    # CPU, within noise), and that with JPEG on most augmented contexts, down to q 20.
    'robust': {
        'heads_zoom': ('heads', dict(_ATTENTION, **_FAST, **_ZOOM)),
        'heads_zoom_jpeg': ('heads', dict(_ATTENTION, **_FAST, data=dict(augment=dict(
            scale=(0.35, 1.3), jpeg=0.8, jpeg_quality=(20, 95))))),
        'transformer_zoom': ('transformer', _ZOOM)},
}
for _name, _rows in _SWEEPS.items():
  SIZES[f'gpu_sweep_{_name}'] = dict(SIZES['gpu'], seeds=(0,), single_lora=False, rows=_rows)
SIZES['gpu_sweep'] = SIZES['gpu_sweep_pattern']
# On CPU, one seed, each ran once (RESULTS.md). augment: every training context augmented
# against half of them (the cpu quickstart's robustness split keeps 16% of the color gap
# against the plain split's 39%): it lost on both splits (23% / 10%). zoom: zooming in as
# well as out (scale up to 1.3: items up to ~0.97 of the side), since the robust split's
# items larger than any training context's lose most: 45% / 20%, within noise.
SIZES['cpu_sweep_augment'] = dict(SIZES['cpu'], single_lora=False, rows={
    'heads': ('heads', {}), 'heads_augment_all': ('heads', dict(data=dict(augment=dict(p=1.0))))})
SIZES['cpu_sweep_zoom'] = dict(SIZES['cpu'], single_lora=False, rows={
    'heads': ('heads', {}), 'heads_zoom': ('heads', _ZOOM)})


def stage(objective, size, steps, prompt, seed=0, **model):
  """One stage trained on the synthetic task at `size` (a SIZES entry); **model updates
  config.model."""
  c = defaults.get_config(objective)
  c.seed = seed
  c.model.update(unet=defaults.tiny_unet(size['channels'], cross_attention_dim=size['text'],
                                       heads=4),
                 text=defaults.tiny_text(size['text'], layers=2, heads=4), **model)
  c.data.update(resolution=size['resolution'], item_frac=size['item_frac'], prompt=prompt,
                num_train=size['num_train'], num_test=200, num_workers=size['workers'])
  c.train.update(num_steps=steps, batch_size=size['batch'], log_every=50, eval_every=0,
                 checkpoint_every=max(steps // 4, 100), compute_dtype=size['dtype'])
  c.optim.update(lr=1e-3 if objective != 'unet_full' else 5e-4,
                 warmup_steps=min(100, steps // 10))
  # The report scores every stage on its held-out items; a stage's own end-of-training
  # eval (8 items) would repeat it, ~20 s each on the H200, mostly compiling (BENCHMARKS.md).
  c.eval.num_examples = 0
  return c


def seeded(name, seed):
  """The stage that trains row `name` with training seed `seed`."""
  return name if seed == 0 else f'{name}_seed{seed}'


def base_stage(s, make=stage):
  """The stage that trains the base model from scratch (unet_full on the full prompts),
  with the size's prediction type; `make` is the config's own stage builder."""
  c = make('unet_full', s, s['base'], 'full', prompt_dropout=0.1)
  c.model.scheduler.prediction_type = s['prediction']
  return c


def with_base_stage(s, make=stage):
  """A multi-stage config holding its first stage, the base model (`base_stage`); `make`
  is the config's own stage builder."""
  c = ml_collections.ConfigDict()
  c.stages = ml_collections.ConfigDict()
  c.stages.base = base_stage(s, make)
  return c


def size_of(sizes, arg):
  """The entry of `sizes` that `arg` names, 'NAME' or 'NAME:seeds=A,B' (the config
  string after the file's colon): the size with those training seeds, for a table whose
  seeds one device session cannot hold. Its stages keep the full size's names, so
  launches of other seeds can share one workdir (and its base model); each reports into
  its own report_folder (<workdir>/report_seeds_A_B), and `hyperlora-evaluate --merge`
  pools the launches' reports into the table."""
  name, _, option = arg.partition(':')
  if name not in sizes:
    raise ValueError(f'No size {name!r}; sizes: {", ".join(sizes)}.')
  if not option:
    return dict(sizes[name], report_folder='report')
  key, _, value = option.partition('=')
  if key != 'seeds' or not value:
    raise ValueError(f'{arg!r}: give NAME or NAME:seeds=A,B (training seeds), not {option!r}.')
  seeds = tuple(int(v) for v in value.split(','))
  return dict(sizes[name], seeds=seeds,
              report_folder='report_seeds_' + '_'.join(map(str, seeds)))


def get_config(size='cpu'):
  s = size_of(SIZES, size)
  c = with_base_stage(s)
  decoders = {'heads': 'plain', 'transformer': 'plain', 'perceiver': 'basis'}
  runs, order = {}, ['base']

  def add(row, seed, stage):
    name = seeded(row, seed)
    c.stages[name] = stage
    runs.setdefault(row, []).append(name)
    order.append(name)

  rows = s.get('rows') or {d: (d, {}) for d in s['decoders']}
  for seed in s['seeds']:  # Seed 0 of every row first.
    if s.get('single_lora', True):
      lora = stage('unet_lora', s, s['lora'], 'scene', seed, pretrained='stage:base',
                   prompt_dropout=0.0)
      lora.lora.update(rank=4, alpha=4.0)
      add('single_lora', seed, lora)
    for row, (decoder, updates) in rows.items():
      hyper = stage('hyperlora', s, s['hyper'], 'scene', seed, pretrained='stage:base',
                    prompt_dropout=0.0)
      hyper.hypernet.decoder.update(kind=decoder, hidden=64, width=128, depth=2, heads=4)
      hyper.hypernet.param.update(kind=decoders[decoder], rank=4, num_id=16, num_base=16)
      hyper.data.augment.p = 0.5
      hyper.optim.lr = s['hyper_lr']
      hyper.update(updates)
      add(f'hyperlora_{row}', seed, hyper)
  c.stage_order = tuple(order)
  # Rows of several runs report the spread over training seeds, run k sampled with
  # seeds[k]; the no-LoRA and oracle rows (one base model) over the sampling seeds.
  c.report = dict(num_examples=s['eval_examples'], num_steps=s['eval_steps'], guidance=3.0,
                  seeds=s['seeds'], runs=runs, folder=s['report_folder'])
  return c
