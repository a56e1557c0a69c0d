"""CLIP towers against transformers' PyTorch models, on tiny random checkpoints."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from hyperlora_jax.convert import CheckpointError, clip_folders, load_flax_model
from hyperlora_jax.models import clip

VOCAB = 99
BOS, EOS, PAD = 97, 98, 1
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=16, bos_token_id=BOS,
            eos_token_id=EOS, pad_token_id=PAD)
VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
              image_size=32, patch_size=8, projection_dim=24)


def rel_err(ours, ref) -> float:
  ref = np.asarray(ref, np.float64)
  return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


def save(model, folder) -> str:
  model.save_pretrained(folder)
  return str(folder)


def text_folder(tmp_path, name='text', **overrides) -> str:
  torch.manual_seed(0)
  config = transformers.CLIPTextConfig(**{**TEXT, **overrides})
  return save(transformers.CLIPTextModel(config).eval(), tmp_path / name)


def token_ids() -> np.ndarray:
  """Row 0 pads with EOS (SD1.x); row 1 pads with PAD and holds token 2 (the legacy
  eos_token_id) before its EOS."""
  rng = np.random.RandomState(0)
  ids = rng.randint(3, BOS, (2, 12))
  ids[:, 0] = BOS
  ids[0, 5:] = EOS
  ids[1, 3], ids[1, 8], ids[1, 9:] = 2, EOS, PAD
  return ids


def torch_text(folder, ids, mask=None):
  model = transformers.CLIPTextModel.from_pretrained(folder).eval()
  with torch.no_grad():
    out = model(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask),
                output_hidden_states=True)
  return jax.tree.map(lambda t: t.numpy(), (out.last_hidden_state, out.pooler_output,
                                           out.hidden_states))


@pytest.mark.parametrize('hidden_act,eos_token_id', [('quick_gelu', EOS), ('gelu', 2)])
def test_text_matches_transformers(tmp_path, hidden_act, eos_token_id):
  folder = text_folder(tmp_path, hidden_act=hidden_act, eos_token_id=eos_token_id)
  module, params, _ = clip_folders.load_text_model(folder)
  ids = token_ids()
  mask = (ids != PAD).astype(np.int64)
  for m in (None, mask):
    last, pooled, states = torch_text(folder, ids, m)
    out = module.apply({'params': params}, jnp.asarray(ids), None if m is None else m)
    errors = {'last_hidden_state': rel_err(out.last_hidden_state, last),
              'pooler_output': rel_err(out.pooler_output, pooled)}
    assert len(out.hidden_states) == len(states) == TEXT['num_hidden_layers'] + 1
    for i, (a, b) in enumerate(zip(out.hidden_states, states)):
      errors[f'hidden_states[{i}]'] = rel_err(a, b)
    print(hidden_act, eos_token_id, 'mask' if m is not None else 'no mask', errors)
    assert max(errors.values()) < 1e-5, errors
  # The padding mask must matter (past the padding), else the masked run proves nothing.
  plain = module.apply({'params': params}, jnp.asarray(ids)).last_hidden_state
  masked = module.apply({'params': params}, jnp.asarray(ids), mask).last_hidden_state
  assert np.abs(plain[1, 10:] - masked[1, 10:]).max() > 1e-3
  np.testing.assert_array_equal(plain[0], masked[0])


def test_text_bf16_is_finite_and_close(tmp_path):
  folder = text_folder(tmp_path)
  module, params, _ = clip_folders.load_text_model(folder, dtype=jnp.bfloat16)
  ids = token_ids()
  last, pooled, _ = torch_text(folder, ids)
  out = module.apply({'params': params}, jnp.asarray(ids))
  assert out.last_hidden_state.dtype == jnp.bfloat16
  errors = (rel_err(out.last_hidden_state, last), rel_err(out.pooler_output, pooled))
  print('bf16 text rel errors', errors)
  assert np.isfinite(np.asarray(out.last_hidden_state, np.float32)).all()
  assert max(errors) < 5e-2


@pytest.mark.parametrize('remat', ['none', 'dots_with_no_batch_dims_saveable'])
@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)])
def test_vision_matches_transformers(tmp_path, dtype, tol, remat):
  torch.manual_seed(0)
  config = transformers.CLIPVisionConfig(**VISION)
  folder = save(transformers.CLIPVisionModelWithProjection(config).eval(), tmp_path / 'vision')
  module, params, _ = clip_folders.load_vision_model(folder, dtype=dtype)
  module = module.clone(remat=remat)  # the scanned, checkpointed layers: same values
  pixels = np.random.RandomState(1).randn(2, 3, 32, 32).astype(np.float32)
  model = transformers.CLIPVisionModelWithProjection.from_pretrained(folder).eval()
  with torch.no_grad():
    ref = model(torch.tensor(pixels), output_hidden_states=True)
  out = module.apply({'params': params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
  errors = {'last_hidden_state': rel_err(out.last_hidden_state, ref.last_hidden_state),
            'image_embeds': rel_err(out.image_embeds, ref.image_embeds)}
  assert len(out.hidden_states) == len(ref.hidden_states) == VISION['num_hidden_layers'] + 1
  for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
    errors[f'hidden_states[{i}]'] = rel_err(a, b)
  with torch.no_grad():
    pooled = model.vision_model(torch.tensor(pixels)).pooler_output
  errors['pooler_output'] = rel_err(out.pooler_output, pooled)
  print(jnp.dtype(dtype).name, 'vision', errors)
  assert np.isfinite(np.asarray(out.image_embeds, np.float32)).all()
  assert max(errors.values()) < tol, errors


def test_full_clip_checkpoint_and_prefixed_text_checkpoint(tmp_path):
  torch.manual_seed(0)
  config = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=20)
  model = transformers.CLIPModel(config).eval()
  folder = save(model, tmp_path / 'clip')
  text, text_params, _ = clip_folders.load_text_model(folder)
  vision, vision_params, _ = clip_folders.load_vision_model(folder)
  assert vision.projection_dim == 20  # the CLIPConfig's, not the vision_config's
  ids = token_ids()
  pixels = np.random.RandomState(2).randn(1, 3, 32, 32).astype(np.float32)
  with torch.no_grad():
    ref_text = model.text_model(torch.tensor(ids)).last_hidden_state.numpy()
    ref_embeds = model.visual_projection(
        model.vision_model(torch.tensor(pixels)).pooler_output).numpy()
  ours_text = text.apply({'params': text_params}, jnp.asarray(ids)).last_hidden_state
  ours_embeds = vision.apply({'params': vision_params},
                             jnp.asarray(pixels.transpose(0, 2, 3, 1))).image_embeds
  errors = rel_err(ours_text, ref_text), rel_err(ours_embeds, ref_embeds)
  print('CLIPModel text / image_embeds rel errors', errors)
  assert max(errors) < 1e-5

  # A diffusers text_encoder/ (transformers 4.x): `text_model.` keys plus the position_ids
  # buffer; the generic loader reads it with no renaming.
  old = tmp_path / 'text_encoder'
  old.mkdir()
  state = {k: v for k, v in load_file(os.path.join(folder, 'model.safetensors')).items()
           if k.startswith('text_model.')}
  state['text_model.embeddings.position_ids'] = np.arange(16, dtype=np.int64)[None]
  save_file(state, str(old / 'model.safetensors'))
  with open(os.path.join(folder, 'config.json')) as f:
    (old / 'config.json').write_text(json.dumps(json.load(f)['text_config']))
  module, params, _ = load_flax_model(str(old), clip.text_from_config, ignore=[r'position_ids$'])
  jax.tree.map(np.testing.assert_array_equal, params, text_params)
  out = module.apply({'params': params}, jnp.asarray(ids)).last_hidden_state
  np.testing.assert_array_equal(out, ours_text)


def test_text_lora(tmp_path):
  module, params, _ = clip_folders.load_text_model(text_folder(tmp_path))
  ids = jnp.asarray(token_ids())
  target = 'text_model/encoder/layers_1/self_attn/q_proj'
  assert 'kernel' in params['text_model']['encoder']['layers_1']['self_attn']['q_proj']
  rng = np.random.RandomState(3)
  down = jnp.asarray(rng.randn(4, 32), jnp.float32)
  up = jnp.asarray(rng.randn(32, 4), jnp.float32)
  base = module.apply({'params': params}, ids)
  adapted = module.apply({'params': params}, ids, lora={target: {'down': down, 'up': up,
                                                                 'scale': 0.5}})
  zero = module.apply({'params': params}, ids, lora={target: {'down': down,
                                                              'up': jnp.zeros_like(up)}})
  # Layer 1's input is untouched, its output and everything after changes.
  for i in (0, 1):
    np.testing.assert_array_equal(adapted.hidden_states[i], base.hidden_states[i])
  assert np.abs(adapted.hidden_states[2] - base.hidden_states[2]).max() > 1e-2
  assert np.abs(adapted.pooler_output - base.pooler_output).max() > 1e-2
  jax.tree.map(np.testing.assert_array_equal, zero, base)
  # Per-sample factors: sample 1 gets zeros, so only sample 0 moves.
  batched = {target: {'down': jnp.stack([down, down]), 'up': jnp.stack([up, 0 * up])}}
  per_sample = module.apply({'params': params}, ids, lora=batched).last_hidden_state
  assert np.abs(per_sample[0] - base.last_hidden_state[0]).max() > 1e-2
  np.testing.assert_array_equal(per_sample[1], base.last_hidden_state[1])


def test_bad_checkpoints_and_configs(tmp_path):
  folder = text_folder(tmp_path)
  path = os.path.join(folder, 'model.safetensors')
  state = load_file(path)
  state['encoder.layers.0.self_attn.q_proj.weight'] = np.zeros((32, 31), np.float32)
  del state['encoder.layers.2.mlp.fc2.bias']
  save_file(state, path)
  with pytest.raises(CheckpointError) as e:
    clip_folders.load_text_model(folder)
  assert 'text_model.encoder.layers.0.self_attn.q_proj.weight' in str(e.value)
  assert 'text_model/encoder/layers_2/mlp/fc2/bias' in str(e.value)

  with pytest.raises(ValueError, match='relu'):
    clip.text_from_config({**TEXT, 'hidden_act': 'relu'})
  with pytest.raises(ValueError, match='silu'):
    clip.vision_from_config({'vision_config': {**VISION, 'hidden_act': 'silu'}})
  with pytest.raises(ValueError, match='multiple'):
    clip.text_from_config({**TEXT, 'num_attention_heads': 5})
  with pytest.raises(ValueError, match='clip_text_model'):
    clip.text_from_config({**VISION, 'model_type': 'clip_vision_model'})
  vision = clip.vision_from_config(VISION)
  params = jax.eval_shape(lambda: vision.init(jax.random.key(0), *vision.dummy_inputs()))
  with pytest.raises(ValueError, match='Image size'):
    jax.eval_shape(lambda p: vision.apply(p, jnp.zeros((1, 40, 40, 3))), params)


def write_tokenizer(folder):
  """A pipeline-style tokenizer/ folder: vocab.json, merges.txt, tokenizer_config.json."""
  vocab = ['l', 'o', 'w', 'e', 'r', 's', 't', 'i', 'd', 'n', 'lo', 'l</w>', 'w</w>', 'r</w>',
           't</w>', 'low</w>', 'er</w>', 'lowest</w>', 'newer</w>', 'wider', '<unk>',
           '<|startoftext|>', '<|endoftext|>']
  folder.mkdir()
  (folder / 'vocab.json').write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
  (folder / 'merges.txt').write_text('#version: 0.2\nl o\nlo w</w>\ne r</w>\n')
  (folder / 'tokenizer_config.json').write_text(json.dumps(
      {'model_max_length': 12, 'tokenizer_class': 'CLIPTokenizer'}))
  return str(folder)


def test_tokenizer(tmp_path):
  prompts = ['lower newer', 'Lower   NEWER ' * 4]
  pipeline_style = write_tokenizer(tmp_path / 'tokenizer')
  reference = transformers.CLIPTokenizer(vocab=os.path.join(pipeline_style, 'vocab.json'),
                                         merges=os.path.join(pipeline_style, 'merges.txt'))
  reference.save_pretrained(tmp_path / 'saved')
  expected = reference(prompts, padding='max_length', max_length=12, truncation=True,
                       return_tensors='np').input_ids
  # BOS, 'lo w er</w> n e w er</w>', EOS, then EOS as padding; the long prompt is cut to
  # keep its EOS.
  np.testing.assert_array_equal(expected[0], [21, 10, 2, 16, 9, 3, 2, 16, 22, 22, 22, 22])
  assert expected[1, -1] == 22
  for folder, max_length in ((pipeline_style, None), (str(tmp_path / 'saved'), 12)):
    ids = clip.tokenize(clip_folders.load_tokenizer(folder), prompts, max_length)
    assert ids.dtype == np.int32 and ids.shape == (2, 12)
    np.testing.assert_array_equal(ids, expected)
  one = clip.tokenize(clip_folders.load_tokenizer(pipeline_style), 'low lower', max_length=6)
  np.testing.assert_array_equal(one, [[21, 15, 10, 2, 16, 22]])


@pytest.mark.parametrize('shape', [(48, 64), (64, 40), (32, 32)])
def test_preprocess_matches_clip_image_processor(shape):
  processor = transformers.CLIPImageProcessor(size={'shortest_edge': 32},
                                              crop_size={'height': 32, 'width': 32})
  images = np.random.RandomState(4).randint(0, 256, (2,) + shape + (3,)).astype(np.uint8)
  ref = processor(images=list(images), return_tensors='np')['pixel_values'].transpose(0, 2, 3, 1)
  ours = np.asarray(clip.preprocess_images(images, 32))
  assert ours.shape == (2, 32, 32, 3)
  levels = np.abs(ours - ref) * np.asarray(clip.CLIP_STD) * 255  # in 8-bit steps
  print(shape, 'max |diff| in 8-bit levels', levels.max())
  assert levels.max() < 1.01
  # Float input skips the 8-bit rounding between passes: within two levels.
  floats = np.asarray(clip.preprocess_images(images[0] / 255.0, 32))
  assert np.abs(floats[0] - ours[0]).max() * 255 * max(clip.CLIP_STD) < 2
