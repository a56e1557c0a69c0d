"""ByteDance HyperLoRA (Li et al. 2025) and its training recipe on SD1.5, at the sizes of
ByteDance's published inference code (ComfyUI-HyperLoRA): a frozen CLIP ViT-L/14 read at
its penultimate layer, Perceiver Resamplers of width 1024, depth 4, 12 heads of 64, two
queries per adapted layer (its down and its up coefficients), K = 128 basis LoRAs per
layer of rank 8 (ID) and 4 (Base), 16 identity tokens from a 512-d ArcFace embedding.

The three stages (`objectives.hyperlora_basis`) as one multi-stage run, on a 'subjects'
folder (several photos per person, each with its face box and ArcFace embedding beside
it: `data.builders`):

  python -m hyperlora_jax.main --config=configs/sd15_basis.py --workdir=/runs/basis \\
    --config.pretrained=/data/sd15 --config.clip=/data/clip-vit-large-patch14 \\
    --config.source_dir=/data/portraits

or one stage (base | id_clip | id_embed | joint) as one run, e.g. stage 2 from stage 1:

  python -m hyperlora_jax.main --config=configs/sd15_basis.py:id_clip \\
    --config.train.init_from=/runs/stage1 ... --workdir=/runs/stage2
"""
import ml_collections

from hyperlora_jax import defaults

STAGES = ('base', 'id_clip', 'id_embed')
STEPS = {'base': 20_000, 'id_clip': 30_000, 'id_embed': 20_000, 'joint': 70_000}


def basis_config(stage: str, resolution: int = 512):
  """One stage of the recipe at ByteDance's sizes (paths left for the command line)."""
  c = defaults.get_config('hyperlora_basis')
  c.model.update(pretrained=None, max_length=77, targets='cross_attn,self_attn')
  c.data.update(name='subjects', resolution=resolution, set_size=4, set_random=True,
                id_embed_dim=512)
  c.hypernet.encoder.update(kind='clip', pretrained='', trainable=False, layer=-2)
  c.hypernet.decoder.update(kind='perceiver', width=1024, depth=4, heads=12, head_dim=64,
                            queries=2, block='separate')
  c.hypernet.param.update(kind='basis', mix='factors', num_id=128, num_base=128, rank=8,
                          base_rank=4)
  c.basis.update(stage=stage, encoders='shared')
  # Their base condition: the face blurred with a radius of 45 px at 512 (sigma 0.09).
  c.basis.region.update(mode='blur', blur=0.09)
  c.basis.identity.update(kind='precomputed', tokens=16)
  c.train.update(num_steps=STEPS[stage], batch_size=32, compute_dtype='bfloat16',
                 checkpoint_every=2000)
  c.optim.update(lr=1e-4, warmup_steps=1000)
  c.eval.num_examples = 0  # Real data: evaluate's folder mode scores images.
  return c


def get_config(arg: str = 'stages', make=basis_config):
  """arg: 'stages' (the three, one run) or one of them ('base' | 'id_clip' | 'id_embed' |
  'joint': one stage end to end)."""
  if arg != 'stages':
    return make(arg)
  c = ml_collections.ConfigDict()
  # The paths every stage shares: set once on the command line (--config.pretrained=...).
  c.pretrained = ml_collections.config_dict.placeholder(str)
  c.clip = ml_collections.config_dict.placeholder(str)
  c.source_dir = ml_collections.config_dict.placeholder(str)
  c.stages = ml_collections.ConfigDict()
  for i, stage in enumerate(STAGES):
    s = make(stage)
    s.model.pretrained = c.get_ref('pretrained')
    s.hypernet.encoder.pretrained = c.get_ref('clip')
    s.data.source_dir = c.get_ref('source_dir')
    if i:
      s.train.init_from = f'stage:basis_{STAGES[i - 1]}'
    c.stages[f'basis_{stage}'] = s
  c.stage_order = tuple(f'basis_{s}' for s in STAGES)
  return c
