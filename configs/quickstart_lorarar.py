"""LoRA.rar on the synthetic task (issue 17): a LoRA zoo, a merger, and its table on
held-out content-style pairs against ZipLoRA and direct merging.

  python -m hyperlora_jax.main --config=configs/quickstart_lorarar.py --workdir=workdirs/rar
  python -m hyperlora_jax.main --config=configs/quickstart_lorarar.py:gpu --workdir=...

The data is styled (data.styles: every target framed in one of synthetic.STYLES'
colors, or plain); no prompt names the style, so a style is what a style LoRA teaches.
Stages, each in <workdir>/<stage>, reused when finished:
  base          a tiny text-to-image model from scratch on full prompts (the item in
                words; the frame is drawn at random, named by nothing)
  content       the zoo's content LoRAs: one per training item, on its unstyled images
                with the S* prompt (lora_bank, bank.group='content'), as LoRA files
  content_test  the same for the held-out items (the test split's): the report's pairs
  style         the zoo's style LoRAs: one per style, on that style's training images
  merger        LoRA.rar's merger on random (content, style) pairs of the zoo, with
                ZipLoRA's loss through the frozen base (one stage per training seed)
  report        held-out pairs: content alone, style alone, direct sum, ZipLoRA,
                LoRA.rar; content / style / both accuracy, merge seconds per pair; grid
"""
from configs import quickstart

SIZES = {
    # quickstart.stage's keys, plus: held-out fraction, zoo steps / subjects per step /
    # lr / rank, merger steps, report pairs, ZipLoRA steps and lr.
    # cpu: the quickstart's 16 px with an 8 px item; sized for < 30 min on 2 cores.
    'cpu': dict(resolution=16, item_frac=0.5, channels=(32, 64, 64), text=64, base=600,
                batch=16, num_train=1500, workers=0, dtype='float32', test_fraction=0.5,
                zoo_steps=40, subjects=64, zoo_lr=1e-1, rank=4, merger=150, pairs=48,
                ziplora=100, ziplora_lr=1e-2, seeds=(0,), eval_steps=20,
                prediction='v_prediction'),
    # gpu: 32 px (the item 11 px wide), three seeds, 120 held-out pairs (ZipLoRA's 100
    # steps each are most of the report): ~17 min estimated from quickstart_basis:gpu's
    # step rates on one H200, as quickstart_hdb:gpu's 17 were (it took 26): plan ~25.
    # The zoo's rate is 3e-2, not the CPU's 0.1: on quickstart_hdb:gpu's UNet 40 LoRA
    # steps at 0.1 draw noise and at 3e-2 reach 95% color (RESULTS.md). gpu64: 64 px,
    # 300 pairs (~40 min). Neither has run yet.
    'gpu': dict(resolution=32, item_frac=0.34, channels=(64, 128, 256), text=128,
                base=4000, batch=64, num_train=20000, workers=-1, dtype='bfloat16',
                test_fraction=0.2, zoo_steps=100, subjects=256, zoo_lr=3e-2, rank=8,
                merger=2000, pairs=120, ziplora=100, ziplora_lr=1e-2, seeds=(0, 1, 2),
                eval_steps=25, prediction='v_prediction'),
    # The smallest end-to-end run (tests): seconds, learns nothing.
    'smoke': dict(resolution=16, item_frac=0.5, channels=(16, 32), text=32, base=2,
                  batch=4, num_train=48, workers=0, dtype='float32', test_fraction=0.5,
                  zoo_steps=2, subjects=16, zoo_lr=3e-2, rank=2, merger=2, pairs=4,
                  ziplora=2, ziplora_lr=1e-2, seeds=(0,), eval_steps=2,
                  prediction='v_prediction'),
}
SIZES['gpu64'] = dict(SIZES['gpu'], resolution=64, batch=128, pairs=300)
TARGETS = 'cross_attn,self_attn'  # LoRA.rar merges the UNet's attention LoRAs


def _stage(objective, s, steps, prompt, seed=0, **model):
  c = quickstart.stage(objective, s, steps, prompt, seed, **model)
  c.data.update(test_fraction=s['test_fraction'], styles=True)
  c.model.targets = TARGETS
  c.bank.param.update(kind='plain', rank=s['rank'])
  return c


def _zoo(s, group, split):
  c = _stage('lora_bank', s, s['zoo_steps'], 'scene', pretrained='stage:base',
             prompt_dropout=0.0)
  c.bank.update(group=group, split=split, subjects_per_step=s['subjects'],
                lora_format='diffusers')
  c.optim.update(lr=s['zoo_lr'], weight_decay=0.0)
  return c


def get_config(size='cpu'):
  s = SIZES[size]
  c = quickstart.with_base_stage(s, _stage)
  c.stages.content = _zoo(s, 'content', 'train')
  c.stages.content_test = _zoo(s, 'content', 'test')
  c.stages.style = _zoo(s, 'style', 'train')
  order, mergers = ['base', 'content', 'content_test', 'style'], []
  for seed in s['seeds']:
    m = _stage('lorarar', s, s['merger'], 'scene', seed, pretrained='stage:base',
               prompt_dropout=0.0)
    m.merger.update(content='stage:content', style='stage:style')
    name = quickstart.seeded('merger', seed)
    c.stages[name] = m
    mergers.append(name)
    order.append(name)
  c.stage_order = tuple(order)
  c.report = dict(kind='merging', content='content_test', style='style', merger=mergers,
                  num_pairs=s['pairs'], ziplora_steps=s['ziplora'],
                  ziplora_lr=s['ziplora_lr'], num_steps=s['eval_steps'], guidance=3.0,
                  seeds=(0,), grid_pairs=8)
  return c
