"""HyperLoRA for recontextualization (Zieba et al. 2024) on SD1.5 and VITON-HD.

A trainable CLIP image encoder, parallel shallow heads (arg 'heads', the paper's) or the
transformer decoder (arg 'transformer'), plain LoRA on q/k/v/out of every cross-
attention, one gamma. The paper's two-stage prompt schedule is one multi-stage config:
stage ``static`` trains on the static prompt ("a model wearing S*"), stage ``merged``
continues from its params (train.init_from) on the merged descriptive prompts (the
prompts file's); the paths are set once, for both stages:

  python -m hyperlora_jax.main --config=configs/sd15_recontext.py:heads \\
    --config.paths.pretrained=/data/sd15 --config.paths.clip=/data/clip-vit-l-14 \\
    --config.paths.data=/data/viton-hd --workdir=...

With ``paths.controlnet`` (a diffusers OpenPose ControlNet folder) both stages train with
pose guidance on VITON-HD's openpose_img/; with ``paths.ip_adapter`` and
``paths.image_encoder`` (IP-Adapter's file and its CLIP vision folder), HyperLoRA and
IP-Adapter in one UNet call: the paper's HyperLoRA + IP-Adapter.
"""
import ml_collections

from hyperlora_jax import defaults

# Stage -> (the prompt it trains on, its share of the steps).
SCHEDULE = (('static', 'static', 5_000), ('merged', 'scene', 15_000))


def _stage(decoder, paths, prompt, steps):
  c = defaults.get_config('hyperlora')
  c.model.update(pretrained=paths.get_ref('pretrained'), max_length=77, targets='cross_attn')
  c.model.controlnet.folder = paths.get_ref('controlnet')
  c.model.ip_adapter.update(weights=paths.get_ref('ip_adapter'),
                            image_encoder=paths.get_ref('image_encoder'))
  c.data.update(name='paired', source_dir=paths.get_ref('data'), resolution=512,
                prompt=prompt, static_prompt='a model wearing S*')
  c.hypernet.encoder.update(kind='clip', pretrained=paths.get_ref('clip'), trainable=True)
  c.hypernet.decoder.update(kind=decoder, hidden=64, width=768, depth=4, heads=8, rounds=4)
  c.hypernet.param.update(kind='plain', rank=4)
  c.train.update(num_steps=steps, batch_size=32, log_every=50, eval_every=2000,
                 checkpoint_every=1000, compute_dtype='bfloat16')
  c.optim.update(lr=1e-4, warmup_steps=500)
  return c


def get_config(decoder='heads'):
  c = ml_collections.ConfigDict()
  # Set on the command line; every stage reads them (None: must be given).
  c.paths = dict(pretrained=ml_collections.config_dict.placeholder(str), clip='', data='',
                 controlnet='', ip_adapter='', image_encoder='')
  c.stages = ml_collections.ConfigDict()
  previous = None
  for name, prompt, steps in SCHEDULE:
    stage = _stage(decoder, c.paths, prompt, steps)
    if previous:
      stage.train.init_from = f'stage:{previous}'
    c.stages[name] = stage
    previous = name
  c.stage_order = tuple(name for name, _, _ in SCHEDULE)
  return c
