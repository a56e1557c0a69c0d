"""HyperDreamBooth (Ruiz et al. 2023) on SD1.5: a ViT encoder and the transformer
decoder with K=4 refinement rounds predicting Lightweight DreamBooth weights (rank 1,
a=100, b=50) for the UNet's self- and cross-attention and the text encoder's attention
and MLP (the paper's 30K numbers), from one face image and "a [V] face".

  # 1. pre-optimize every training face's own LiDB weights (the target weights)
  python -m hyperlora_jax.main --config=configs/sd15_hyperdreambooth.py:targets \\
    --config.model.pretrained=/data/sd15 --config.data.source_dir=/data/faces \\
    --workdir=/runs/targets
  # 2. the hypernetwork, alpha * diffusion + beta * weight-space loss against them
  python -m hyperlora_jax.main --config=configs/sd15_hyperdreambooth.py \\
    --config.model.pretrained=/data/sd15 --config.data.source_dir=/data/faces \\
    --config.hypernet.loss.targets=/runs/targets --workdir=/runs/hdb
  # 3. fast fine-tuning: python -m hyperlora_jax.finetune --workdir=/runs/hdb ...
"""
from hyperlora_jax import defaults


def get_config(part='hypernet'):
  c = defaults.get_config('hyperlora' if part == 'hypernet' else 'lora_bank')
  c.model.update(pretrained=None, max_length=77,
                 targets='cross_attn,self_attn,text_attn,text_mlp')
  c.data.update(name='single', resolution=512, static_prompt='a [V] face', prompt='static')
  lidb = dict(kind='lidb', rank=1, a=100, b=50, seed=0)
  if part == 'targets':  # 32 faces per step, 100 steps each
    c.bank.update(param=lidb, subjects_per_step=32)
    c.train.update(num_steps=100, compute_dtype='bfloat16')
    c.optim.update(lr=1e-1, weight_decay=0.0)
    return c
  c.hypernet.encoder.update(kind='vit', trainable=True)
  c.hypernet.decoder.update(kind='transformer', width=768, depth=4, heads=8, rounds=4)
  c.hypernet.param.update(lidb)
  c.hypernet.gamma_init = 1.0  # the scale the target weights are fitted at
  c.hypernet.loss.update(alpha=1.0, beta=1.0)
  c.train.update(num_steps=50_000, batch_size=32, compute_dtype='bfloat16')
  c.optim.update(lr=1e-4, warmup_steps=1000)
  return c
