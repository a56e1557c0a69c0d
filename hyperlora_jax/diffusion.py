"""Noise schedules, training losses and samplers (DDIM, DPM-Solver++ 2M), with CFG.

Everything is a pure function over jnp arrays. A ``Schedule`` is a pytree: its
``alphas_cumprod`` is a leaf (so it can be a jit argument), the rest of the
diffusers scheduler config is static metadata.

The samplers reproduce diffusers' ``DDIMScheduler`` (eta=0) and
``DPMSolverMultistepScheduler`` (its defaults: dpmsolver++, order 2, midpoint,
lower_order_final, final_sigmas_type='zero', no Karras sigmas, no thresholding)
step for step. The timestep sequence is static (numpy) and the whole loop is one
``lax.scan``, so ``sample`` can be jitted with ``num_steps`` and ``sampler`` static.
"""
import json
import math
import os
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]

BETA_SCHEDULES = ('linear', 'scaled_linear', 'squaredcos_cap_v2')
PREDICTION_TYPES = ('epsilon', 'v_prediction')
TIMESTEP_SPACINGS = ('leading', 'trailing', 'linspace')
SAMPLERS = ('ddim', 'dpmpp_2m')

# diffusers' DDIMScheduler defaults, used for keys a config leaves out.
# timestep_spacing None means "each sampler's diffusers default" ('leading' for
# DDIMScheduler, 'linspace' for DPMSolverMultistepScheduler), because a config
# without the key (e.g. SD1.5's PNDM config) gives different timesteps in each.
_CONFIG_DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
    beta_schedule='linear', trained_betas=None, prediction_type='epsilon',
    steps_offset=0, set_alpha_to_one=True, timestep_spacing=None,
    clip_sample=True, clip_sample_range=1.0, rescale_betas_zero_snr=False)

# Stable Diffusion 1.5's scheduler/scheduler_config.json (the schedule part).
SD15_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
    beta_schedule='scaled_linear', prediction_type='epsilon', steps_offset=1,
    set_alpha_to_one=False, clip_sample=False)


@flax.struct.dataclass
class Schedule:
  """A discrete VP noise schedule plus the scheduler options the samplers need."""
  alphas_cumprod: jax.Array  # [T] float32, alpha_bar_t for t = 0..T-1.
  final_alpha_cumprod: jax.Array  # scalar: DDIM's alpha_bar "before t=0".
  prediction_type: str = flax.struct.field(pytree_node=False, default='epsilon')
  steps_offset: int = flax.struct.field(pytree_node=False, default=0)
  timestep_spacing: Optional[str] = flax.struct.field(
      pytree_node=False, default=None)
  clip_sample: bool = flax.struct.field(pytree_node=False, default=False)  # DDIM
  clip_sample_range: float = flax.struct.field(pytree_node=False, default=1.0)

  @property
  def num_train_timesteps(self) -> int:
    return self.alphas_cumprod.shape[0]


def _check(name: str, value: Any, allowed) -> None:
  if value not in allowed:
    raise ValueError(f'Unknown {name} {value!r}; expected one of {allowed}.')


def _betas(cfg: dict) -> np.ndarray:
  """Betas in float32, computed the way diffusers does (so alphas match to ulp)."""
  n = int(cfg['num_train_timesteps'])
  if cfg['trained_betas'] is not None:
    return np.asarray(cfg['trained_betas'], np.float32)
  kind = cfg['beta_schedule']
  if kind == 'linear':
    return np.linspace(cfg['beta_start'], cfg['beta_end'], n, dtype=np.float32)
  if kind == 'scaled_linear':  # linear in sqrt(beta); squared in float32.
    return np.linspace(cfg['beta_start']**0.5, cfg['beta_end']**0.5, n,
                       dtype=np.float32)**2
  # squaredcos_cap_v2 (GLIDE cosine): float64 betas capped at 0.999, then fp32.
  f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2)**2
  return np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)],
                  np.float32)


def schedule_from_config(config: dict) -> Schedule:
  """Builds a Schedule from a diffusers scheduler config dict.

  Keys that only configure a particular diffusers scheduler class (solver_order,
  use_karras_sigmas, ...) are ignored: our samplers always use the defaults.
  """
  cfg = dict(_CONFIG_DEFAULTS)
  cfg.update({k: v for k, v in config.items() if k in _CONFIG_DEFAULTS})
  if cfg['trained_betas'] is None:
    _check('beta_schedule', cfg['beta_schedule'], BETA_SCHEDULES)
  _check('prediction_type', cfg['prediction_type'], PREDICTION_TYPES)
  _check('timestep_spacing', cfg['timestep_spacing'], TIMESTEP_SPACINGS + (None,))
  if cfg['rescale_betas_zero_snr']:
    raise ValueError('rescale_betas_zero_snr=True is not supported.')
  # Cumulative product in float32, like torch.cumprod in diffusers.
  alphas_cumprod = np.cumprod(np.float32(1.0) - _betas(cfg), dtype=np.float32)
  final = 1.0 if cfg['set_alpha_to_one'] else alphas_cumprod[0]
  return Schedule(
      alphas_cumprod=jnp.asarray(alphas_cumprod),
      final_alpha_cumprod=jnp.asarray(final, jnp.float32),
      prediction_type=cfg['prediction_type'],
      steps_offset=int(cfg['steps_offset']),
      timestep_spacing=cfg['timestep_spacing'],
      clip_sample=bool(cfg['clip_sample']),
      clip_sample_range=float(cfg['clip_sample_range']))


def load_schedule(folder: Optional[str] = None) -> Schedule:
  """Reads ``scheduler_config.json`` from ``folder`` or ``folder/scheduler``.

  With ``folder=None`` returns the SD1.5 schedule (SD15_SCHEDULER_CONFIG).
  """
  if folder is None:
    return schedule_from_config(SD15_SCHEDULER_CONFIG)
  candidates = [os.path.join(folder, 'scheduler_config.json'),
                os.path.join(folder, 'scheduler', 'scheduler_config.json')]
  for path in candidates:
    if os.path.isfile(path):
      with open(path) as f:
        return schedule_from_config(json.load(f))
  raise FileNotFoundError(f'No scheduler config: tried {" and ".join(candidates)}')


# ------------------------------------------------------------------ training


def _per_example(a: jax.Array, x: jax.Array) -> jax.Array:
  """Reshapes a [B] array to broadcast against x [B, ...]."""
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def random_timesteps(rng: jax.Array, schedule: Schedule,
                     batch_size: int) -> jax.Array:
  """Uniform training timesteps in [0, T), int32 [batch_size]."""
  return jax.random.randint(rng, (batch_size,), 0, schedule.num_train_timesteps)


def init_noise(rng: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """x_T ~ N(0, I); both samplers have init_noise_sigma = 1."""
  return jax.random.normal(rng, shape, dtype)


def add_noise(schedule: Schedule, x0: jax.Array, noise: jax.Array,
              t: jax.Array) -> jax.Array:
  """q(x_t | x_0): sqrt(a_t) x0 + sqrt(1 - a_t) noise, for t int [B]."""
  a = _per_example(schedule.alphas_cumprod.astype(x0.dtype)[t], x0)
  return a**0.5 * x0 + (1 - a)**0.5 * noise


def training_target(schedule: Schedule, x0: jax.Array, noise: jax.Array,
                    t: jax.Array) -> jax.Array:
  """What the model should predict: noise (epsilon) or v = sqrt(a) eps - sqrt(1-a) x0."""
  if schedule.prediction_type == 'epsilon':
    return noise
  a = _per_example(schedule.alphas_cumprod.astype(x0.dtype)[t], x0)
  return a**0.5 * noise - (1 - a)**0.5 * x0


def snr(schedule: Schedule, t: jax.Array) -> jax.Array:
  """Signal-to-noise ratio a_t / (1 - a_t) at integer timesteps t."""
  a = schedule.alphas_cumprod[t]
  return a / (1 - a)


def diffusion_loss(pred: jax.Array, target: jax.Array, t: jax.Array,
                   schedule: Schedule,
                   min_snr_gamma: Optional[float] = None) -> jax.Array:
  """Per-example MSE [B] (mean over non-batch axes), optionally min-SNR weighted.

  Min-SNR-gamma (Hang et al. 2023) weights the x0-space loss by min(snr, gamma);
  expressed for an eps target that is min(snr, g) / snr, for a v target
  min(snr, g) / (snr + 1) (as in diffusers' training scripts).
  """
  err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
  loss = err.reshape(err.shape[0], -1).mean(axis=-1)
  if min_snr_gamma is not None:
    s = snr(schedule, t)
    denom = s + 1 if schedule.prediction_type == 'v_prediction' else s
    loss = loss * jnp.minimum(s, min_snr_gamma) / denom
  return loss


# ------------------------------------------------------------------ sampling


def timesteps(schedule: Schedule, num_steps: int, kind: str = 'ddim') -> np.ndarray:
  """The int64 timestep sequence of diffusers' set_timesteps for sampler ``kind``."""
  _check('sampler', kind, SAMPLERS)
  T = schedule.num_train_timesteps
  if num_steps > T:
    raise ValueError(f'num_steps={num_steps} exceeds num_train_timesteps={T}.')
  spacing = schedule.timestep_spacing or ('leading' if kind == 'ddim' else 'linspace')
  # DPM-Solver spaces num_steps + 1 points and drops the last (t=0; the final
  # sigma=0 stands for it), except for 'trailing', which it spaces like DDIM.
  extra = 1 if kind == 'dpmpp_2m' and spacing != 'trailing' else 0
  n = num_steps + extra
  if spacing == 'linspace':
    ts = np.linspace(0, T - 1, n).round()[::-1]
  elif spacing == 'leading':
    ts = (np.arange(0, n) * (T // n)).round()[::-1] + schedule.steps_offset
  else:  # trailing; float arange, quirks included.
    ts = np.round(np.arange(T, 0, -T / n)) - 1
  return ts[:len(ts) - extra].astype(np.int64)


def cfg_model_fn(model_fn_batched: ModelFn, guidance_scale) -> ModelFn:
  """Classifier-free guidance around a model that sees the doubled batch.

  ``model_fn_batched(x2, t2)`` gets ``x2 = concat([x, x])``, ``t2 = concat([t, t])``
  and must treat the first half as unconditional and the second half as
  conditional (diffusers' order), e.g. by closing over text embeddings
  ``concat([uncond, cond])``. Returns ``model_fn(x, t) = u + g * (c - u)``.
  """
  def guided(x, t):
    out = model_fn_batched(jnp.concatenate([x, x]), jnp.concatenate([t, t]))
    uncond, cond = jnp.split(out, 2)
    return uncond + guidance_scale * (cond - uncond)
  return guided


def _ddim_coefs(schedule: Schedule, ts: np.ndarray, num_steps: int) -> dict:
  ac = schedule.alphas_cumprod
  # diffusers' DDIM steps to t - T // n whatever the spacing (a quirk for
  # 'linspace'/'trailing'); before t=0 it uses final_alpha_cumprod.
  prev = ts - schedule.num_train_timesteps // num_steps
  a_prev = jnp.where(prev >= 0, ac[np.maximum(prev, 0)], schedule.final_alpha_cumprod)
  return dict(a_t=ac[ts], a_prev=a_prev)


def _ddim_update(schedule: Schedule, x, out, c, prev_x0):
  del prev_x0  # single-step method
  a_t, a_prev = c['a_t'], c['a_prev']
  b_t = 1 - a_t
  if schedule.prediction_type == 'epsilon':
    x0, eps = (x - b_t**0.5 * out) / a_t**0.5, out
  else:
    x0, eps = a_t**0.5 * x - b_t**0.5 * out, a_t**0.5 * out + b_t**0.5 * x
  if schedule.clip_sample:  # eps is deliberately not re-derived (diffusers' default).
    x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
  return a_prev**0.5 * x0 + (1 - a_prev)**0.5 * eps, x0


def _dpm_coefs(schedule: Schedule, ts: np.ndarray, num_steps: int) -> dict:
  del num_steps
  ac = schedule.alphas_cumprod
  # sigmas as diffusers: sqrt((1-a)/a) in fp32 at each timestep, then sigma=0.
  sig = jnp.concatenate([((1 - ac) / ac)**0.5, jnp.zeros(1, ac.dtype)])
  sig = sig[np.append(ts, len(ac))]
  alpha = 1 / (sig**2 + 1)**0.5
  sigma = sig * alpha
  lam = jnp.log(alpha) - jnp.log(sigma)  # +inf at the final sigma=0
  n = len(ts)
  i = np.arange(n)
  h = lam[i + 1] - lam[i]
  r0 = (lam[i] - lam[np.maximum(i - 1, 0)]) / h
  phi = alpha[i + 1] * (jnp.exp(-h) - 1)
  # First order at the first step (no history) and the last (final sigma is
  # zero, so diffusers always lowers the order there); second order between.
  second = (i > 0) & (i < n - 1)
  return dict(
      alpha_s=alpha[:-1], sigma_s=sigma[:-1],
      c_x=sigma[i + 1] / sigma[i],  # 0 at the last step: x_0 = data prediction
      c_d0=-phi,
      c_d1=jnp.where(second, -0.5 * phi / r0, 0.0))  # masks inf/nan ends


def _dpm_update(schedule: Schedule, x, out, c, prev_x0):
  # DPM-Solver++ works on data predictions x0 (diffusers' convert_model_output).
  if schedule.prediction_type == 'epsilon':
    x0 = (x - c['sigma_s'] * out) / c['alpha_s']
  else:
    x0 = c['alpha_s'] * x - c['sigma_s'] * out
  # 2M: D0 = m0, D1 = (m0 - m1) / r0 with m1 the previous step's x0.
  return c['c_x'] * x + c['c_d0'] * x0 + c['c_d1'] * (x0 - prev_x0), x0


def sample(model_fn: ModelFn, schedule: Schedule, x_T: jax.Array,
           num_steps: int, sampler: str = 'ddim', guidance_scale=None,
           return_trajectory: bool = False):
  """Runs a deterministic sampler from x_T; returns x_0 (and [n, ...] latents).

  Args:
    model_fn: ``model_fn(x, t)`` with x [B, ...] float32, t int32 [B]; returns
      eps or v per ``schedule.prediction_type``.
    schedule: the noise schedule.
    x_T: starting noise [B, ...] (``init_noise``).
    num_steps: number of model evaluations (static).
    sampler: 'ddim' (eta=0) or 'dpmpp_2m' (static).
    guidance_scale: if given, ``model_fn`` is wrapped with ``cfg_model_fn`` and
      so must take the doubled (uncond, cond) batch.
    return_trajectory: also return the latents after every step (static).

  Returns:
    x_0 float32, or (x_0, trajectory [len(timesteps), B, ...]).
  """
  if guidance_scale is not None:
    model_fn = cfg_model_fn(model_fn, guidance_scale)
  ts = timesteps(schedule, num_steps, sampler)
  coefs_fn, update = ((_ddim_coefs, _ddim_update) if sampler == 'ddim'
                      else (_dpm_coefs, _dpm_update))
  xs = dict(coefs_fn(schedule, ts, num_steps), t=jnp.asarray(ts, jnp.int32))

  def step(carry, c):
    x, prev_x0 = carry  # prev_x0: the 2M history, unused by DDIM
    t = jnp.full((x.shape[0],), c['t'], jnp.int32)
    out = model_fn(x, t).astype(jnp.float32)
    x, x0 = update(schedule, x, out, c, prev_x0)
    return (x, x0), (x if return_trajectory else None)

  x = x_T.astype(jnp.float32)
  (x, _), traj = jax.lax.scan(step, (x, jnp.zeros_like(x)), xs)
  return (x, traj) if return_trajectory else x
