"""transformers ViTModel folders (a DINO ViT such as facebook/dino-vits16) -> our ViTModel
(models/vit.py) and its preprocessing settings.

Files hold the 4.x names (``encoder.layer.N.attention.attention.query``: the hub's
checkpoints, and what transformers 5 still writes), renamed here to the module names of
transformers 5 (``layers.N.attention.q_proj``) by its own rules for ViTModel (its
conversion_mapping.py); a state dict already in those names loads as it is.
"""
import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp

from hyperlora_jax.convert import core
from hyperlora_jax.models import vit

# transformers 5's renaming of ViTModel's 4.x keys, applied in this order.
_RENAMES_4X = ((r'encoder\.layer\.', 'layers.'), (r'attention\.query', 'q_proj'),
               (r'attention\.key', 'k_proj'), (r'attention\.value', 'v_proj'),
               (r'attention\.output\.dense', 'attention.o_proj'),
               (r'intermediate\.dense', 'mlp.fc1'), (r'output\.dense', 'mlp.fc2'))
_RESAMPLE = {2: 'linear', 3: 'bicubic'}  # PIL's BILINEAR, BICUBIC


def _rename_4x(key: str) -> str:
  for pattern, new in _RENAMES_4X:
    key = re.sub(pattern, new, key)
  return key


def load_vit(folder: str, dtype: Any = jnp.float32, allow_pickle: bool = False):
  """(module, params, config) from a transformers ViTModel folder.

  A pooler is built where the checkpoint has one (DINO's have none). A folder of another
  model (a CLIP, a DINOv2) is refused, naming its model_type; missing, unexpected and
  misshaped keys are named by `core.torch_to_flax`.
  """
  config, state = core.read_model_folder(folder, allow_pickle=allow_pickle)
  try:
    module = vit.from_config(config, dtype)
  except ValueError as e:
    raise ValueError(f'{folder}: {e}') from None
  renamed = {_rename_4x(k): v for k, v in state.items()}
  module = module.clone(add_pooling_layer=any(k.startswith('pooler.') for k in renamed))
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *module.dummy_inputs()))
  try:
    # mask_token: masked image modeling's (use_mask_token), unused by the forward pass.
    params = core.torch_to_flax(renamed, shapes['params'],
                                ignore=[r'^embeddings\.mask_token$'])
  except core.CheckpointError as e:
    if set(renamed) == set(state):
      raise
    raise core.CheckpointError(
        f'{folder}: {e}\n(Torch keys in transformers 5\'s names, e.g. '
        "layers.0.attention.q_proj; the file's 4.x names, e.g. "
        'encoder.layer.0.attention.attention.query, were renamed.)') from None
  return module, params, config


def load_image_processor(folder: str, module: vit.ViTModel) -> dict:
  """`vit.preprocess_images`' keyword arguments from the folder's
  preprocessor_config.json (ViTImageProcessor's fields: size, resample, image_mean,
  image_std); without one, the model's image size, bilinear, and DINO's ImageNet
  statistics. Settings this preprocessing does not have (a center crop, a
  shortest-edge size) are refused."""
  path = os.path.join(folder, 'preprocessor_config.json')
  settings = {}
  if os.path.exists(path):
    with open(path) as f:
      settings = json.load(f)
  size = settings.get('size', module.image_size)
  if isinstance(size, int):
    size = {'height': size, 'width': size}
  resample = settings.get('resample', 2)
  unsupported = [k for k in ('do_center_crop', 'do_pad') if settings.get(k)]
  if not {'height', 'width'} <= set(size):
    unsupported.append(f'size {size}')
  if resample not in _RESAMPLE:
    unsupported.append(f'resample {resample}')
  if settings.get('do_resize', True) is False or settings.get('do_normalize', True) is False:
    unsupported.append('do_resize or do_normalize off')
  if unsupported:
    raise ValueError(f'{path}: unsupported ViTImageProcessor settings: '
                     f'{", ".join(unsupported)}')
  return dict(size=(size['height'], size['width']), resample=_RESAMPLE[resample],
              mean=tuple(settings.get('image_mean', vit.IMAGENET_MEAN)),
              std=tuple(settings.get('image_std', vit.IMAGENET_STD)))
