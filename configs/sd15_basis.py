"""ByteDance HyperLoRA (Li et al. 2025) on SD1.5: a CLIP image encoder, a Perceiver
Resampler predicting coefficients of K=128 learned basis LoRAs per target, split into
an ID part and a Base part (each switchable with --config.hypernet.param.use_id=False).

  python -m hyperlora_jax.main --config=configs/sd15_basis.py \\
    --config.model.pretrained=/data/sd15 --config.hypernet.encoder.pretrained=/data/clip \\
    --config.data.source_dir=/data/portraits --workdir=...
"""
from hyperlora_jax import defaults


def get_config():
  c = defaults.get_config('hyperlora')
  c.model.update(pretrained=None, max_length=77, targets='cross_attn,self_attn')
  c.data.update(name='triples', resolution=512, prompt='scene')
  c.hypernet.encoder.update(kind='clip', pretrained='', trainable=False)
  c.hypernet.decoder.update(kind='perceiver', width=768, depth=4, heads=8)
  c.hypernet.param.update(kind='basis', rank=4, num_id=64, num_base=64)
  c.train.update(num_steps=50_000, batch_size=32, compute_dtype='bfloat16')
  c.optim.update(lr=1e-4, warmup_steps=1000)
  return c
