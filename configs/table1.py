"""The recontextualization paper's Table 1 on the synthetic task: HyperLoRA, HyperLoRA +
IP-Adapter, IP-Adapter, a single LoRA, no LoRA and the oracle, each without and with
pose guidance through a ControlNet.

  python -m hyperlora_jax.main --config=configs/table1.py --workdir=workdirs/table1
  python -m hyperlora_jax.main --config=configs/table1.py:gpu --workdir=...

The data is posed (data.pose): every target's figure has an offset and a size that no
prompt names, and its pose map is the example's condition image. Stages, each reused
when finished:
  base          a text-to-image model from scratch on full prompts (the item named)
  controlnet    a ControlNet on the pose maps beside the frozen base (diffusers'
                from_unet init), exported as a diffusers controlnet/ folder
  ip_adapter    IP-Adapter Plus on the context images (a frozen random CLIP image
                encoder: no trained CLIP fits the task), exported as diffusers'
                load_ip_adapter layout
  single_lora, hyperlora   the quickstart's rows
  hyperlora_ip  HyperLoRA trained with the frozen IP-Adapter in the same UNet call
  report        each row without pose, and with the ControlNet attached (pose
                guidance), on held-out items: item color / pattern accuracy, pose
                adherence, C2G / T2G / T2Gdiff with a random CLIP vision tower (a
                stand-in, said so in the table); results in <workdir>/report/table.md
"""
from configs import quickstart

SIZES = {
    # quickstart's keys, and: ControlNet / IP-Adapter steps and learning rate, the CLIP
    # towers' shape (IP-Adapter's image encoder, the report's scorer), IP-Adapter Plus'
    # Resampler width and tokens.
    # cpu: 24 px with the item at 0.46 of the side: the item is 11 px, read exactly, and
    # the figure around it is large enough for its pose to be read (at the quickstart's
    # 16 px the item covers most of the figure). Steps and batch are cut so that the
    # whole table runs in about an hour on a shared 2-core machine (RESULTS.md): a
    # shape check of the table, not a measurement of the methods (that is the gpu size).
    'cpu': dict(quickstart.SIZES['cpu'], resolution=24, item_frac=0.46, batch=8, base=400,
                lora=50, hyper=200, control=200, ip=200, part_lr=1e-3, eval_examples=48,
                eval_steps=10, vit=dict(hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        image_size=24, patch_size=4, projection_dim=64),
                ip_hidden=64, ip_tokens=8),
    'gpu': dict(quickstart.SIZES['gpu'], control=2000, ip=3000, part_lr=1e-4,
                vit=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4, image_size=64, patch_size=8,
                         projection_dim=256),
                ip_hidden=256, ip_tokens=16),
    'smoke': dict(quickstart.SIZES['smoke'], resolution=16, control=2, ip=2, part_lr=1e-3,
                  vit=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=16, patch_size=8,
                           projection_dim=32),
                  ip_hidden=64, ip_tokens=4),
}


def _stage(objective, size, steps, prompt, seed=0, **model):
  c = quickstart.stage(objective, size, steps, prompt, seed, **model)
  c.data.pose = True
  c.controlnet.conditioning_embedding_out_channels = (16,)  # pixel space: no downsampling
  c.ip_adapter.update(kind='plus', num_tokens=size['ip_tokens'], hidden=size['ip_hidden'],
                      heads=max(1, size['ip_hidden'] // 64), depth=4, vit=dict(size['vit']))
  return c


def get_config(size='cpu'):
  s = SIZES[size]
  c = quickstart.with_base_stage(s, _stage)
  control = _stage('controlnet', s, s['control'], 'full', pretrained='stage:base',
                   prompt_dropout=0.1)
  control.optim.lr = s['part_lr']
  c.stages.controlnet = control
  order, runs = ['base', 'controlnet'], {}

  def add(row, seed, stage):
    name = quickstart.seeded(row, seed)
    c.stages[name] = stage
    runs.setdefault(row, []).append(name)
    order.append(name)

  for seed in s['seeds']:
    ip = _stage('ip_adapter', s, s['ip'], 'scene', seed, pretrained='stage:base',
                prompt_dropout=0.0)
    ip.optim.lr = s['part_lr']
    add('ip_adapter', seed, ip)
    lora = _stage('unet_lora', s, s['lora'], 'scene', seed, pretrained='stage:base',
                  prompt_dropout=0.0)
    add('single_lora', seed, lora)
    for row, with_ip in (('hyperlora', False), ('hyperlora_ip', True)):
      hyper = _stage('hyperlora', s, s['hyper'], 'scene', seed, pretrained='stage:base',
                     prompt_dropout=0.0)
      hyper.hypernet.param.update(kind='plain', rank=4)
      hyper.data.augment.p = 0.5
      hyper.optim.lr = s['hyper_lr']
      if with_ip:
        source = f'stage:{quickstart.seeded("ip_adapter", seed)}'
        hyper.model.ip_adapter.update(weights=source, image_encoder=source)
      add(row, seed, hyper)
  c.stage_order = tuple(order)
  # Rows: several runs (one per training seed) report the spread over them; no LoRA and
  # the oracle are the base model (the first hyperlora run's) over the sampling seeds.
  first = runs['hyperlora'][0]
  row = lambda name: runs[name] if len(runs[name]) > 1 else runs[name][0]
  c.report = dict(
      kind='grouped', num_examples=s['eval_examples'], num_steps=s['eval_steps'], guidance=3.0,
      seeds=s['seeds'], clip='random', clip_vit=dict(s['vit']),
      # (row, its stage(s), mode) and (group, its add-ons), in the table's order.
      rows=(('HyperLoRA', row('hyperlora'), 'hyperlora'),
            ('HyperLoRA + IP-Adapter', row('hyperlora_ip'), 'hyperlora'),
            ('IP-Adapter', row('ip_adapter'), 'ip_adapter'),
            ('single LoRA', row('single_lora'), 'single_lora'),
            ('no LoRA', first, 'no_lora'),
            ('oracle (full prompt)', first, 'oracle')),
      groups=(('without pose', {}),
              ('with pose', {'controlnet': {'folder': 'stage:controlnet'}})))
  return c

