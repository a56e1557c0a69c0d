"""LoRA files and merged UNets, proven through diffusers' own loaders on a tiny random pipeline."""
import json
import os

import diffusers
import numpy as np
import pytest
import torch
import transformers
from diffusers.loaders import lora_conversion_utils
from diffusers.utils import state_dict_utils
from peft.utils import get_peft_model_state_dict
from safetensors.numpy import load_file, save_file

import jax

from hyperlora_jax import convert
from hyperlora_jax import lora as lora_lib
from hyperlora_jax.convert import core, lora_files, pipeline
from hyperlora_jax.models import unet
from tests.test_sdxl import SDXL_TINY
from tests.test_unet import SD1_TINY, _inputs, _ours, _peft_lora, _rel_err, _torch_unet

pytestmark = pytest.mark.xdist_group('lora_files')  # one worker builds its fixtures

TEXT_CONFIG = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                   num_hidden_layers=2, vocab_size=100, bos_token_id=0, eos_token_id=1,
                   pad_token_id=1)


def _random_lora(targets, rng, rank, scale):
  return {t.path: {'down': rng.randn(rank(t.path), t.d_in).astype(np.float32) * 0.3,
                   'up': rng.randn(t.d_out, rank(t.path)).astype(np.float32) * 0.3,
                   'scale': np.float32(scale(t.path))} for t in targets}


@pytest.fixture(scope='module')
def base(tmp_path_factory):
  """A tiny UNet (torch folder + our params), a text encoder, a LoRA and our UNet outputs."""
  folder = str(tmp_path_factory.mktemp('unet'))
  _torch_unet(SD1_TINY).save_pretrained(folder)
  module, params, config = convert.load_flax_model(folder, unet.from_config)
  torch.manual_seed(1)
  text_state = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT_CONFIG)).state_dict()
  rng = np.random.RandomState(0)
  # Mixed ranks and scales: kohya's single alpha must still give every layer its own scale.
  unet_lora = _random_lora(
      lora_lib.find_targets(params, 'cross_attn,self_attn'), rng,
      rank=lambda p: 4 if 'attn2' in p else 2,
      scale=lambda p: 1.5 if p.endswith('attn2/to_k') else 0.7)
  text_targets = [lora_lib.Target(f'text_model/encoder/layers_{i}/self_attn/{n}', 32, 32)
                  for i in range(2) for n in ('q_proj', 'k_proj', 'v_proj', 'out_proj')]
  text_lora = _random_lora(text_targets, rng, rank=lambda p: 2, scale=lambda p: 0.6)
  x, t, c = _inputs()
  return dict(folder=folder, params=params, config=config,
              text_state=text_state, unet_lora=unet_lora, text_lora=text_lora,
              lora={**unet_lora, **text_lora}, inputs=(x, t, c),
              ours=_ours(module, params, x, t, c, unet_lora),
              ours_base=_ours(module, params, x, t, c))


def _text_encoder(state):
  model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT_CONFIG)).eval()
  model.load_state_dict(state)
  return model


def _pipe(base):
  vae = diffusers.AutoencoderKL(
      block_out_channels=[8], norm_num_groups=8, layers_per_block=1, latent_channels=4,
      down_block_types=['DownEncoderBlock2D'], up_block_types=['UpDecoderBlock2D'])
  # load_lora_weights never tokenizes, so the pipeline needs no tokenizer files.
  return diffusers.StableDiffusionPipeline(
      unet=diffusers.UNet2DConditionModel.from_pretrained(base['folder']).eval(), vae=vae,
      text_encoder=_text_encoder(base['text_state']), tokenizer=None,
      scheduler=diffusers.DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None,
      feature_extractor=None, requires_safety_checker=False)


def _unet_out(model, inputs):
  x, t, c = inputs
  with torch.no_grad():
    return model(torch.tensor(x), torch.tensor(t), torch.tensor(c)).sample.numpy()


def _text_out(model):
  ids = torch.tensor(np.random.RandomState(0).randint(2, 100, size=(2, 7)))
  with torch.no_grad():
    return model(ids).last_hidden_state.numpy()


def _text_reference(base):
  """Our text LoRA merged by hand into the torch text encoder's weights."""
  state = {k: v.clone() for k, v in base['text_state'].items()}
  for path, f in base['text_lora'].items():
    key = core.flax_path_to_torch_key(path.split('/')).removeprefix('text_model.') + '.weight'
    state[key] += torch.tensor(f['scale'] * f['up'] @ f['down'])
  return _text_out(_text_encoder(state))


def _delta(f):
  return np.asarray(f['scale'], np.float64) * (np.asarray(f['up'], np.float64)
                                               @ np.asarray(f['down'], np.float64))


def _check_pipe_matches(base, pipe, name):
  err = _rel_err(_unet_out(pipe.unet, base['inputs']), base['ours'])
  text_err = _rel_err(_text_out(pipe.text_encoder), _text_reference(base))
  print(f'{name}: UNet max rel err {err:.2e}, text encoder {text_err:.2e}')
  assert _rel_err(base['ours_base'], base['ours']) > 1e-2  # the LoRA really matters
  assert err < 1e-4 and text_err < 1e-4


def test_diffusers_file_loads_with_load_lora_weights(base, tmp_path):
  path = str(tmp_path / 'lora.safetensors')
  lora_files.save_diffusers_lora(base['lora'], path, metadata={'source': 'test'})
  pipe = _pipe(base)
  pipe.load_lora_weights(path)
  # Every layer of ours became a peft LoRA layer holding our down factor.
  state = pipe.unet.state_dict()
  for p, f in base['unet_lora'].items():
    key = core.flax_path_to_torch_key(p.split('/')) + '.lora_A.default_0.weight'
    np.testing.assert_array_equal(state[key].numpy(), f['down'])
  assert sum(k.endswith('lora_A.default_0.weight') for k in state) == len(base['unet_lora'])
  _check_pipe_matches(base, pipe, 'diffusers file')


def test_kohya_keys_are_what_diffusers_converter_maps(base, tmp_path):
  path = str(tmp_path / 'kohya.safetensors')
  lora_files.save_kohya_lora(base['lora'], path)
  state = load_file(path)
  converted, alphas = lora_conversion_utils._convert_non_diffusers_lora_to_diffusers(
      {k: torch.tensor(v) for k, v in state.items()})
  assert len(set(alphas.values())) == 1  # one alpha: see save_kohya_lora
  unet_part = state_dict_utils.convert_unet_state_dict_to_peft(
      {k.removeprefix('unet.'): v for k, v in converted.items() if k.startswith('unet.')})
  torch_unet = diffusers.UNet2DConditionModel.from_pretrained(base['folder'])
  expected = {core.flax_path_to_torch_key(p.split('/')): f for p, f in base['unet_lora'].items()}
  modules = {k.split('.lora_')[0] for k in unet_part}
  assert modules == set(expected)
  for name, f in expected.items():
    layer = torch_unet.get_submodule(name)
    assert isinstance(layer, torch.nn.Linear)
    assert unet_part[name + '.lora_A.weight'].shape == (f['down'].shape[0], layer.in_features)
    assert unet_part[name + '.lora_B.weight'].shape == (layer.out_features, f['down'].shape[0])
  assert all(k.startswith(('lora_unet_down_blocks_', 'lora_unet_mid_block_',
                           'lora_unet_up_blocks_', 'lora_te_text_model_encoder_layers_'))
             for k in state)
  assert sum(k.startswith('lora_te_') for k in state) == 3 * len(base['text_lora'])


def test_kohya_file_loads_with_load_lora_weights(base, tmp_path):
  path = str(tmp_path / 'kohya.safetensors')
  lora_files.save_kohya_lora(base['lora'], path)
  pipe = _pipe(base)
  pipe.load_lora_weights(path)
  _check_pipe_matches(base, pipe, 'kohya file')


def test_merged_unet_folder_loads_and_matches(base, tmp_path):
  folder = str(tmp_path / 'unet')
  lora_files.save_merged_unet(base['params'], base['config'], base['unet_lora'], folder)
  model, info = diffusers.UNet2DConditionModel.from_pretrained(folder, output_loading_info=True)
  assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys'))
  with open(os.path.join(folder, 'config.json')) as f:
    assert json.load(f) == base['config']
  err = _rel_err(_unet_out(model.eval(), base['inputs']), base['ours'])
  print(f'merged UNet max rel err {err:.2e}')
  assert err < 1e-4


@pytest.mark.parametrize('save', [lora_files.save_diffusers_lora, lora_files.save_kohya_lora])
def test_load_lora_file_round_trip(base, tmp_path, save):
  path = str(tmp_path / 'lora.safetensors')
  save(base['lora'], path)
  loaded = lora_files.load_lora_file(path)
  assert set(loaded) == set(base['lora'])
  for p, f in base['lora'].items():
    np.testing.assert_array_equal(loaded[p]['down'], f['down'])
    np.testing.assert_allclose(_delta(loaded[p]), _delta(f), rtol=1e-6, atol=1e-7)


def test_load_files_made_by_diffusers_and_kohya(base, tmp_path):
  # A peft LoRA with alpha != r, saved by diffusers with its LoraConfig in the header, and
  # as a peft save_pretrained folder (base_model.model.* keys, adapter_config.json).
  model = diffusers.UNet2DConditionModel.from_pretrained(base['folder'])
  reference = _peft_lora(model, rank=4, alpha=8)
  peft_state = get_peft_model_state_dict(model)
  diffusers.StableDiffusionPipeline.save_lora_weights(
      str(tmp_path), unet_lora_layers=peft_state,
      unet_lora_adapter_metadata=model.peft_config['default'].to_dict())
  peft_folder = tmp_path / 'peft'
  model.peft_config['default'].save_pretrained(str(peft_folder))
  save_file({'base_model.model.' + k: v.numpy() for k, v in peft_state.items()},
            str(peft_folder / 'adapter_model.safetensors'))
  for path in (tmp_path / 'pytorch_lora_weights.safetensors',
               peft_folder / 'adapter_model.safetensors'):
    loaded = lora_files.load_lora_file(str(path))
    assert set(loaded) == set(reference)
    for p, f in reference.items():
      assert loaded[p]['scale'] == 2.0
      np.testing.assert_allclose(_delta(loaded[p]), _delta(f), rtol=1e-6, atol=1e-7)
  # kohya's SD 1.x files hold 1x1-conv factors for proj_in and may omit alpha (= rank).
  rng = np.random.RandomState(0)
  down, up = rng.randn(2, 32, 1, 1), rng.randn(32, 2, 1, 1)
  name = 'lora_unet_down_blocks_0_attentions_0_proj_in'
  save_file({name + '.lora_down.weight': down.astype(np.float32),
             name + '.lora_up.weight': up.astype(np.float32)}, str(tmp_path / 'k.safetensors'))
  (path, f), = lora_files.load_lora_file(str(tmp_path / 'k.safetensors')).items()
  assert path == 'down_blocks_0/attentions_0/proj_in' and f['scale'] == 1.0
  np.testing.assert_allclose(_delta(f), up[..., 0, 0] @ down[..., 0, 0], rtol=1e-6, atol=1e-6)


def test_select_sample_and_per_sample_refused(base, tmp_path):
  rng = np.random.RandomState(2)
  p = 'mid_block/attentions_0/transformer_blocks_0/attn2/to_v'
  per_sample = {p: {'down': rng.randn(3, 2, 64), 'up': rng.randn(3, 64, 2),
                    'scale': np.array([0.5, 1.0, 2.0])}}
  one = lora_files.select_sample(per_sample, 2)
  np.testing.assert_array_equal(one[p]['up'], per_sample[p]['up'][2])
  assert one[p]['scale'] == 2.0 and one[p]['down'].shape == (2, 64)
  with pytest.raises(IndexError, match='batch 3'):
    lora_files.select_sample(per_sample, 3)
  with pytest.raises(ValueError, match='not per-sample'):
    lora_files.select_sample(one, 0)
  for save in (lora_files.save_diffusers_lora, lora_files.save_kohya_lora):
    with pytest.raises(ValueError, match=r'Per-sample LoRA at mid_block.*select_sample'):
      save(per_sample, str(tmp_path / 'x.safetensors'))
  with pytest.raises(ValueError, match='Per-sample'):
    lora_files.save_merged_unet(base['params'], base['config'], per_sample, str(tmp_path / 'u'))


def test_bad_inputs_give_clear_errors(base, tmp_path):
  f = {'down': np.ones((2, 32), np.float32), 'up': np.ones((32, 2), np.float32), 'scale': 1.0}
  for bad in ('down_blocks_0/resnets_0/conv1', 'down_blocks_0/attentions_0/norm'):
    with pytest.raises(ValueError, match=f"'{bad}' is not a Dense layer"):
      lora_files.save_kohya_lora({bad: f}, str(tmp_path / 'x.safetensors'))
  with pytest.raises(ValueError, match=r'down \[r, d_in\], up \[d_out, r\]'):
    lora_files.save_diffusers_lora(
        {'mid_block/attentions_0/transformer_blocks_0/attn1/to_q': dict(f, up=f['down'])},
        str(tmp_path / 'x.safetensors'))
  with pytest.raises(ValueError, match='Text-tower LoRA layers cannot be merged'):
    lora_files.save_merged_unet(base['params'], base['config'], base['lora'], str(tmp_path / 'u'))
  # A UNet weights file is not a LoRA file: the error names keys it saw.
  weights = os.path.join(base['folder'], 'diffusion_pytorch_model.safetensors')
  with pytest.raises(ValueError, match=r'not a diffusers/peft .* or kohya .*conv_in\.bias'):
    lora_files.load_lora_file(weights)
  save_file({'lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight': np.ones((2, 32, 3, 3)),
             'lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight': np.ones((32, 2, 1, 1))},
            str(tmp_path / 'locon.safetensors'))
  with pytest.raises(ValueError, match=r'resnets_0_conv1\.lora_down\.weight has shape \(2, 32, 3'):
    lora_files.load_lora_file(str(tmp_path / 'locon.safetensors'))


# ---------------------------------------------------------------- ComfyUI's key map
# ComfyUI's rules, re-stated from its source (comfy/utils.py unet_to_diffusers,
# comfy/lora.py model_lora_keys_unet / model_lora_keys_clip / load_lora, and
# comfy/weight_adapter/lora.py), for the Dense layers a LoRA file can hold.
_COMFY_TRANSFORMER = ('attn1.to_q', 'attn1.to_k', 'attn1.to_v', 'attn1.to_out.0', 'attn2.to_q',
                      'attn2.to_k', 'attn2.to_v', 'attn2.to_out.0', 'ff.net.0.proj', 'ff.net.2')
_COMFY_BASIC = {'time_embedding.linear_1': 'time_embed.0',
                'time_embedding.linear_2': 'time_embed.2',
                'add_embedding.linear_1': 'label_emb.0.0',
                'add_embedding.linear_2': 'label_emb.0.2'}
_COMFY_CLIP = {'mlp.fc1': 'mlp_fc1', 'mlp.fc2': 'mlp_fc2', 'self_attn.k_proj': 'self_attn_k_proj',
               'self_attn.q_proj': 'self_attn_q_proj', 'self_attn.v_proj': 'self_attn_v_proj',
               'self_attn.out_proj': 'self_attn_out_proj'}


def _comfy_unet_config(config):
  """ComfyUI's own description of a diffusers UNet config (its model detection)."""
  n, per_block = len(config['block_out_channels']), lambda v: v if isinstance(v, (list, tuple)) \
      else [v] * len(config['block_out_channels'])
  res, depth = per_block(config['layers_per_block']), per_block(
      config.get('transformer_layers_per_block', 1))
  down = [depth[x] if config['down_block_types'][x].startswith('CrossAttn') else 0
          for x in range(n)]
  up = [depth[n - 1 - x] if config['up_block_types'][x].startswith('CrossAttn') else 0
        for x in range(n)]
  return dict(num_res_blocks=res, transformer_depth_middle=depth[-1],
              transformer_depth=[down[x] for x in range(n) for _ in range(res[x])],
              # popped from the end, block by block of the up path
              transformer_depth_output=[up[x] for x in range(n)
                                        for _ in range(res[n - 1 - x] + 1)][::-1])


def _comfy_unet_to_diffusers(cc):
  """unet_to_diffusers, for Dense weights: diffusers weight key -> LDM weight key."""
  res, depth, depth_out = cc['num_res_blocks'], list(cc['transformer_depth']), \
      list(cc['transformer_depth_output'])
  out = {}
  def transformer(diffusers, ldm, layers):
    for b in ('proj_in', 'proj_out'):
      out[f'{diffusers}.{b}.weight'] = f'{ldm}.{b}.weight'
    for t in range(layers):
      for b in _COMFY_TRANSFORMER:
        out[f'{diffusers}.transformer_blocks.{t}.{b}.weight'] = (
            f'{ldm}.transformer_blocks.{t}.{b}.weight')
  for x in range(len(res)):
    n = 1 + (res[x] + 1) * x
    for i in range(res[x]):
      out[f'down_blocks.{x}.resnets.{i}.time_emb_proj.weight'] = (
          f'input_blocks.{n}.0.emb_layers.1.weight')
      layers = depth.pop(0)
      if layers:
        transformer(f'down_blocks.{x}.attentions.{i}', f'input_blocks.{n}.1', layers)
      n += 1
  transformer('mid_block.attentions.0', 'middle_block.1', cc['transformer_depth_middle'])
  for i, n in enumerate([0, 2]):
    out[f'mid_block.resnets.{i}.time_emb_proj.weight'] = f'middle_block.{n}.emb_layers.1.weight'
  res = list(reversed(res))
  for x in range(len(res)):
    n = (res[x] + 1) * x
    for i in range(res[x] + 1):
      out[f'up_blocks.{x}.resnets.{i}.time_emb_proj.weight'] = (
          f'output_blocks.{n}.0.emb_layers.1.weight')
      layers = depth_out.pop()
      if layers:
        transformer(f'up_blocks.{x}.attentions.{i}', f'output_blocks.{n}.1', layers)
      n += 1
  out.update({f'{d}.weight': f'{ldm}.weight' for d, ldm in _COMFY_BASIC.items()})
  return out


def _comfy_key_map(config, text_layers, sdxl):
  """LoRA module name -> model weight key, as ComfyUI builds it for the model."""
  key_map = {}
  for name, ldm in _comfy_unet_to_diffusers(_comfy_unet_config(config)).items():
    target = 'diffusion_model.' + ldm
    key_map['lora_unet_' + ldm[:-len('.weight')].replace('.', '_')] = target
    key_map['lora_unet_' + name[:-len('.weight')].replace('.', '_')] = target
    for prefix in ('', 'unet.'):  # the old diffusers form: attn1.processor.to_q
      old = prefix + name[:-len('.weight')].replace('.to_', '.processor.to_')
      key_map[old[:-2] if old.endswith('.to_out.0') else old] = target
  towers = (('clip_l', ('lora_te_', 'lora_te1_'), 'text_encoder'),) + (
      (('clip_g', ('lora_te2_',), 'text_encoder_2'),) if sdxl else ())
  for tower, kohya, diffusers_prefix in towers:
    for b in range(text_layers):
      for c, name in _COMFY_CLIP.items():
        target = f'{tower}.transformer.text_model.encoder.layers.{b}.{c}.weight'
        for prefix in kohya:
          key_map[f'{prefix}text_model_encoder_layers_{b}_{name}'] = target
        key_map[f'{diffusers_prefix}.text_model.encoder.layers.{b}.{c}'] = target
  return key_map


def _comfy_patches(state, key_map):
  """load_lora + calculate_weight at strength 1: target -> weight delta [out, in], and the
  file's keys ComfyUI would leave unloaded."""
  patches, loaded = {}, set()
  for x, target in key_map.items():
    for up, down in (('lora_up.weight', 'lora_down.weight'), ('lora_B.weight', 'lora_A.weight')):
      if f'{x}.{up}' in state:
        d = state[f'{x}.{down}']
        alpha = state.get(f'{x}.alpha')  # kohya's alpha / r, else 1
        scale = 1.0 if alpha is None else float(alpha) / d.shape[0]
        patches[target] = scale * state[f'{x}.{up}'].astype(np.float64) @ d
        loaded |= {f'{x}.{up}', f'{x}.{down}'} | ({f'{x}.alpha'} if alpha is not None else set())
        break
  return patches, set(state) - loaded


def _comfy_target(path, config):
  """The ComfyUI weight a LoRA path of ours should patch."""
  module = core.flax_path_to_torch_key(path.removeprefix(pipeline.TEXT2_PREFIX).split('/'))
  if path.startswith(pipeline.TEXT2_PREFIX):
    return f'clip_g.transformer.{module}.weight'
  if path.startswith('text_model/'):
    return f'clip_l.transformer.{module}.weight'
  diffusers = _comfy_unet_to_diffusers(_comfy_unet_config(config))
  return 'diffusion_model.' + diffusers[module + '.weight']


def _sdxl_lora(rng):
  module = unet.from_config(SDXL_TINY)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *module.dummy_inputs()))
  targets = lora_lib.find_targets(shapes['params'], r'attn[12]/|ff/|proj_(in|out)$|'
                                  r'time_emb_proj$|(time|add)_embedding/')
  text = [lora_lib.Target(f'{prefix}text_model/encoder/layers_{i}/{n}', 32,
                          64 if n == 'mlp/fc1' else 32)
          for prefix in ('', pipeline.TEXT2_PREFIX) for i in range(2)
          for n in ('self_attn/q_proj', 'self_attn/k_proj', 'self_attn/v_proj',
                    'self_attn/out_proj', 'mlp/fc1')]
  return _random_lora(list(targets) + text, rng, rank=lambda p: 4 if 'attn2' in p else 2,
                      scale=lambda p: 1.5 if p.endswith('to_k') else 0.7)


@pytest.mark.parametrize('model', ['sd15', 'sdxl'])
def test_every_kohya_key_maps_in_comfyui(base, tmp_path, model):
  """Every module of our kohya file is one ComfyUI's key map knows, patches the weight of
  the same layer and at our scale (alpha / r); ComfyUI leaves no key of it unloaded."""
  if model == 'sd15':
    config, lora, text_layers = base['config'], base['lora'], TEXT_CONFIG['num_hidden_layers']
  else:
    config, lora, text_layers = SDXL_TINY, _sdxl_lora(np.random.RandomState(3)), 2
  path = str(tmp_path / 'kohya.safetensors')
  lora_files.save_kohya_lora(lora, path, unet_config=config)
  state = load_file(path)
  unet_names = {k.split('.')[0] for k in state if k.startswith('lora_unet_')}
  # sd-scripts' names: diffusers' for SD 1.x, LDM for SDXL (both map in ComfyUI).
  ldm = any(n.startswith('lora_unet_input_blocks_') for n in unet_names)
  assert ldm == (model == 'sdxl') and unet_names
  patches, unloaded = _comfy_patches(state, _comfy_key_map(config, text_layers, model == 'sdxl'))
  print(f'{model}: ComfyUI maps {len(patches)} of {len(lora)} modules')
  assert not unloaded and len(patches) == len(lora)
  for p, f in lora.items():
    np.testing.assert_allclose(patches[_comfy_target(p, config)], _delta(f), rtol=1e-5, atol=1e-6)


def test_comfyui_reads_only_non_attention_unet_layers_of_diffusers_files(base, tmp_path):
  """What the module docstring says of diffusers-format files in ComfyUI: the UNet's
  attention projections do not map (it expects ...attn1.processor.to_q), other UNet
  layers and the text tower do."""
  ff = 'down_blocks_0/attentions_0/transformer_blocks_0/ff/net_2'
  lora = dict(base['lora'], **_random_lora([lora_lib.Target(ff, 128, 32)], np.random.RandomState(4),
                                           rank=lambda p: 2, scale=lambda p: 1.0))
  path = str(tmp_path / 'diffusers.safetensors')
  lora_files.save_diffusers_lora(lora, path)
  patches, _ = _comfy_patches(load_file(path), _comfy_key_map(base['config'], 2, False))
  mapped = {p for p in lora if _comfy_target(p, base['config']) in patches}
  assert mapped == set(base['text_lora']) | {ff}, sorted(set(lora) - mapped)[:3]
