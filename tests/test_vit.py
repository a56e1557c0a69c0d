"""ViTModel (DINO's) against transformers' PyTorch model, on tiny random checkpoints, and
the ViTImageProcessor preprocessing."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as save_torch_file

from hyperlora_jax.convert import CheckpointError, vit_folders
from hyperlora_jax.models import vit
from tests.test_clip import rel_err

CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=37, image_size=32, patch_size=8)


def vit_folder(folder, add_pooling_layer=True, **overrides) -> str:
  """A tiny random ViTModel saved by transformers' save_pretrained."""
  torch.manual_seed(0)
  model = transformers.ViTModel(transformers.ViTConfig(**{**CONFIG, **overrides}),
                                add_pooling_layer=add_pooling_layer).eval()
  model.save_pretrained(folder)
  return str(folder)


def test_vit_matches_transformers(tmp_path):
  pixels = np.random.RandomState(1).randn(2, 3, 32, 32).astype(np.float32)
  saved = vit_folder(tmp_path / 'saved')
  # The module's own state dict (transformers 5's names; save_pretrained writes 4.x's),
  # without a pooler as DINO's checkpoints.
  own = tmp_path / 'own'
  own.mkdir()
  torch.manual_seed(1)
  model = transformers.ViTModel(transformers.ViTConfig(**CONFIG), add_pooling_layer=False)
  save_torch_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(own / 'model.safetensors'))
  model.config.to_json_file(str(own / 'config.json'))
  assert any('.attention.q_proj.' in k for k in model.state_dict())
  assert any('.attention.attention.query.' in k for k in load_file(f'{saved}/model.safetensors'))
  for folder, pooled in ((saved, True), (str(own), False)):
    module, params, _ = vit_folders.load_vit(folder)
    assert module.add_pooling_layer == pooled
    reference = transformers.ViTModel.from_pretrained(folder, add_pooling_layer=pooled).eval()
    with torch.no_grad():
      ref = reference(torch.tensor(pixels), output_hidden_states=True)
    out = module.apply({'params': params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    errors = {'last_hidden_state': rel_err(out.last_hidden_state, ref.last_hidden_state),
              'CLS': rel_err(out.last_hidden_state[:, 0], ref.last_hidden_state[:, 0])}
    assert len(out.hidden_states) == len(ref.hidden_states) == CONFIG['num_hidden_layers'] + 1
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
      errors[f'hidden_states[{i}]'] = rel_err(a, b)
    if pooled:
      errors['pooler_output'] = rel_err(out.pooler_output, ref.pooler_output)
    else:
      assert out.pooler_output is None
    print(folder, errors)
    assert max(errors.values()) < 1e-5, errors


def test_bad_vit_folders(tmp_path):
  clip_folder = tmp_path / 'clip'
  transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
      image_size=32, patch_size=8)).save_pretrained(clip_folder)
  with pytest.raises(ValueError, match="clip: not a ViT: its model_type is 'clip_vision_model'"):
    vit_folders.load_vit(str(clip_folder))
  with pytest.raises(FileNotFoundError, match='No config.json'):
    vit_folders.load_vit(str(tmp_path))
  folder = vit_folder(tmp_path / 'vit')
  path = f'{folder}/model.safetensors'
  state = load_file(path)
  state['encoder.layer.1.attention.attention.key.weight'] = np.zeros((32, 31), np.float32)
  del state['layernorm.bias']
  save_file(state, path)
  with pytest.raises(CheckpointError) as e:
    vit_folders.load_vit(folder)
  message = str(e.value)
  assert 'misshaped' in message
  assert 'layers.1.attention.k_proj.weight: checkpoint (32, 31)' in message
  assert 'missing' in message and 'layernorm/bias' in message
  assert "the file's 4.x names, e.g. encoder.layer.0.attention.attention.query" in message
  with pytest.raises(ValueError, match='multiple of patch_size'):
    vit.from_config({**CONFIG, 'model_type': 'vit', 'image_size': 36})


@pytest.mark.parametrize('shape,resample', [((48, 64), 2), ((20, 24), 2), ((40, 40), 3)])
def test_preprocess_matches_vit_image_processor(tmp_path, shape, resample):
  processor = transformers.ViTImageProcessor(
      size={'height': 32, 'width': 24}, resample=resample,
      image_mean=list(vit.IMAGENET_MEAN), image_std=[0.2, 0.3, 0.25])
  processor.save_pretrained(tmp_path)
  settings = vit_folders.load_image_processor(str(tmp_path), vit.ViTModel())
  assert settings['size'] == (32, 24) and settings['std'] == (0.2, 0.3, 0.25)
  images = np.random.RandomState(4).randint(0, 256, (2,) + shape + (3,)).astype(np.uint8)
  ref = processor(images=list(images), return_tensors='np')['pixel_values'].transpose(0, 2, 3, 1)
  ours = np.asarray(vit.preprocess_images(images, **settings))
  assert ours.shape == (2, 32, 24, 3)
  levels = np.abs(ours - ref) * np.asarray(settings['std']) * 255  # in 8-bit steps
  print(shape, resample, 'max |diff| in 8-bit levels', levels.max())
  assert levels.max() < 1.01


def test_image_processor_settings(tmp_path):
  module = vit.from_config({**CONFIG, 'model_type': 'vit'})
  assert vit_folders.load_image_processor(str(tmp_path), module) == dict(
      size=(32, 32), resample='linear', mean=vit.IMAGENET_MEAN, std=vit.IMAGENET_STD)
  (tmp_path / 'preprocessor_config.json').write_text(json.dumps(
      {'size': 224, 'resample': 3, 'do_center_crop': True}))
  with pytest.raises(ValueError, match='unsupported ViTImageProcessor settings: do_center_crop'):
    vit_folders.load_image_processor(str(tmp_path), module)
