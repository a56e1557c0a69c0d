"""Pieces the experiment configs share: model sizes and the default sections."""
import ml_collections

from hyperlora_jax import train
from hyperlora_jax.data import pipeline


def tiny_unet(channels=(32, 64, 64), cross_attention_dim=64, heads=4):
  """A pixel-space UNet for 3-channel images (the quickstart's base model).

  Attention only below the full resolution: at 32x32 pixels, self-attention over 1024
  tokens would cost more than the rest of the UNet on a CPU.
  """
  n = len(channels)
  return dict(
      in_channels=3, out_channels=3, block_out_channels=channels, layers_per_block=1,
      down_block_types=('DownBlock2D',) + ('CrossAttnDownBlock2D',) * (n - 1),
      up_block_types=('CrossAttnUpBlock2D',) * (n - 1) + ('UpBlock2D',),
      cross_attention_dim=cross_attention_dim, attention_head_dim=heads,
      norm_num_groups=min(8, channels[0]))


def tiny_text(width=64, layers=2, heads=4):
  return dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
              num_attention_heads=heads, hidden_act='quick_gelu')


SD15_UNET = dict(
    in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2, down_block_types=('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',),
    up_block_types=('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3, cross_attention_dim=768,
    attention_head_dim=8, norm_num_groups=32)

# CLIP ViT-L/14 vision tower shape (HyperDreamBooth uses a ViT-H; size by config).
VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
               num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768)


def base_config(objective: str) -> ml_collections.ConfigDict:
  """Every section with defaults; experiment configs override what they change."""
  c = ml_collections.ConfigDict()
  c.objective = objective
  c.seed = 0
  c.data = pipeline.default_config()
  c.model = dict(pretrained='', unet=tiny_unet(), text=tiny_text(), max_length=40,
                 scheduler=dict(prediction_type='epsilon'), targets='cross_attn',
                 prompt_dropout=0.1,
                 min_snr_gamma=ml_collections.config_dict.placeholder(float))
  c.lora = dict(rank=4, alpha=4.0)
  c.hypernet = dict(
      encoder=dict(kind='conv', channels=(32, 64, 128), pretrained='', trainable=True,
                   remat='dots_with_no_batch_dims_saveable', vit=dict(VIT_L14)),
      decoder=dict(kind='heads', hidden=64, width=128, depth=2, heads=4, rounds=2),
      param=dict(kind='plain', rank=2, a=100, b=50, seed=0, num_id=16, num_base=16,
                 use_id=True, use_base=True),
      gamma_init=0.0)
  return train.add_train_defaults(c)
