"""The training loop: mesh, state, jit'd step with shardings, checkpoints, logs.

`train_and_evaluate(config, workdir, build_objective=..., create_dataset=...)` trains
the Objective its caller's builder returns (trainable/frozen params, a pure `loss_fn`
and a host `prepare`; see `objectives.base`) on the batches of its caller's dataset,
and calls the caller's evaluation hook. It reads config.seed and the train, optim and
mesh sections (`hyperlora_jax.defaults` documents each key and its default); main.py
hands it its parts.
"""
import functools
import json
import os
import time
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath

from hyperlora_jax import checkpoint
from hyperlora_jax import defaults
from hyperlora_jax import files
from hyperlora_jax import sharding

# evaluate_fn(config, objective, params, step, writer) -> scalars or None.
EvaluateFn = Callable[..., Optional[Mapping[str, float]]]

# Config keys a resume may always change: how the same computation is laid out on the
# devices and read (a checkpoint is resharded onto any mesh, exactly). A key ending in
# '.' names its section.
LAYOUT = ('mesh.', 'data.num_threads', 'data.prefetch', 'data.num_workers')
# Config keys a resume may change when asked to (`allow_config_changes`): how long and
# how often, not what is trained.
SAFE_TO_CHANGE = ('train.num_steps', 'train.log_every', 'train.eval_every',
                  'train.checkpoint_every', 'train.keep_checkpoints', 'eval.',
                  'data.data_dir')


class Preempted(Exception):
  """Training stopped on a preemption notice (SIGTERM) after saving `step`; the same
  command resumes it. `state` is the train state saved."""

  def __init__(self, step: int, workdir, state=None):
    super().__init__(f'Preempted: saved step {step} in {workdir}; run the same command '
                     'again to resume.')
    self.step, self.state = step, state


def check_config(config, num_devices: int, process_count: int) -> None:
  """Fails before anything is built, naming the key that is wrong."""
  t, o = config.train, config.optim
  if t.nan_policy not in ('stop', 'skip'):
    raise ValueError(f"train.nan_policy must be 'stop' or 'skip', "
                     f'not {t.nan_policy!r}.')
  if o.schedule not in ('cosine', 'constant'):
    raise ValueError(f"optim.schedule must be 'cosine' or 'constant', "
                     f'not {o.schedule!r}.')
  remat_policy(t.remat)
  for key in ('num_steps', 'batch_size', 'grad_accum_steps', 'log_every',
              'checkpoint_every', 'keep_checkpoints'):
    if t[key] < 1:
      raise ValueError(f'train.{key}={t[key]}: must be >= 1.')
  if t.eval_every < 0:
    raise ValueError(f'train.eval_every={t.eval_every}: must be >= 0 (0: only at the end).')
  data, fsdp = sharding.mesh_shape(config.mesh.data, config.mesh.fsdp,
                                   num_devices)
  multiple = data * fsdp * t.grad_accum_steps
  if t.batch_size % multiple or t.batch_size % process_count:
    raise ValueError(
        f'train.batch_size={t.batch_size} must be a multiple of devices '
        f'({data * fsdp}) x grad_accum_steps ({t.grad_accum_steps}) and of '
        f'the process count ({process_count}).')


def remat_policy(name: str):
  """None (no remat), or the policy jax.checkpoint is given ('full': None)."""
  if name in ('none', 'full'):
    return None
  policy = getattr(jax.checkpoint_policies, name, None)
  if policy is None:
    raise ValueError(f'Unknown train.remat {name!r}: use none, full or a '
                     'jax.checkpoint_policies name.')
  return policy


def make_optimizer(optim, num_steps: int):
  """AdamW with warmup and cosine/constant decay; returns (tx, schedule)."""
  if optim.schedule == 'cosine':
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, optim.lr, optim.warmup_steps,
        max(num_steps, optim.warmup_steps + 1))
  else:
    schedule = optax.warmup_constant_schedule(0.0, optim.lr,
                                              optim.warmup_steps)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  adamw = optax.adamw(schedule, optim.b1, optim.b2, optim.eps,
                      weight_decay=optim.weight_decay, mask=decay_mask)
  if optim.grad_clip_norm:
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm),
                       adamw), schedule
  return adamw, schedule


def _flat(tree: Mapping, prefix: str = '') -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[prefix + k] = v
  return out


def config_changes(saved: Mapping, config: Mapping) -> list:
  """['key: saved -> new'] for every key whose value differs between two config dicts
  (a key only one has counts, with <none> for the other)."""
  a, b = _flat(saved), _flat(config)
  return [f'{k}: {a.get(k, "<none>")} -> {b.get(k, "<none>")}'
          for k in sorted(set(a) | set(b)) if a.get(k, '<none>') != b.get(k, '<none>')]


def refused_changes(saved: Mapping, config: Mapping, allow_changes: bool) -> tuple:
  """(refused, all) changes from a saved config (filled with today's defaults) to
  `config`: LAYOUT keys may differ, and with `allow_changes` the SAFE_TO_CHANGE keys too."""
  saved = json.loads(defaults.fill(ml_collections.ConfigDict(saved)).to_json_best_effort())
  changes = config_changes(saved, config)
  among = lambda c, keys: any(c.startswith(k if k.endswith('.') else k + ':')
                              for k in keys)
  return [c for c in changes if not among(c, LAYOUT) and not (
      allow_changes and among(c, SAFE_TO_CHANGE))], changes


def check_resume(saved: Mapping, config: Mapping, step: int, directory,
                 allow_changes: bool) -> None:
  """Refuses a resume whose config differs from the one its checkpoint was trained
  with, listing the keys (`refused_changes`)."""
  refused, changes = refused_changes(saved, config, allow_changes)
  if refused:
    keys = ', '.join(k + '*' if k.endswith('.') else k for k in SAFE_TO_CHANGE)
    can = (f'--allow_config_changes allows only {keys}.' if allow_changes else
           'Resume with the config it was trained with, or use another workdir; to '
           f'change only keys that are safe to change ({keys}), pass '
           '--allow_config_changes.')
    raise ValueError(f'The config differs from the one checkpoint step {step} in '
                     f'{directory} was trained with:\n  ' + '\n  '.join(refused)
                     + '\n' + can)
  if changes:
    logging.warning('Resuming with config changes: %s', '; '.join(changes))


def _init_from(workdir: str, params, step: int = -1):
  """The trainable params of another run's checkpoint at `step` (-1: its newest intact
  one; its EMA where it kept one), in the shapes and shardings of `params`: a run that
  continues another."""
  directory = epath.Path(workdir) / 'checkpoints'
  if not directory.exists():
    raise FileNotFoundError(f'train.init_from={workdir}: no training run there (no '
                            'checkpoints/).')
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          params)
  # Orbax's partial restore would fill what the checkpoint lacks without a word: check
  # every path and shape against its metadata first.
  if step < 0:
    step = checkpoint.newest_intact_step(directory)  # None: restore_params says why
  saved = checkpoint.param_shapes(directory, step) if step is not None else {}
  wanted = {'/'.join(str(getattr(k, 'key', k)) for k in path): tuple(x.shape)
            for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  misfit = ([f'missing {k}' for k in wanted if k not in saved]
            + [f'unexpected {k}' for k in saved if k not in wanted]
            + [f'{k}: {saved[k]}, here {v}' for k, v in wanted.items()
               if k in saved and saved[k] != v])
  if misfit and step is not None:
    raise ValueError(f'train.init_from={workdir}: its params do not fit this run\'s '
                     f'objective (train the same objective there); {len(misfit)} '
                     f'differences, e.g. {"; ".join(misfit[:3])}.')
  step, loaded = checkpoint.restore_params(directory, abstract, step)
  logging.info('Starting from the params of %s, step %d.', workdir, step)
  return loaded


def init_state(params, tx, ema: bool) -> dict:
  state = {'step': jnp.zeros((), jnp.int32), 'params': params,
           'opt_state': tx.init(params)}
  if ema:
    state['ema'] = params
  return state


def _grads(loss_fn, params, frozen, batch, rng, accum: int, mesh):
  """Mean loss, metrics and gradients over `accum` sequential micro-batches."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum == 1:
    (loss, metrics), grads = grad_fn(params, frozen, batch, rng)
    return loss, metrics, grads

  # Row j of micro-batch i is example j * accum + i: every micro-batch keeps
  # rows on every device, so no data moves between devices.
  micro_sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, sharding.BATCH_AXES))

  def split(x):
    x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, micro_sharding)

  def body(carry, xs):
    i, micro = xs
    (loss, metrics), grads = grad_fn(params, frozen, micro,
                                     jax.random.fold_in(rng, i))
    return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

  micro = jax.tree.map(split, batch)
  first = jax.tree.map(lambda x: x[0], micro)
  zeros = jax.tree.map(
      jnp.zeros_like,
      jax.eval_shape(lambda: grad_fn(params, frozen, first, rng)))
  (loss, metrics), grads = zeros
  total, _ = jax.lax.scan(body, (loss, metrics, grads),
                          (jnp.arange(accum), micro))
  return jax.tree.map(lambda x: x / accum, total)


def make_train_step(loss_fn, tx, schedule, config, mesh):
  """(state, frozen, batch, key data) -> (state, metrics), to be jitted."""
  policy_name = config.train.remat
  if policy_name != 'none':
    loss_fn = jax.checkpoint(loss_fn, policy=remat_policy(policy_name))
  ema_decay = config.train.ema_decay

  def train_step(state, frozen, batch, rng_data):
    rng = jax.random.fold_in(jax.random.wrap_key_data(rng_data),
                             state['step'])
    params = state['params']
    loss, metrics, grads = _grads(loss_fn, params, frozen, batch, rng,
                                  config.train.grad_accum_steps, mesh)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state['opt_state'], params)
    new = {'params': optax.apply_updates(params, updates),
           'opt_state': opt_state}
    if ema_decay:
      new['ema'] = jax.tree.map(
          lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
          state['ema'], new['params'])
    # A non-finite loss or gradient leaves params, moments and EMA as they
    # were, so neither policy can ever save a poisoned state.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    old = {k: state[k] for k in new}
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new['step'] = state['step'] + 1
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm,
                   lr=schedule(state['step']), finite=finite)
    return new, metrics

  return train_step


def fit(loss_fn, draw, optim, remat: str = 'none', log_every: int = 0):
  """A jitted ``fit(trainable, frozen, data, steps, lr, rng) -> (params, last loss)``
  that runs `steps` AdamW updates of ``loss_fn`` in one compiled call (a lax.fori_loop):
  step i's batch is ``draw(data, key_i)``, e.g. `objectives.lora_bank.subject_batch`'s
  one image of every subject of a bank.

  This is the loop of per-subject LoRAs (pre-optimization, fast fine-tuning): no host
  round trip per step. ``steps`` and ``lr`` are arguments of the compiled call, so fits
  of other lengths and rates run the same program. The rate is constant and there is no
  gradient clipping: a global norm would couple the subjects, whose updates are
  otherwise each their own (Adam is elementwise). optim: b1, b2, eps, weight_decay
  (only on params with ndim >= 2). log_every: prints the step and loss every N steps
  from inside the loop.
  """
  if remat != 'none':
    loss_fn = jax.checkpoint(loss_fn, policy=remat_policy(remat))
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  tx = optax.chain(
      optax.scale_by_adam(optim.b1, optim.b2, optim.eps),
      optax.add_decayed_weights(optim.weight_decay,
                                lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))

  def report(step, steps, loss):
    print(f'  step {int(step)}/{int(steps)}  loss {float(loss):.5f}', flush=True)

  def run(trainable, frozen, data, steps, lr, rng):
    def body(i, carry):
      params, opt_state, _ = carry
      key_draw, key_loss = jax.random.split(jax.random.fold_in(rng, i))
      (loss, _), grads = grad_fn(params, frozen, draw(data, key_draw), key_loss)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
      if log_every:
        jax.lax.cond((i + 1) % log_every == 0,
                     lambda: jax.debug.callback(report, i + 1, steps, loss), lambda: None)
      return params, opt_state, loss

    params, _, loss = jax.lax.fori_loop(
        0, steps, body, (trainable, tx.init(trainable), jnp.zeros((), jnp.float32)))
    return params, loss

  return jax.jit(run)


class MetricWriter:
  """TensorBoard scalars and image grids (tensorboardX), process 0 only."""

  def __init__(self, logdir: str):
    self._writer = None
    if jax.process_index() == 0:
      # Imported here: tensorboardX imports torch whenever it is installed
      # (a second or more), which no other process should pay for.
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._writer = tensorboardX.SummaryWriter(logdir, flush_secs=30)

  def write_scalars(self, step: int, scalars: Mapping[str, float]):
    if self._writer:
      for name, value in scalars.items():
        self._writer.add_scalar(name, float(value), step)

  def write_images(self, step: int, images: Mapping[str, np.ndarray]):
    """name -> [N, H, W, C] (a grid) or [H, W, C], float in [0, 1] or uint8."""
    if self._writer:
      for name, image in images.items():
        image = np.asarray(image)
        if image.ndim == 4:
          self._writer.add_images(name, image, step, dataformats='NHWC')
        else:
          self._writer.add_image(name, image, step, dataformats='HWC')

  def close(self):
    if self._writer:
      self._writer.close()


class _Progress:
  """Averages host metrics over a log interval; logs rate, ETA and loss."""

  def __init__(self, config, writer: MetricWriter):
    self.config, self.writer = config, writer
    self.sums, self.count, self.skipped = {}, 0, 0
    self.mark = None  # (step, time) the current rate is measured from.

  def add(self, step: int, metrics: Mapping[str, Any]) -> None:
    metrics = jax.device_get(metrics)
    if not metrics.pop('finite'):
      message = (f'Non-finite loss or gradient at step {step}: '
                 f'loss={float(metrics["loss"])}, '
                 f'grad_norm={float(metrics["grad_norm"])}.')
      if self.config.train.nan_policy == 'stop':
        raise FloatingPointError(message + ' Stopping (train.nan_policy='
                                 "'stop'); the last checkpoint is intact.")
      logging.warning('%s Update skipped.', message)
      self.skipped += 1
      return
    if self.mark is None:  # Rates exclude the first (compile) step.
      self.mark = (step, time.time())
    for k, v in metrics.items():
      self.sums[k] = self.sums.get(k, 0.0) + float(v)
    self.count += 1
    if step % self.config.train.log_every == 0:
      self.flush(step)

  def flush(self, step: int) -> None:
    scalars = {k: v / max(self.count, 1) for k, v in self.sums.items()}
    scalars['skipped_updates'] = self.skipped
    now = time.time()
    mark_step, mark_time = self.mark or (step, now)
    rate = (step - mark_step) / (now - mark_time) if now > mark_time else 0.0
    self.mark = (step, now)
    scalars['steps_per_sec'] = rate
    scalars['images_per_sec'] = rate * self.config.train.batch_size
    self.writer.write_scalars(step, scalars)
    if jax.process_index() == 0:
      eta = '?'
      if rate:
        left = int((self.config.train.num_steps - step) / rate)
        eta = f'{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}'
      logging.info('step %d/%d  loss %.5f  %.2f steps/s  %.1f images/s  '
                   'ETA %s', step, self.config.train.num_steps,
                   scalars.get('loss', float('nan')), rate,
                   scalars['images_per_sec'], eta)
    self.sums, self.count = {}, 0


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       build_objective: Callable, create_dataset: Callable,
                       evaluate_fn: Optional[EvaluateFn] = None,
                       allow_config_changes: bool = False):
  """Trains to config.train.num_steps, resuming from workdir's checkpoints.

  A resume whose config differs from the checkpoint's is refused before anything is
  built or written, naming the keys (`check_resume`); config.json is written only
  once that check passed. A failed checkpoint save stops the run (`checkpoint.SaveError`)
  at the next step; a preemption notice saves and raises `Preempted`.

  Args:
    config: the experiment config (`hyperlora_jax.defaults`).
    workdir: checkpoints/, tensorboard/ and config.json go here (local or
      a bucket path).
    build_objective: (config, rng) -> Objective, e.g. objectives.build.
    create_dataset: (config, split, process_index, process_count) -> an
      iterator of per-host numpy batches with get_state()/set_state(), e.g.
      data.pipeline.for_training.
    evaluate_fn: (config, objective, params, step, writer) -> scalars or
      None, called on every process at eval_every and at the end, e.g.
      evaluate.evaluate_fn; None: no evaluation.
    allow_config_changes: a resume may change the SAFE_TO_CHANGE keys.

  Returns:
    The final train state (params, opt_state, step[, ema]).

  Raises:
    Preempted: after saving the step a preemption notice arrived at.
  """
  if '://' not in str(workdir):  # Orbax wants absolute paths; buckets already are.
    workdir = os.path.abspath(workdir)
  check_config(config, jax.device_count(), jax.process_count())
  workdir = epath.Path(workdir)
  config_dict = json.loads(config.to_json_best_effort())
  manager = checkpoint.make_manager(workdir / 'checkpoints',
                                    config.train.keep_checkpoints)
  saved = checkpoint.saved_config(manager)
  if saved:
    check_resume(saved[1], config_dict, saved[0], workdir / 'checkpoints',
                 allow_config_changes)
  if jax.process_index() == 0:
    text = json.dumps(config_dict, indent=2)
    if '://' in str(workdir):
      (workdir / 'config.json').write_text(text)
    else:
      files.write_text(str(workdir / 'config.json'), text)

  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  shardings_of = functools.partial(
      sharding.tree_shardings, mesh=mesh, rules=tuple(config.mesh.rules),
      min_size=config.mesh.shard_min_size)
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  logging.info('Building the %s objective (models and their params)...',
               config.get('objective', 'given'))
  objective = build_objective(config, init_rng)
  frozen_shardings = shardings_of(objective.frozen)
  # Only the placed copies are kept: the host copies would double memory.
  objective = objective._replace(
      frozen=sharding.place(objective.frozen, frozen_shardings),
      trainable=jax.tree.map(lambda x: np.asarray(x, np.float32),
                             objective.trainable))
  tx, schedule = make_optimizer(config.optim, config.train.num_steps)
  init = functools.partial(init_state, tx=tx,
                           ema=bool(config.train.ema_decay))
  state_shapes = jax.eval_shape(init, objective.trainable)
  state_shardings = shardings_of(state_shapes)

  logging.info('Opening the training data...')
  dataset = create_dataset(config, 'train', jax.process_index(),
                           jax.process_count())
  restored = checkpoint.restore_latest(manager, jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      state_shapes, state_shardings))
  if restored is None:
    params = sharding.place(objective.trainable, state_shardings['params'])
    if config.train.init_from and not objective.spec.starts_itself:
      params = _init_from(config.train.init_from, params, config.train.init_step)
    state = jax.jit(init, out_shardings=state_shardings)(params)
  else:
    _, state, data_state, _ = restored
    dataset.set_state(data_state)
    logging.info('Resumed from step %d in %s.', int(state['step']), workdir)
  objective = objective._replace(trainable=None)

  repl = sharding.replicated(mesh)
  train_step = jax.jit(
      make_train_step(objective.loss_fn, tx, schedule, config, mesh),
      in_shardings=(state_shardings, frozen_shardings,
                    sharding.batch_sharding(mesh), repl),
      out_shardings=(state_shardings, repl), donate_argnums=(0,))
  all_finite = jax.jit(
      lambda tree: jnp.all(jnp.stack(
          [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)])),
      out_shardings=repl)
  # As raw key data: host-identical numpy places on any number of hosts.
  train_rng = sharding.place(jax.random.key_data(train_rng), repl)

  writer = MetricWriter(str(workdir / 'tensorboard'))
  step = int(state['step'])
  progress = _Progress(config, writer)
  t = config.train

  saving = None  # The step of the newest async save, until it is known to be written.

  def save(step):
    nonlocal saving
    if not all_finite(state):  # Belt and braces: never save a bad state.
      raise FloatingPointError(f'Non-finite train state at step {step}; '
                               'not saving it.')
    checkpoint.check_saves(manager, saving, wait=True)
    checkpoint.save(manager, step, state, dataset.get_state(), config_dict)
    saving = step

  def evaluate(step):
    params = state['ema'] if 'ema' in state else state['params']
    scalars = evaluate_fn(config, objective, params, step, writer)
    if scalars:
      writer.write_scalars(step, scalars)

  if step < t.num_steps:
    logging.info('Compiling the train step (the first step; a rerun of the same shapes '
                 'loads it from the compilation cache)...')
  try:
    with checkpoint.preemption_watch() as preempted:
      pending = None  # (step, metrics) still on device: read one step late.
      while step < t.num_steps:
        batch = sharding.host_to_global(objective.prepare(next(dataset)),
                                        mesh)
        state, metrics = train_step(state, objective.frozen, batch,
                                    train_rng)
        step += 1
        if pending:  # Waits for the previous step only: the device stays busy.
          progress.add(*pending)
        pending = (step, metrics)
        checkpoint.check_saves(manager, saving)  # A failed save stops the run now.
        stop = preempted(step)
        last = step == t.num_steps
        is_save = stop or last or step % t.checkpoint_every == 0
        is_eval = evaluate_fn and (
            last or (t.eval_every and step % t.eval_every == 0))
        if is_save or is_eval:
          progress.add(*pending)  # Raises or skips on non-finite first.
          pending = None
        if is_save:
          save(step)
        if stop:
          logging.warning('Preempted: saving step %d, then exiting.', step)
          break
        if is_eval:
          evaluate(step)
      if progress.count:
        progress.flush(step)
    checkpoint.check_saves(manager, saving, wait=True)
  except checkpoint.SaveError:
    raise
  except BaseException:
    try:  # Whatever stopped the run, the saves already made are finished.
      manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-exception-caught
      logging.error('A checkpoint save failed too: %s', e)
    raise
  finally:
    manager.close()
    writer.close()
  if step < t.num_steps:
    raise Preempted(step, workdir, state)
  return state
