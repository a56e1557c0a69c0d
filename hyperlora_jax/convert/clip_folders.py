"""transformers CLIP folders <-> our CLIP towers (models/clip.py), and tokenizer folders.

The towers load from a CLIPTextModel[WithProjection] folder (a pipeline's
``text_encoder/``, SDXL's ``text_encoder_2/``), a CLIPVisionModel[WithProjection] folder
or a CLIPModel folder holding both, saved by transformers 4.x or 5.x (which drops the
``text_model.`` / ``vision_model.`` prefix of the models without a projection).
"""
import functools
import hashlib
import json
import os
import string
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from safetensors.numpy import save_file

from hyperlora_jax import files
from hyperlora_jax.convert import core
from hyperlora_jax.models import clip


def _load(folder: str, build, tower: str, projection: str, allow_pickle: bool):
  """Loads the tower (under ``tower``) and, when the built module has one, its
  ``projection`` (the torch key prefixes)."""
  config, state = core.read_model_folder(folder, allow_pickle=allow_pickle)
  module = build(config)
  prefixes = (tower, projection) if module.projection_dim else (tower,)
  if config.get('text_config') or config.get('vision_config'):
    # A CLIPModel checkpoint holds both towers (and logit_scale); keep this tower's keys.
    state = {k: v for k, v in state.items() if k.startswith(prefixes)}
  elif not any(k.startswith(tower) for k in state):
    # transformers >= 5 saves CLIPTextModel / CLIPVisionModel without the tower prefix.
    state = {k if k.startswith(projection) else tower + k: v for k, v in state.items()}
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *module.dummy_inputs()))
  params = core.torch_to_flax(state, shapes['params'], ignore=[r'position_ids$'])
  return module, params, config


def load_text_model(folder: str, dtype: Any = jnp.float32, allow_pickle: bool = False):
  """(module, params, config) from a CLIPTextModel[WithProjection] folder (a pipeline's
  text_encoder/ or text_encoder_2/) or a CLIPModel folder, saved by transformers 4.x or 5.x."""
  return _load(folder, functools.partial(clip.text_from_config, dtype=dtype),
               'text_model.', 'text_projection.', allow_pickle)


def load_vision_model(folder: str, dtype: Any = jnp.float32, allow_pickle: bool = False):
  """(module, params, config) from a CLIPVisionModel[WithProjection] or CLIPModel folder."""
  return _load(folder, functools.partial(clip.vision_from_config, dtype=dtype),
               'vision_model.', 'visual_projection.', allow_pickle)


def save_vision_model(params: Any, module: clip.CLIPVisionModelWithProjection,
                      folder: str) -> None:
  """Writes a vision tower as a transformers CLIPVisionModelWithProjection folder
  (config.json + model.safetensors), which `load_vision_model` and transformers read."""
  fields = ('hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads',
            'image_size', 'patch_size', 'projection_dim', 'hidden_act', 'layer_norm_eps',
            'num_channels')
  config = dict({f: getattr(module, f) for f in fields}, model_type='clip_vision_model',
                architectures=['CLIPVisionModelWithProjection'])
  with files.atomic_folder(folder) as tmp:
    save_file(core.flax_to_torch(params), os.path.join(tmp, 'model.safetensors'),
              metadata={'format': 'pt'})
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
      json.dump(config, f, indent=2, sort_keys=True)


def load_tokenizer(folder: str):
  """transformers' CLIPTokenizer from a local folder, e.g. a diffusers pipeline's tokenizer/."""
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  return CLIPTokenizer.from_pretrained(folder)


def write_tokenizer(words: Sequence[str], folder: str, max_length: int = 77) -> None:
  """Writes a small CLIP BPE tokenizer folder built from ``words``.

  For models trained from scratch on a closed vocabulary (the synthetic task): the
  folder is an ordinary CLIPTokenizer folder, so our code and diffusers load it alike.
  Each word gets the merges that spell it left to right; where another word's merge
  ranks first, BPE stops at a few pieces instead of one, which is still deterministic.
  Every printable ASCII character is in the vocabulary, so any text tokenizes.
  """
  chars = [c for c in string.printable if not c.isspace() and c == c.lower()]
  vocab = ['<|startoftext|>', '<|endoftext|>'] + chars + [c + '</w>' for c in chars]
  merges = []
  for word in sorted({w.lower() for w in words}):
    pieces = list(word[:-1]) + [word[-1] + '</w>']
    while len(pieces) > 1:  # merge left to right: the word becomes one token
      merge = (pieces[0], pieces[1])
      if merge not in merges:
        merges.append(merge)
        vocab.append(pieces[0] + pieces[1])
      pieces = [pieces[0] + pieces[1]] + pieces[2:]
  vocab = list(dict.fromkeys(vocab))
  with files.atomic_folder(folder) as tmp:
    with open(os.path.join(tmp, 'vocab.json'), 'w') as f:
      json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(tmp, 'merges.txt'), 'w') as f:
      f.write('#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in merges))
    with open(os.path.join(tmp, 'tokenizer_config.json'), 'w') as f:
      json.dump({'model_max_length': max_length, 'bos_token': '<|startoftext|>',
                 'eos_token': '<|endoftext|>', 'pad_token': '<|endoftext|>',
                 'unk_token': '<|endoftext|>', 'tokenizer_class': 'CLIPTokenizer'}, f)


def cached_tokenizer_folder(words: Sequence[str], max_length: int) -> str:
  """`write_tokenizer`'s folder for these words, written once into the user's cache
  (~/.cache/hyperlora_jax/tokenizers/<digest>, or under $XDG_CACHE_HOME): one folder per
  vocabulary, instead of a temporary folder per model build."""
  digest = hashlib.sha1(json.dumps([sorted(set(words)), max_length]).encode()).hexdigest()
  cache = os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache')
  folder = os.path.join(cache, 'hyperlora_jax', 'tokenizers', digest[:16])
  if not os.path.exists(os.path.join(folder, 'tokenizer_config.json')):
    write_tokenizer(words, folder, max_length)
  return folder
