"""diffusion.py against diffusers' own PyTorch schedulers (CPU, fp32)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from hyperlora_jax import diffusion

SD15 = diffusion.SD15_SCHEDULER_CONFIG
SD21_V = dict(SD15, prediction_type='v_prediction')  # SD2.x-768 style
SCHEDULER_CLS = {'ddim': DDIMScheduler, 'dpmpp_2m': DPMSolverMultistepScheduler}


def torch_model(x, t):
  return torch.sin(x * 0.3 + t / 1000) * 0.8


def jax_model(x, t):
  return jnp.sin(x * 0.3 + t.reshape(-1, 1, 1, 1) / 1000) * 0.8


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize('config', [
    dict(beta_schedule='linear'),
    SD15,
    dict(beta_schedule='squaredcos_cap_v2', num_train_timesteps=500),
])
def test_alphas_cumprod_match_diffusers(config):
  ours = np.asarray(diffusion.schedule_from_config(config).alphas_cumprod)
  for cls in (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler):
    theirs = cls.from_config(config).alphas_cumprod.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=2e-6, atol=0)


@pytest.mark.parametrize('set_alpha_to_one', [True, False])
def test_final_alpha_cumprod(set_alpha_to_one):
  config = dict(SD15, set_alpha_to_one=set_alpha_to_one)
  ours = diffusion.schedule_from_config(config).final_alpha_cumprod
  theirs = DDIMScheduler.from_config(config).final_alpha_cumprod
  np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)


@pytest.mark.parametrize('sampler', ['ddim', 'dpmpp_2m'])
@pytest.mark.parametrize('spacing', [None, 'leading', 'trailing', 'linspace'])
@pytest.mark.parametrize('num_steps', [1, 7, 10, 25, 50])
def test_timesteps_match_diffusers(sampler, spacing, num_steps):
  config = dict(SD15)  # steps_offset=1
  if spacing is not None:
    config['timestep_spacing'] = spacing
  scheduler = SCHEDULER_CLS[sampler].from_config(config)
  scheduler.set_timesteps(num_steps)
  ours = diffusion.timesteps(diffusion.schedule_from_config(config), num_steps,
                             sampler)
  np.testing.assert_array_equal(ours, scheduler.timesteps.numpy())


def _run_diffusers(sampler, config, x_T, num_steps):
  scheduler = SCHEDULER_CLS[sampler].from_config(config)
  scheduler.set_timesteps(num_steps)
  x, traj = torch.from_numpy(x_T), []
  for t in scheduler.timesteps:
    x = scheduler.step(torch_model(x, t), t, x).prev_sample
    traj.append(x.numpy())
  return np.stack(traj)


@pytest.mark.parametrize('num_steps', [10, 25])
@pytest.mark.parametrize('sampler,config', [
    ('ddim', SD15), ('ddim', SD21_V), ('dpmpp_2m', SD15), ('dpmpp_2m', SD21_V),
    # diffusers defaults: linear betas, DDIM clip_sample=True, set_alpha_to_one.
    ('ddim', dict(beta_schedule='linear')),
    ('ddim', dict(SD15, timestep_spacing='trailing')),
    ('dpmpp_2m', dict(SD21_V, timestep_spacing='trailing')),
    ('dpmpp_2m', dict(beta_schedule='squaredcos_cap_v2')),
])
def test_sampler_matches_diffusers_step_for_step(sampler, config, num_steps):
  x_T = np.random.RandomState(0).randn(2, 4, 8, 8).astype(np.float32)
  theirs = _run_diffusers(sampler, config, x_T, num_steps)
  run = jax.jit(lambda s, x: diffusion.sample(
      jax_model, s, x, num_steps, sampler, return_trajectory=True))
  x0, ours = run(diffusion.schedule_from_config(config), jnp.asarray(x_T))
  assert ours.shape == theirs.shape
  errs = [rel_err(a, b) for a, b in zip(ours, theirs)]
  assert max(errs) < 1e-4, errs
  np.testing.assert_array_equal(x0, ours[-1])
  # Not vacuous: one step moves the latents by > 10x the tolerance.
  assert rel_err(theirs[0], x_T) > 1e-3 and rel_err(theirs[-1], x_T) > 0.1


def test_clip_sample_is_active_in_parity_run():
  """The clip_sample=True parity case above really clips (not vacuous)."""
  s = diffusion.schedule_from_config(dict(beta_schedule='linear'))
  x = jnp.asarray(np.random.RandomState(0).randn(2, 4, 8, 8), jnp.float32)
  a = s.alphas_cumprod[999]
  x0 = (x - (1 - a)**0.5 * jax_model(x, jnp.full((2,), 999))) / a**0.5
  assert jnp.abs(x0).max() > 1


@pytest.mark.parametrize('prediction_type', ['epsilon', 'v_prediction'])
def test_add_noise_and_target_match_diffusers(prediction_type):
  config = dict(SD15, prediction_type=prediction_type)
  rs = np.random.RandomState(1)
  x0, noise = (rs.randn(5, 4, 6, 6).astype(np.float32) for _ in range(2))
  t = np.array([0, 1, 500, 998, 999])
  theirs = DDPMScheduler.from_config(config)
  s = diffusion.schedule_from_config(config)
  np.testing.assert_allclose(
      diffusion.add_noise(s, x0, noise, t),
      theirs.add_noise(torch.from_numpy(x0), torch.from_numpy(noise),
                       torch.from_numpy(t)).numpy(), rtol=1e-5, atol=1e-6)
  expected = noise if prediction_type == 'epsilon' else theirs.get_velocity(
      torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
  np.testing.assert_allclose(
      diffusion.training_target(s, x0, noise, t), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('prediction_type', ['epsilon', 'v_prediction'])
def test_diffusion_loss_and_min_snr(prediction_type):
  s = diffusion.schedule_from_config(dict(SD15, prediction_type=prediction_type))
  rs = np.random.RandomState(2)
  pred, target = rs.randn(3, 4, 5, 5), rs.randn(3, 4, 5, 5)
  t = np.array([10, 400, 990])
  mse = ((pred - target)**2).reshape(3, -1).mean(-1)
  np.testing.assert_allclose(diffusion.diffusion_loss(pred, target, t, s), mse,
                             rtol=1e-5)
  # diffusers' compute_snr: (alpha / sigma)^2 with alpha = sqrt(a), sigma = sqrt(1-a).
  a = np.asarray(s.alphas_cumprod, np.float64)[t]
  snr = (np.sqrt(a) / np.sqrt(1 - a))**2
  np.testing.assert_allclose(diffusion.snr(s, t), snr, rtol=1e-5)
  w = np.minimum(snr, 5.0) / (snr + 1 if prediction_type == 'v_prediction' else snr)
  np.testing.assert_allclose(
      diffusion.diffusion_loss(pred, target, t, s, min_snr_gamma=5.0), mse * w,
      rtol=1e-5)
  assert w[0] < 0.1  # the high-SNR (low t) example is down-weighted


def test_cfg_model_fn():
  calls = []

  def batched(x2, t2):  # uncond rows first, then cond rows
    calls.append(x2.shape)
    half = x2.shape[0] // 2
    bias = jnp.concatenate([jnp.zeros(half), jnp.ones(half)]).reshape(-1, 1, 1, 1)
    return jax_model(x2, t2) + bias * x2

  x = jnp.asarray(np.random.RandomState(3).randn(2, 4, 8, 8), jnp.float32)
  t = jnp.array([500, 20])
  uncond, cond = jax_model(x, t), jax_model(x, t) + x
  np.testing.assert_allclose(diffusion.cfg_model_fn(batched, 1.0)(x, t), cond,
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(diffusion.cfg_model_fn(batched, 7.5)(x, t),
                             uncond + 7.5 * (cond - uncond), rtol=1e-5, atol=1e-5)
  assert calls[0] == (4, 4, 8, 8)
  # sample(..., guidance_scale=g) is sample of the wrapped model.
  s = diffusion.load_schedule(None)
  a = diffusion.sample(batched, s, x, 5, 'dpmpp_2m', guidance_scale=3.0)
  b = diffusion.sample(diffusion.cfg_model_fn(batched, 3.0), s, x, 5, 'dpmpp_2m')
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_determinism_and_grad():
  s = diffusion.load_schedule(None)
  run = jax.jit(lambda x: diffusion.sample(jax_model, s, x, 8, 'dpmpp_2m'))
  x1 = diffusion.init_noise(jax.random.PRNGKey(0), (2, 4, 8, 8))
  x2 = diffusion.init_noise(jax.random.PRNGKey(0), (2, 4, 8, 8))
  x3 = diffusion.init_noise(jax.random.PRNGKey(1), (2, 4, 8, 8))
  np.testing.assert_array_equal(run(x1), run(x2))
  assert not np.allclose(run(x1), run(x3))
  # Gradients flow through the scan without NaNs from the sigma=0 final step.
  g = jax.grad(lambda p: diffusion.sample(
      lambda x, t: p * jax_model(x, t), s, x1, 8, 'dpmpp_2m').sum())(1.0)
  assert np.isfinite(g)


def test_load_schedule(tmp_path):
  DDIMScheduler.from_config(SD21_V).save_config(str(tmp_path / 'scheduler'))
  from_root = diffusion.load_schedule(str(tmp_path))
  from_sub = diffusion.load_schedule(str(tmp_path / 'scheduler'))
  assert from_root.prediction_type == 'v_prediction'
  assert from_root.steps_offset == 1 and not from_root.clip_sample
  np.testing.assert_array_equal(from_root.alphas_cumprod, from_sub.alphas_cumprod)
  np.testing.assert_array_equal(
      from_root.alphas_cumprod, diffusion.schedule_from_config(SD15).alphas_cumprod)


def test_bad_input(tmp_path):
  with pytest.raises(ValueError, match='beta_schedule.*cosine'):
    diffusion.schedule_from_config(dict(beta_schedule='cosine'))
  with pytest.raises(ValueError, match='prediction_type.*sample'):
    diffusion.schedule_from_config(dict(prediction_type='sample'))
  with pytest.raises(ValueError, match='timestep_spacing.*uniform'):
    diffusion.schedule_from_config(dict(timestep_spacing='uniform'))
  with pytest.raises(ValueError, match='rescale_betas_zero_snr'):
    diffusion.schedule_from_config(dict(rescale_betas_zero_snr=True))
  with pytest.raises(ValueError, match='sampler.*euler'):
    diffusion.timesteps(diffusion.load_schedule(None), 10, 'euler')
  missing = tmp_path / 'no_model'
  with pytest.raises(FileNotFoundError, match='no_model'):
    diffusion.load_schedule(str(missing))
  (tmp_path / 'bad').mkdir()
  (tmp_path / 'bad' / 'scheduler_config.json').write_text(
      json.dumps(dict(beta_schedule='exp')))
  with pytest.raises(ValueError, match='exp'):
    diffusion.load_schedule(str(tmp_path / 'bad'))
