"""The Flax AutoencoderKL against diffusers' PyTorch one, loaded from a saved folder."""
import functools
import json
import os

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from hyperlora_jax.convert import CheckpointError, load_flax_model
from hyperlora_jax.models import vae

pytestmark = pytest.mark.xdist_group('vae')  # one worker builds its fixtures

WEIGHTS = 'diffusion_pytorch_model.safetensors'
# SD1.x-like (quant convs, no shift) and SD3/Flux-like (no quant convs, shift, no mid attention).
CONFIGS = {
    'sd': dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
               scaling_factor=0.18215),
    'sd3': dict(block_out_channels=(32, 32, 64), layers_per_block=2, norm_num_groups=8,
                scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                use_post_quant_conv=False, mid_block_add_attention=False),
}


def _torch_vae(overrides):
  torch.manual_seed(0)
  n = len(overrides['block_out_channels'])
  model = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
      down_block_types=('DownEncoderBlock2D',) * n, up_block_types=('UpDecoderBlock2D',) * n,
      **overrides)
  # Default norms are (1, 0): perturb every tensor so a swapped scale/bias or a wrong
  # transpose cannot hide.
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


@pytest.fixture(scope='module', params=sorted(CONFIGS))
def saved(request, tmp_path_factory):
  """(torch model, folder holding its save_pretrained safetensors)."""
  model = _torch_vae(CONFIGS[request.param])
  folder = str(tmp_path_factory.mktemp(request.param))
  model.save_pretrained(folder, safe_serialization=True)
  return model, folder


@pytest.fixture(scope='module')
def images():
  return np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(t):
  return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def _errors(name, ours, ref):
  ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
  assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
  assert np.all(np.isfinite(ours)), name
  abs_err = float(np.max(np.abs(ours - ref)))
  rel_err = abs_err / float(np.max(np.abs(ref)))
  print(f'{name}: max abs {abs_err:.3g}, max rel {rel_err:.3g}')
  return rel_err


def _torch_outputs(model, images):
  with torch.no_grad():
    dist = model.encode(_nchw(images)).latent_dist
    mean, logvar = _nhwc(dist.mean), _nhwc(dist.logvar)
    decoded = _nhwc(model.decode(torch.from_numpy(np.transpose(mean, (0, 3, 1, 2)))).sample)
  return mean, logvar, decoded


@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-1)],
                         ids=['fp32', 'bf16'])
def test_matches_diffusers(saved, images, dtype, tol):
  model, folder = saved
  module, params, config = load_flax_model(folder, functools.partial(vae.from_config,
                                                                     dtype=dtype))
  assert module.shift_factor == config['shift_factor']
  mean, logvar, decoded = _torch_outputs(model, images)

  ours_mean, ours_logvar = module.apply({'params': params}, images, method='encode')
  assert ours_mean.dtype == dtype
  assert _errors('encode mean', ours_mean, mean) < tol
  assert _errors('encode logvar', ours_logvar, logvar) < tol
  assert _errors('decode', module.apply({'params': params}, mean, method='decode'),
                 decoded) < tol

  # The UNet sees (z - shift) * scale; decode_latents undoes it.
  shift, scale = model.config.shift_factor or 0.0, model.config.scaling_factor
  latents = vae.encode_latents(module, params, images)
  assert _errors('encode_latents', latents, (mean - shift) * scale) < tol
  assert _errors('decode_latents', vae.decode_latents(module, params, latents), decoded) < tol


def test_sampled_latents_follow_the_posterior(saved, images):
  model, folder = saved
  module, params, _ = load_flax_model(folder, vae.from_config)
  mean, logvar, _ = _torch_outputs(model, images)
  shift, scale = model.config.shift_factor or 0.0, model.config.scaling_factor
  key = jax.random.key(1)
  sample = np.asarray(vae.encode_latents(module, params, images, rng=key))
  np.testing.assert_array_equal(sample, vae.encode_latents(module, params, images, rng=key))
  noise = (sample / scale + shift - mean) / np.exp(0.5 * logvar)
  assert abs(noise.mean()) < 0.15 and abs(noise.std() - 1) < 0.15, (noise.mean(), noise.std())


def _copy_with(folder, dest, edit):
  """Copies the VAE folder to dest, applying edit(state) to its safetensors."""
  os.makedirs(dest)
  with open(os.path.join(folder, 'config.json')) as f:
    config = f.read()
  with open(os.path.join(dest, 'config.json'), 'w') as f:
    f.write(config)
  state = load_file(os.path.join(folder, WEIGHTS))
  edit(state)
  save_file(state, os.path.join(dest, WEIGHTS))
  return dest


def test_renamed_key_is_reported(saved, tmp_path):
  def rename(state):
    state['decoder.conv_inn.weight'] = state.pop('decoder.conv_in.weight')
  folder = _copy_with(saved[1], str(tmp_path / 'vae'), rename)
  with pytest.raises(CheckpointError) as error:
    load_flax_model(folder, vae.from_config)
  message = str(error.value)
  assert '1 missing' in message and 'decoder/conv_in/kernel' in message
  assert '1 unexpected' in message and 'decoder.conv_inn.weight' in message


def test_misshaped_tensor_is_reported(saved, tmp_path):
  def reshape(state):
    state['encoder.conv_out.bias'] = np.zeros(7, np.float32)
  folder = _copy_with(saved[1], str(tmp_path / 'vae'), reshape)
  with pytest.raises(CheckpointError, match=r'encoder\.conv_out\.bias: checkpoint \(7,\).*'
                                            r'model expects \(8,\)'):
    load_flax_model(folder, vae.from_config)


def test_pickle_only_folder_is_refused(tmp_path):
  folder = str(tmp_path / 'vae')
  _torch_vae(CONFIGS['sd']).save_pretrained(folder, safe_serialization=False)
  assert not any(n.endswith('.safetensors') for n in os.listdir(folder))
  with pytest.raises(CheckpointError, match='pickle'):
    load_flax_model(folder, vae.from_config)


def test_missing_folder_or_config(saved, tmp_path):
  with pytest.raises(FileNotFoundError):
    load_flax_model(str(tmp_path / 'nowhere'), vae.from_config)
  folder = tmp_path / 'no_config'
  folder.mkdir()
  os.link(os.path.join(saved[1], WEIGHTS), folder / WEIGHTS)
  with pytest.raises(FileNotFoundError, match='config.json'):
    load_flax_model(str(folder), vae.from_config)


@pytest.mark.parametrize('key,value,named', [
    ('down_block_types', ['DownEncoderBlock2D', 'AttnDownEncoderBlock2D'],
     'AttnDownEncoderBlock2D'),
    ('up_block_types', ['UpDecoderBlock2D', 'AttnUpDecoderBlock2D'], 'AttnUpDecoderBlock2D'),
    ('act_fn', 'gelu', 'gelu'),
    ('norm_type', 'spatial', 'norm_type'),
    ('latents_mean', [0.0] * 4, 'latents_mean'),
])
def test_unsupported_config_is_refused(saved, key, value, named):
  with open(os.path.join(saved[1], 'config.json')) as f:
    config = json.load(f)
  config[key] = value
  with pytest.raises(ValueError, match=named):
    vae.from_config(config)
