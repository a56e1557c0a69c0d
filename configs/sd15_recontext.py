"""HyperLoRA for recontextualization (Zieba et al. 2024) on SD1.5 and VITON-HD.

A trainable CLIP image encoder, parallel shallow heads (arg 'heads', the paper's) or the
transformer decoder (arg 'transformer'), plain LoRA on q/k/v/out of every cross-
attention, one gamma. Two stages as in the paper: first the static prompt, then the
merged prompts:

  python -m hyperlora_jax.main --config=configs/sd15_recontext.py:heads \\
    --config.model.pretrained=/data/sd15 --config.hypernet.encoder.pretrained=/data/clip-vit-l-14 \\
    --config.data.source_dir=/data/viton-hd --config.data.prompt=static --workdir=...
  (stage 2: same workdir, --config.data.prompt=scene --config.train.num_steps=<more>)
"""
from hyperlora_jax import defaults


def get_config(decoder='heads'):
  c = defaults.get_config('hyperlora')
  c.model.update(pretrained=None, max_length=77, targets='cross_attn')
  c.data.update(name='paired', resolution=512, prompt='scene',
                static_prompt='a model wearing S*')
  c.hypernet.encoder.update(kind='clip', pretrained='', trainable=True)
  c.hypernet.decoder.update(kind=decoder, hidden=64, width=768, depth=4, heads=8, rounds=4)
  c.hypernet.param.update(kind='plain', rank=4)
  c.train.update(num_steps=20_000, batch_size=32, log_every=50, eval_every=2000,
                 checkpoint_every=1000, compute_dtype='bfloat16')
  c.optim.update(lr=1e-4, warmup_steps=500)
  return c
