"""ControlNet parity against diffusers' ControlNetModel and UNet2DConditionModel (tiny, fp32)."""
import json
import os
import shutil

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from hyperlora_jax import convert
from hyperlora_jax.convert import controlnet_folders, core, pipeline
from hyperlora_jax.models import controlnet, unet
from tests.test_unet import SD1_TINY, _inputs, _peft_lora, _rel_err, _torch_unet

pytestmark = pytest.mark.xdist_group('controlnet')  # one worker builds its fixtures

CONTROL_TINY = dict(  # the UNet's encoder; the condition image at 2x the latent size
    {k: v for k, v in SD1_TINY.items() if k not in ('sample_size', 'up_block_types')},
    conditioning_embedding_out_channels=(8, 16))
nchw = lambda a: np.asarray(a, np.float32).transpose(0, 3, 1, 2)
nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))


def _torch_controlnet(config, seed=1):
  torch.manual_seed(seed)
  model = diffusers.ControlNetModel(**config).eval()
  with torch.no_grad():  # the zero convs start at zero; make every weight matter
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return model


@pytest.fixture(scope='module')
def models(tmp_path_factory):
  unet_folder, control_folder = (str(tmp_path_factory.mktemp(n)) for n in ('unet', 'controlnet'))
  torch_unet = _torch_unet(SD1_TINY)
  torch_unet.save_pretrained(unet_folder)
  torch_control = _torch_controlnet(CONTROL_TINY)
  torch_control.save_pretrained(control_folder)
  unet_module, unet_params, unet_config = convert.load_flax_model(unet_folder, unet.from_config)
  control, control_params, _ = controlnet_folders.load_controlnet(control_folder, unet_module)
  rng = np.random.RandomState(5)
  x, t, c = _inputs()
  cond = rng.rand(2, 3, 32, 32).astype(np.float32)  # [0, 1] like diffusers' control images

  @jax.jit
  def step(unet_params, control_params, x, t, c, cond, scale, lora):
    """One ControlNet-guided UNet call, as a sampler would make it."""
    down, mid = control.apply({'params': control_params}, x, t, c, cond, conditioning_scale=scale)
    return unet_module.apply({'params': unet_params}, x, t, c, lora=lora,
                             down_block_additional_residuals=down,
                             mid_block_additional_residual=mid)

  return dict(torch_unet=torch_unet, torch_control=torch_control, unet_folder=unet_folder,
              control_folder=control_folder, unet=unet_module, unet_params=unet_params,
              unet_config=unet_config, control=control, control_params=control_params,
              inputs=(x, t, c, cond), step=step)


def _torch_residuals(model, x, t, c, cond, scale):
  with torch.no_grad():
    down, mid = model(torch.tensor(x), torch.tensor(t), torch.tensor(c), torch.tensor(cond),
                      conditioning_scale=scale, return_dict=False)
  return down, mid


@pytest.mark.parametrize('variant', ['rgb', 'bgr_global_pool'])
def test_residuals_match_diffusers(models, variant):
  x, t, c, cond = models['inputs']
  torch_control, control = models['torch_control'], models['control']
  if variant != 'rgb':
    overrides = dict(controlnet_conditioning_channel_order='bgr', global_pool_conditions=True)
    torch_control = diffusers.ControlNetModel.from_pretrained(models['control_folder'], **overrides)
    with open(os.path.join(models['control_folder'], 'config.json')) as f:
      control = controlnet.from_config(dict(json.load(f), **overrides))
  ref_down, ref_mid = _torch_residuals(torch_control.eval(), x, t, c, cond, 0.7)
  down, mid = jax.jit(lambda p, *a: control.apply({'params': p}, *a, conditioning_scale=0.7))(
      models['control_params'], nhwc(x), t, c, nhwc(cond))
  assert len(down) == len(ref_down) == 6  # conv_in, 2 resnets, 2 downsamplers, 1 resnet
  errors = [_rel_err(nchw(ours), ref.numpy())
            for ours, ref in zip([*down, mid], [*ref_down, ref_mid])]
  print(f'{variant}: residual max rel errors {max(errors):.2e}')
  assert max(errors) < 2e-5
  assert (mid.shape[1:3] == (1, 1)) == (variant != 'rgb')


def test_unet_step_with_residuals_matches_diffusers(models):
  x, t, c, cond = models['inputs']
  ref_down, ref_mid = _torch_residuals(models['torch_control'], x, t, c, cond, 0.7)
  with torch.no_grad():
    ref = models['torch_unet'](torch.tensor(x), torch.tensor(t), torch.tensor(c),
                               down_block_additional_residuals=ref_down,
                               mid_block_additional_residual=ref_mid).sample.numpy()
    base = models['torch_unet'](torch.tensor(x), torch.tensor(t), torch.tensor(c)).sample.numpy()
  assert _rel_err(base, ref) > 1e-2  # the residuals really steer the UNet
  out = nchw(models['step'](models['unet_params'], models['control_params'], nhwc(x), t, c,
                            nhwc(cond), jnp.float32(0.7), None))
  err = _rel_err(out, ref)
  print(f'ControlNet + UNet step max rel err {err:.2e}')
  assert err < 2e-5


def test_per_sample_lora_and_condition_in_one_call(models):
  """HyperLoRA's case: each sample its own LoRA, condition image and scale, one call."""
  x, t, c, cond = models['inputs']
  peft_unet = diffusers.UNet2DConditionModel.from_pretrained(models['unet_folder']).eval()
  lora = _peft_lora(peft_unet)  # shared factors, scale alpha / rank
  lora_scales, control_scales = [1.0, 0.3], [0.7, 1.3]
  refs = []
  for i in range(2):  # diffusers: one sample at a time, each with its own settings
    one = lambda a: a[i:i + 1]
    down, mid = _torch_residuals(models['torch_control'], one(x), one(t), one(c), one(cond),
                                 control_scales[i])
    with torch.no_grad():
      refs.append(peft_unet(torch.tensor(one(x)), torch.tensor(one(t)), torch.tensor(one(c)),
                            cross_attention_kwargs={'scale': lora_scales[i]},
                            down_block_additional_residuals=down,
                            mid_block_additional_residual=mid).sample.numpy())
  per_sample = {p: dict(f, scale=np.float32(f['scale']) * np.array(lora_scales, np.float32))
                for p, f in lora.items()}
  out = nchw(models['step'](models['unet_params'], models['control_params'], nhwc(x), t, c,
                            nhwc(cond), jnp.array(control_scales, jnp.float32), per_sample))
  err = _rel_err(out, np.concatenate(refs))
  print(f'per-sample LoRA + condition max rel err {err:.2e}')
  assert err < 2e-5


def test_from_unet_matches_diffusers(models, tmp_path):
  ref = diffusers.ControlNetModel.from_unet(models['torch_unet'],
                                            conditioning_embedding_out_channels=(8, 16))
  config = controlnet.config_from_unet(models['unet_config'],
                                       conditioning_embedding_out_channels=(8, 16))
  module = controlnet.from_config(config)
  params = controlnet.params_from_unet(module, models['unet_params'], jax.random.key(0))
  ours, theirs = core.flax_to_torch(params), {k: v.numpy() for k, v in ref.state_dict().items()}
  assert sorted(ours) == sorted(theirs)
  drawn = ('controlnet_cond_embedding.conv_in.', 'controlnet_cond_embedding.blocks.')
  copied = [k for k in ours if not k.startswith(drawn)]
  assert any(k.startswith('controlnet_down_blocks.') for k in copied)
  for key in copied:  # the UNet's encoder, and zeros where diffusers puts zeros
    np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
  assert not any(np.any(ours[k]) for k in ours
                 if k.startswith(('controlnet_down_blocks.', 'controlnet_mid_block.',
                                  'controlnet_cond_embedding.conv_out.')))
  # diffusers reads the folder we write for it.
  pipeline.save_model(params, config, str(tmp_path), 'diffusion_pytorch_model.safetensors')
  loaded = diffusers.ControlNetModel.from_pretrained(str(tmp_path))
  for key, value in loaded.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), ours[key], err_msg=key)


def test_controlnet_for_another_unet_is_refused(models, tmp_path):
  other = dict(CONTROL_TINY, block_out_channels=(16, 32, 32), cross_attention_dim=16)
  _torch_controlnet(other).save_pretrained(str(tmp_path / 'other'))
  with pytest.raises(convert.CheckpointError,
                     match=r'(?s)another UNet.*block_out_channels: ControlNet \(16, 32, 32\), '
                           r'UNet \(32, 64, 64\).*cross_attention_dim: ControlNet 16, UNet 32'):
    controlnet_folders.load_controlnet(str(tmp_path / 'other'), models['unet'])
  # A folder whose weights lost a zero conv names it.
  broken = str(tmp_path / 'broken')
  shutil.copytree(models['control_folder'], broken)
  weights = os.path.join(broken, 'diffusion_pytorch_model.safetensors')
  state = load_file(weights)
  del state['controlnet_down_blocks.3.weight']
  save_file(state, weights)
  with pytest.raises(convert.CheckpointError,
                     match=r'(?s)missing.*controlnet_down_blocks_3/kernel'):
    controlnet_folders.load_controlnet(broken, models['unet'])
  with pytest.raises(ValueError, match='ControlNet config: .*mid_block_type'):
    controlnet.from_config(dict(CONTROL_TINY, mid_block_type='UNetMidBlock2D'))


def test_residuals_that_do_not_fit_are_named(models):
  x, t, c, _ = models['inputs']
  shapes = [(2, 16, 16, 32)] * 2 + [(2, 8, 8, 32), (2, 8, 8, 64)] + [(2, 4, 4, 64)] * 2
  call = lambda down, mid: jax.eval_shape(lambda p: models['unet'].apply(
      {'params': p}, nhwc(x), t, c, down_block_additional_residuals=down,
      mid_block_additional_residual=mid), models['unet_params'])
  zeros = lambda s: jnp.zeros(s)
  with pytest.raises(ValueError, match='5 down_block_additional_residuals for 6 UNet skip'):
    call([zeros(s) for s in shapes[:5]], zeros((2, 4, 4, 64)))
  with pytest.raises(ValueError, match=r'down_block_additional_residuals\[3\] has shape '
                                       r'\(2, 8, 8, 32\).*\(2, 8, 8, 64\)'):
    call([zeros(s) for s in shapes[:3]] + [zeros((2, 8, 8, 32))] + [zeros(s) for s in shapes[4:]],
         zeros((2, 4, 4, 64)))
  with pytest.raises(ValueError, match=r'mid_block_additional_residual has shape \(2, 4, 4, 32\)'):
    call([zeros(s) for s in shapes], zeros((2, 4, 4, 32)))
