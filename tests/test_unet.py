"""UNet parity against diffusers' own PyTorch UNet2DConditionModel (random tiny configs)."""
import json
import os

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from safetensors.numpy import load_file, save_file

from hyperlora_jax import convert
from hyperlora_jax.convert import core
from hyperlora_jax.models import unet

pytestmark = pytest.mark.xdist_group('unet')  # one worker builds its fixtures

SD1_TINY = dict(
    sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
    cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)
# SD2.x style: linear projections, per-block head counts, upcast attention, 2 layers.
SD2_TINY = dict(SD1_TINY, use_linear_projection=True, attention_head_dim=(2, 4, 4),
                upcast_attention=True, transformer_layers_per_block=(1, 2, 2),
                layers_per_block=2)
LORA_TARGETS = ['to_q', 'to_k', 'to_v', 'to_out.0']


def _torch_unet(config, seed=0):
  torch.manual_seed(seed)
  model = diffusers.UNet2DConditionModel(**config).eval()
  with torch.no_grad():  # default init zeroes some layers; make every weight matter
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return model


def _inputs(batch=2, size=16, cross=32, seed=0):
  rng = np.random.RandomState(seed)
  x = rng.randn(batch, 4, size, size).astype(np.float32)
  t = rng.randint(0, 1000, size=batch)
  c = rng.randn(batch, 7, cross).astype(np.float32)
  return x, t, c


def _ours(module, params, x, t, c, lora=None):
  fn = jax.jit(lambda p, x, t, c, tree: module.apply({'params': p}, x, t, c, lora=tree))
  out = fn(params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(c), lora)
  return np.asarray(out, np.float32).transpose(0, 3, 1, 2)


def _rel_err(a, b):
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope='module')
def sd1(tmp_path_factory):
  model = _torch_unet(SD1_TINY)
  folder = str(tmp_path_factory.mktemp('unet'))
  model.save_pretrained(folder)
  module, params, _ = convert.load_flax_model(folder, unet.from_config)
  return model, folder, module, params


@pytest.mark.parametrize('config_name', ['sd1', 'sd2'])
def test_matches_diffusers_fp32(config_name, sd1, tmp_path):
  if config_name == 'sd1':
    model, _, module, params = sd1
  else:
    model = _torch_unet(SD2_TINY)
    model.save_pretrained(str(tmp_path))
    module, params, _ = convert.load_flax_model(str(tmp_path), unet.from_config)
  x, t, c = _inputs()
  with torch.no_grad():
    ref = model(torch.tensor(x), torch.tensor(t), torch.tensor(c)).sample.numpy()
  err = _rel_err(_ours(module, params, x, t, c), ref)
  print(f'{config_name} fp32 max rel err {err:.2e}')
  assert err < 2e-5


def test_bf16_compute_with_fp32_params(sd1):
  model, folder, _, params = sd1
  with open(os.path.join(folder, 'config.json')) as f:
    module = unet.from_config(json.load(f), dtype=jnp.bfloat16)
  x, t, c = _inputs()
  with torch.no_grad():
    ref = model(torch.tensor(x), torch.tensor(t), torch.tensor(c)).sample.numpy()
  out = _ours(module, params, x, t, c)
  assert jax.tree.leaves(params)[0].dtype == jnp.float32
  err = _rel_err(out, ref)
  print(f'bf16 max rel err {err:.2e}')
  assert np.isfinite(out).all() and err < 5e-2


def _peft_lora(model, rank=4, alpha=8):
  """Adds a random, non-zero peft LoRA and returns it as our shared LoRA tree."""
  model.add_adapter(peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS,
                                    init_lora_weights=False))
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  tree = {}
  for key, value in state.items():
    if '.lora_A.' in key:
      path = '/'.join(core.torch_key_to_flax_path(key.split('.lora_A.')[0]))
      tree[path] = {'down': value,
                    'up': state[key.replace('.lora_A.', '.lora_B.')],
                    'scale': alpha / rank}
  return tree


def test_peft_lora_matches(sd1):
  _, folder, module, params = sd1
  model = diffusers.UNet2DConditionModel.from_pretrained(folder).eval()
  lora = _peft_lora(model)
  assert len(lora) == 4 * 2 * 7  # q,k,v,out x self/cross x 7 transformer blocks
  x, t, c = _inputs()
  with torch.no_grad():
    ref = model(torch.tensor(x), torch.tensor(t), torch.tensor(c)).sample.numpy()
  base = _ours(module, params, x, t, c)
  assert _rel_err(base, ref) > 1e-3  # the LoRA really changes the output
  err = _rel_err(_ours(module, params, x, t, c, lora), ref)
  print(f'peft LoRA max rel err {err:.2e}')
  assert err < 2e-5


def test_per_sample_lora_equals_each_sample_alone(sd1):
  _, _, module, params = sd1
  x, t, c = _inputs(batch=3)
  rng = np.random.RandomState(3)
  paths = ['down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_q',
           'up_blocks_2/attentions_1/transformer_blocks_0/attn1/to_out_0',
           'mid_block/attentions_0/transformer_blocks_0/attn1/to_v']
  dims = {p: (32 if 'down_blocks_0' in p or 'up_blocks_2' in p else 64) for p in paths}
  per_sample = {p: {'down': rng.randn(3, 2, dims[p]).astype(np.float32) * 0.3,
                    'up': rng.randn(3, dims[p], 2).astype(np.float32) * 0.3,
                    'scale': np.array([1.0, 0.5, 2.0], np.float32)} for p in paths}
  together = _ours(module, params, x, t, c, per_sample)
  for i in range(3):
    alone = {p: {'down': f['down'][i], 'up': f['up'][i], 'scale': f['scale'][i]}
             for p, f in per_sample.items()}
    single = _ours(module, params, x[i:i + 1], t[i:i + 1], c[i:i + 1], alone)
    np.testing.assert_allclose(together[i:i + 1], single, rtol=1e-5, atol=1e-5)
  assert np.abs(together[0] - together[1]).max() > 1e-3


def test_zero_lora_is_exactly_the_base_model(sd1):
  _, _, module, params = sd1
  x, t, c = _inputs()
  path = 'down_blocks_1/attentions_0/transformer_blocks_0/attn2/to_k'
  lora = {path: {'down': np.ones((2, 4, 32), np.float32), 'up': np.ones((2, 64, 4), np.float32),
                 'scale': np.zeros((2,), np.float32)}}
  np.testing.assert_array_equal(_ours(module, params, x, t, c, lora),
                                _ours(module, params, x, t, c))


def _rewrite_weights(folder, edit):
  path = os.path.join(folder, 'diffusion_pytorch_model.safetensors')
  state = load_file(path)
  edit(state)
  save_file(state, path)


def test_renamed_key_is_named_in_error(sd1, tmp_path):
  model, _, _, _ = sd1
  model.save_pretrained(str(tmp_path))
  key = 'mid_block.attentions.0.proj_in.weight'
  _rewrite_weights(str(tmp_path),
                   lambda s: s.update({'mid_block.attentions.0.proj_inn.weight': s.pop(key)}))
  with pytest.raises(convert.CheckpointError, match=r'(?s)missing.*mid_block/attentions_0/'
                     r'proj_in/kernel.*unexpected.*proj_inn'):
    convert.load_flax_model(str(tmp_path), unet.from_config)


def test_misshaped_key_names_both_shapes(sd1, tmp_path):
  model, _, _, _ = sd1
  model.save_pretrained(str(tmp_path))
  key = 'conv_in.weight'
  _rewrite_weights(str(tmp_path),
                   lambda s: s.update({key: np.zeros((32, 4, 5, 5), np.float32)}))
  with pytest.raises(convert.CheckpointError, match=r'conv_in.weight: checkpoint '
                     r'\(32, 4, 5, 5\).*expects \(3, 3, 4, 32\)'):
    convert.load_flax_model(str(tmp_path), unet.from_config)


def test_missing_folder_and_pickle_refused(sd1, tmp_path):
  model, _, _, _ = sd1
  with pytest.raises(FileNotFoundError, match='config.json'):
    convert.load_flax_model(str(tmp_path / 'nowhere'), unet.from_config)
  model.save_pretrained(str(tmp_path), safe_serialization=False)
  with pytest.raises(convert.CheckpointError, match='pickle'):
    convert.load_flax_model(str(tmp_path), unet.from_config)
  module, params, _ = convert.load_flax_model(str(tmp_path), unet.from_config, allow_pickle=True)
  assert params['conv_in']['kernel'].shape == (3, 3, 4, 32)


def test_unsupported_config_is_refused():
  with pytest.raises(ValueError, match='class_embed_type'):
    unet.from_config(dict(SD1_TINY, class_embed_type='timestep'))
  with pytest.raises(ValueError, match='Unknown UNet config keys.*bogus'):
    unet.from_config(dict(SD1_TINY, bogus=1))


def test_init_variables_is_jit_init_and_restores_the_threefry_setting():
  """models.init_variables draws what jit(module.init) draws (on a GPU the same threefry
  bits through one kernel: benchmarks/init_benchmark.py) and leaves the setting as it was,
  after a failed init too."""
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from hyperlora_jax.models import init_variables  # pylint: disable=g-import-not-at-top
  module, x = nn.Dense(5), jnp.ones((2, 3))
  ours = init_variables(module, jax.random.key(3), x)
  plain = jax.jit(module.init)(jax.random.key(3), x)
  jax.tree.map(np.testing.assert_array_equal, ours, plain)
  assert not jax.config.jax_threefry_gpu_kernel_lowering
  with pytest.raises(TypeError):
    init_variables(module, jax.random.key(3), x, x, x)
  assert not jax.config.jax_threefry_gpu_kernel_lowering
