"""HyperDreamBooth end to end on the synthetic task: its Table 3 on held-out subjects.

  python -m hyperlora_jax.main --config=configs/quickstart_hdb.py --workdir=workdirs/hdb
  python -m hyperlora_jax.main --config=configs/quickstart_hdb.py:gpu --workdir=...
  (:cpu_2seeds: the cpu size with two training seeds, reusing a cpu run's stages;
   :cpu_scene / :gpu_scene: every stage and fine-tuned row on the subjects' captions)

A subject is a synthetic item; its reference photo is a scene in which the figure wears
it (data.context='target': the image is both the hypernetwork's input and the diffusion
target, as a face is in the paper), and the supervisory prompt is the static
'a figure wearing S*'. Stages, each in <workdir>/<stage>, reused when finished:
  base            a tiny text-to-image model from scratch on full prompts (it names the
                  background, the position and the item), as the quickstart's
  targets         pre-optimization: every training identity's own LiDB weights on its
                  images (lora_bank), the target-weights dataset
  hyper           the hypernetwork (ViT-free conv encoder, transformer decoder with K
                  rounds, LiDB) trained with alpha * diffusion + beta * weight-space
  hyper_k1        the same with K = 1 round
  hyper_noweight  the same without the weight-space loss (beta = 0)
  report          held-out subjects: Only Hyper, No Hyper, Hyper + fast fine-tuning
                  (40 relaxed-rank steps), K = 1, without the weight loss, per-image
                  LoRA to convergence (DreamBooth-LoRA), the base model and the oracle;
                  fidelity (item color / pattern) and editability (background /
                  position of another scene than the reference's), steps, s / subject
Hypernetwork rows are trained once per seed (one run per report seed).
"""
from configs import quickstart

SIZES = {
    # quickstart.stage's keys, plus: the fraction of identities held out, the
    # pre-optimization's steps per shard, identities per shard and lr, hypernetwork
    # steps, decoder rounds K, LiDB a / b, the weight-space loss weight beta, held-out
    # subjects in the report, fast fine-tuning steps and lr, per-image LoRA steps and lr.
    #
    # cpu: the quickstart's 16 px with an 8 px item (0.5: the three figure positions'
    # boxes overlap less than at 0.7), half of the identities held out so that the
    # pre-optimization fits 352 of them. The rates are the CPU sweeps' (RESULTS.md).
    'cpu': dict(resolution=16, item_frac=0.5, channels=(32, 64, 64), text=64, base=800,
                batch=16, num_train=4000, workers=0, dtype='float32', test_fraction=0.5,
                targets_steps=20, subjects=64, targets_lr=1e-1, hyper=200, rounds=2,
                a=16, b=8, beta=1.0, report_subjects=24, fast=40, fast_lr=1e-1,
                converged=400, converged_lr=3e-2, seeds=(0,), eval_steps=20,
                prediction='v_prediction'),
    # gpu: the CPU's rates with the GPU quickstart's UNet at 32 px (the item 11 px wide),
    # three seeds for the method's rows, the ablations (K = 1, no weight-space loss)
    # trained once (ablation_seeds), and the caption rows (caption_lr: RESULTS.md's CPU
    # finding that a caption at the per-image rate keeps the scene). 26 min on one H200
    # (RESULTS.md), where the CPU's fast rate 0.1 draws noise: gpu_scene is the next run.
    # gpu64: 64 px and twice the hypernetwork steps (~35 min). (cpu_2seeds, below: the
    # cpu size with every hypernetwork and fine-tuning row twice.)
    'gpu': dict(resolution=32, item_frac=0.34, channels=(64, 128, 256), text=128,
                base=4000, batch=64, num_train=20000, workers=-1, dtype='bfloat16',
                test_fraction=0.2, targets_steps=40, subjects=64, targets_lr=1e-1,
                hyper=1000, rounds=4, a=32, b=16, beta=1.0, report_subjects=128, fast=40,
                fast_lr=1e-1, converged=400, converged_lr=3e-2, seeds=(0, 1, 2),
                ablation_seeds=(0,), caption_lr=3e-2, eval_steps=25,
                prediction='v_prediction'),
    # The smallest end-to-end run (tests): seconds, learns nothing.
    'smoke': dict(resolution=16, item_frac=0.5, channels=(16, 32), text=32, base=2,
                  batch=4, num_train=48, workers=0, dtype='float32', test_fraction=0.5,
                  targets_steps=2, subjects=16, targets_lr=1e-1, hyper=2, rounds=2, a=8,
                  b=8, beta=1.0, report_subjects=4, fast=2, fast_lr=1e-1, converged=3,
                  converged_lr=3e-2, seeds=(0,), eval_steps=2, prediction='v_prediction'),
}
SIZES['gpu64'] = dict(SIZES['gpu'], resolution=64, batch=128, hyper=2000)
SIZES['cpu_2seeds'] = dict(SIZES['cpu'], seeds=(0, 1))
# cpu_captions: the cpu size with every fine-tuned row trained on each subject's caption
# (its scene in words, with S*) instead of the static prompt, so that the personal LoRA
# need not take the reference's background and position into S* (RESULTS.md: with the
# static prompt the fine-tuned rows lose the asked-for scene).
SIZES['cpu_captions'] = dict(SIZES['cpu'], fine_prompt='caption')
# cpu_captions_slow: the same at the per-image LoRA's rate for the 40 fast steps (3e-2).
SIZES['cpu_captions_slow'] = dict(SIZES['cpu_captions'], fast_lr=3e-2)
# cpu_scene: cpu_captions_slow with the pre-optimization and the hypernetworks trained on
# the captions too (prompt: their data.prompt), so that no stage binds the reference's
# scene to S* (RESULTS.md: the GPU's static-prompt hypernetwork start costs position);
# two training seeds.
SIZES['cpu_scene'] = dict(SIZES['cpu_captions_slow'], prompt='scene', seeds=(0, 1))
# cpu_scene_slow_targets: cpu_scene with the targets fitted at 3e-2 for 60 steps (half
# the fit noise of 0.1 for 20: benchmarks/target_noise.py), as gpu_scene's are, and
# gpu_scene's 10-step rows.
SIZES['cpu_scene_slow_targets'] = dict(SIZES['cpu_scene'], targets_lr=3e-2,
                                       targets_steps=60, short=10)
# gpu_scene: the gpu size as cpu_scene (every stage and fine-tuned row on captions, fast
# rate 3e-2: the gpu run's best rows), targets fitted at 3e-2 for 120 steps (at lr 0.1
# they are 60% fit noise: RESULTS.md, benchmarks/target_noise.py), and 10-step rows, where
# 40 steps from zero already reach 95% color. ~25 min on one H200 (gpu: 26 measured).
SIZES['gpu_scene'] = {k: v for k, v in SIZES['gpu'].items() if k != 'caption_lr'}
SIZES['gpu_scene'].update(prompt='scene', fine_prompt='caption', fast_lr=3e-2,
                          targets_lr=3e-2, targets_steps=120, short=10)
TARGETS = 'cross_attn,self_attn,text_attn,text_mlp'  # the paper's layers


def _stage(objective, s, steps, prompt, seed=0, **model):
  c = quickstart.stage(objective, s, steps, prompt, seed, **model)
  c.data.update(test_fraction=s['test_fraction'], context='target')
  c.model.targets = TARGETS
  return c


def _hyper(s, seed, rounds, beta):
  c = _stage('hyperlora', s, s['hyper'], s.get('prompt', 'static'), seed,
             pretrained='stage:base', prompt_dropout=0.0)
  c.hypernet.decoder.update(kind='transformer', width=128, depth=2, heads=4, rounds=rounds)
  c.hypernet.param.update(kind='lidb', rank=1, a=s['a'], b=s['b'], seed=0)
  c.hypernet.gamma_init = 1.0  # the scale the target weights were fitted at
  c.hypernet.loss.update(alpha=1.0, beta=beta, targets='stage:targets' if beta else '')
  return c


def get_config(size='cpu'):
  s = SIZES[size]
  c = quickstart.with_base_stage(s, _stage)
  targets = _stage('lora_bank', s, s['targets_steps'], s.get('prompt', 'static'),
                   pretrained='stage:base', prompt_dropout=0.0)
  targets.bank.update(param=dict(kind='lidb', rank=1, a=s['a'], b=s['b'], seed=0),
                      subjects_per_step=s['subjects'])
  targets.optim.update(lr=s['targets_lr'], weight_decay=0.0)
  c.stages.targets = targets
  order, runs = ['base', 'targets'], {}
  ablations = s.get('ablation_seeds', s['seeds'])
  for seed in s['seeds']:
    for row, rounds, beta in (('hyper', s['rounds'], s['beta']), ('hyper_k1', 1, s['beta']),
                              ('hyper_noweight', s['rounds'], 0.0)):
      if row != 'hyper' and seed not in ablations:
        continue
      name = quickstart.seeded(row, seed)
      c.stages[name] = _hyper(s, seed, rounds, beta)
      runs.setdefault(row, []).append(name)
      order.append(name)
  c.stage_order = tuple(order)
  fine = dict(rank=4, lr=s['fast_lr'], mode='hyperlora',
              prompt=s.get('fine_prompt', 'static'))
  first = [runs['hyper'][0]]
  extra = []  # Sizes' further rows: the fine-tuned ones on captions, the short ones.
  if 'caption_lr' in s:  # The fine-tuned rows again on each subject's caption.
    caption = dict(fine, prompt='caption', lr=s['caption_lr'])
    extra += [
        dict(name=f'No Hyper, captions ({s["fast"]} steps at {s["caption_lr"]:g})',
             runs=first, steps=s['fast'], from_scratch=True, **caption),
        dict(name=f'Hyper + fast fine-tuning, captions ({s["fast"]} steps at '
             f'{s["caption_lr"]:g})', runs=runs['hyper'], steps=s['fast'],
             from_scratch=False, **caption),
        dict(name=f'per-image LoRA, captions ({s["converged"]} steps)', runs=first,
             steps=s['converged'], from_scratch=True,
             **dict(caption, lr=s['converged_lr']))]
  if 'short' in s:  # Fewer steps than No Hyper needs: what the hypernetwork's start is worth.
    extra += [dict(name=f'No Hyper ({s["short"]} steps from zero)', runs=first,
                   steps=s['short'], from_scratch=True, **fine),
              dict(name=f'Hyper + fast fine-tuning ({s["short"]} steps)', runs=runs['hyper'],
                   steps=s['short'], from_scratch=False, **fine)]
  c.report = dict(
      kind='personalization', num_examples=s['report_subjects'], num_steps=s['eval_steps'],
      guidance=3.0, seeds=s['seeds'], rows=(
          dict(name='base model, no LoRA', runs=first, mode='no_lora'),
          dict(name='Only Hyper', runs=runs['hyper'], mode='hyperlora'),
          dict(name='Only Hyper, no weight-space loss', runs=runs['hyper_noweight'],
               mode='hyperlora'),
          dict(name=f'No Hyper ({s["fast"]} steps from zero)', runs=first, steps=s['fast'],
               from_scratch=True, **fine),
          dict(name=f'Hyper + fast fine-tuning ({s["fast"]} steps)', runs=runs['hyper'],
               steps=s['fast'], from_scratch=False, **fine),
          dict(name='Hyper (K=1) + fast fine-tuning', runs=runs['hyper_k1'],
               steps=s['fast'], from_scratch=False, **fine),
          dict(name='Hyper without weight-space loss + fast fine-tuning',
               runs=runs['hyper_noweight'], steps=s['fast'], from_scratch=False, **fine),
          dict(name=f'per-image LoRA, {s["converged"]} steps (DreamBooth-LoRA)', runs=first,
               steps=s['converged'], from_scratch=True, **dict(fine, lr=s['converged_lr'])),
          *extra,
          dict(name='oracle: base model, item in words', runs=first, mode='oracle'),
      ))
  return c
