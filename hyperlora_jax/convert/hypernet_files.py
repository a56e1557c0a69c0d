"""A hypernetwork as files, for use without Orbax or this project's training code:
hypernet.safetensors (every variable: trained params, a frozen encoder, the frozen aux
matrices) and hypernet.json (what builds the module: the hypernet config section, the
targets, the encoder tower's shape and the training resolution)."""
import json
import os
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from hyperlora_jax import files
from hyperlora_jax import lora as lora_lib
from hyperlora_jax.convert import core
from hyperlora_jax.models import clip, hypernet

WEIGHTS = 'hypernet.safetensors'
CONFIG = 'hypernet.json'


def tower_config(module: hypernet.HyperNetwork) -> Optional[dict]:
  """The CLIP/ViT tower's shape fields, so `load` rebuilds it exactly (None: no tower)."""
  encoder = module.encoder
  if not isinstance(encoder, hypernet.CLIPEncoder):
    return None
  tower = encoder.tower
  return {f: getattr(tower, f) for f in tower.__dataclass_fields__
          if f not in ('parent', 'name', 'dtype')}


def save(folder: str, module: hypernet.HyperNetwork, variables: Any,
         hypernet_config: dict, resolution: int) -> None:
  """Writes `module` with its `variables`; `hypernet_config` is the config section it
  was built from (`hypernet.build`)."""
  spec = {'hypernet': hypernet_config,
          'targets': [[t.path, t.d_in, t.d_out] for t in module.targets],
          'tower': tower_config(module), 'resolution': resolution}
  with files.atomic_folder(folder) as tmp:
    save_file({k: np.array(v, np.float32) for k, v in
               traverse_util.flatten_dict(jax.device_get(variables), sep='/').items()},
              os.path.join(tmp, WEIGHTS), metadata={'format': 'np'})
    with open(os.path.join(tmp, CONFIG), 'w') as f:
      json.dump(spec, f, indent=2)


def load(folder: str):
  """(module, variables, spec) of a `save` folder:
  ``module.apply(variables, images)`` is the LoRA tree the run predicts."""
  config_file = os.path.join(folder, CONFIG)
  if not os.path.exists(config_file):
    raise FileNotFoundError(f'No {CONFIG} in {folder}: not an exported hypernetwork.')
  with open(config_file) as f:
    spec = json.load(f)
  targets = [lora_lib.Target(*t) for t in spec['targets']]
  tower = spec['tower'] and clip.vision_from_config(spec['tower'])
  module = hypernet.build(ml_collections.ConfigDict(spec['hypernet']), targets, tower)
  flat = core.read_safetensors(os.path.join(folder, WEIGHTS))
  return module, traverse_util.unflatten_dict(flat, sep='/'), spec
