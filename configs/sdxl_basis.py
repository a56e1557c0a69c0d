"""ByteDance HyperLoRA and its training recipe on SDXL, as ByteDance ships it
(sdxl_hyper_id_lora_v1): `configs/sd15_basis.py`'s sizes (CLIP ViT-L/14's penultimate
layer, resamplers of width 1024, depth 4, 12 heads of 64, two queries per layer, K = 128,
ID rank 8, Base rank 4, 16 identity tokens from ArcFace) at 1024 px on an SDXL folder
(both text towers; the LoRA on every attention layer of its UNet).

  python -m hyperlora_jax.main --config=configs/sdxl_basis.py --workdir=/runs/basis_xl \\
    --config.pretrained=/data/sdxl-base-1.0 --config.clip=/data/clip-vit-large-patch14 \\
    --config.source_dir=/data/portraits
"""
from configs import sd15_basis


def basis_config(stage: str):
  c = sd15_basis.basis_config(stage, resolution=1024)
  c.train.update(batch_size=16, remat='dots_with_no_batch_dims_saveable')
  return c


def get_config(arg: str = 'stages'):
  return sd15_basis.get_config(arg, make=basis_config)
