"""HyperDreamBooth (Ruiz et al. 2023) on SD1.5: a ViT encoder and the transformer
decoder with K=4 refinement rounds predicting Lightweight DreamBooth weights (rank 1,
a=100, b=50) for self- and cross-attention, from one face image and "a [V] face".

  python -m hyperlora_jax.main --config=configs/sd15_hyperdreambooth.py \\
    --config.model.pretrained=/data/sd15 --config.data.source_dir=/data/faces --workdir=...
"""
from hyperlora_jax import defaults


def get_config():
  c = defaults.get_config('hyperlora')
  c.model.update(pretrained=None, max_length=77, targets='cross_attn,self_attn')
  c.data.update(name='single', resolution=512, static_prompt='a [V] face', prompt='static')
  c.hypernet.encoder.update(kind='vit', trainable=True)
  c.hypernet.decoder.update(kind='transformer', width=768, depth=4, heads=8, rounds=4)
  c.hypernet.param.update(kind='lidb', rank=1, a=100, b=50, seed=0)
  c.train.update(num_steps=50_000, batch_size=32, compute_dtype='bfloat16')
  c.optim.update(lr=1e-4, warmup_steps=1000)
  return c
