r"""Pre-optimization: every training identity's own LoRA weights, many identities at once.

  python -m hyperlora_jax.main --config=configs/sd15_hyperdreambooth.py:targets \
      --config.model.pretrained=SD15 --config.data.source_dir=FACES --workdir=RUN
  (configs/quickstart_hdb.py's ``targets`` stage; any config with objective='lora_bank')

A lora_bank run (`objectives.lora_bank`) fits one LoRA of config.bank.param's
parameterization (LiDB or plain: the numbers a hypernetwork predicts) to the images of
each identity of the data's train split, with the diffusion loss and the batch's prompt
(data.prompt='static': the supervisory prompt, 'a [V] face'). config.bank.subjects_per_step
identities are fitted together, one image of each in every step, config.train.num_steps
steps in one compiled call (`train.fit`), their rows split over the devices of one host
(config.mesh). Each such group becomes one shard of the run's target-weights dataset
(`convert.target_weights`); index.json, keyed by identity, is written when every shard is.
A rerun (after an interruption) fits only the identities of missing shards, with the
config the finished ones were fitted with (another is refused, naming the keys). A hyperlora
run reads the dataset for its weight-space loss (hypernet.loss.targets = this workdir).

The same run fits a LoRA zoo (issue 17): config.bank.group says what a subject is
('content': an item's unstyled images; 'style': a style's images over many items),
config.bank.split which split's subjects, and config.bank.lora_format='diffusers'|'kohya'
also writes each subject's LoRA as a standard file, loras/<subject>.safetensors.
"""
import json
import os
import time

import jax
import numpy as np
from absl import logging

from hyperlora_jax import files
from hyperlora_jax import lora as lora_lib
from hyperlora_jax import objectives
from hyperlora_jax import runs
from hyperlora_jax import sharding
from hyperlora_jax import train
from hyperlora_jax.convert import lora_files
from hyperlora_jax.convert import target_weights
from hyperlora_jax.data import pipeline
from hyperlora_jax.objectives import lora_bank


def finished(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, target_weights.INDEX))


def _check_resume(config, workdir: str, done: dict) -> None:
  """The missing shards are fitted as the finished ones were: a rerun whose config
  differs from theirs (but for the layout, train.LAYOUT) is refused, naming the keys."""
  path = os.path.join(workdir, 'config.json')
  if not done or not os.path.exists(path):
    return
  with open(path) as f:
    refused, _ = train.refused_changes(json.load(f), json.loads(config.to_json_best_effort()),
                                       allow_changes=False)
  if refused:
    raise ValueError(f'{workdir} holds {len(done)} shards fitted with another config:\n  '
                     + '\n  '.join(refused) + '\nRerun with that config, or fit into a '
                     'new workdir.')


def _chunks(keys, n):
  return [keys[i:i + n] for i in range(0, len(keys), n)]


def run(config, workdir: str) -> dict:
  """Fits every train-split identity not fitted yet; returns the index (as written)."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  done = target_weights.finished_shards(workdir)
  _check_resume(config, workdir, done)
  files.write_text(os.path.join(workdir, 'config.json'), config.to_json_best_effort(indent=2))
  records = pipeline.subject_records(config.data, config.bank.split, config.bank.group)
  n = config.bank.subjects_per_step
  chunks = _chunks(list(records), n)
  for k, identities in done.items():
    if k >= len(chunks) or identities != chunks[k]:
      raise ValueError(f'{workdir} holds {target_weights.shard_name(k)} of other identities '
                       'than this data and config.bank.subjects_per_step give: fit into a '
                       'new workdir.')
  todo = [k for k in range(len(chunks)) if k not in done]
  logging.info('Pre-optimization: %d identities in %d shards of %d, %d to fit (%d done).',
               len(records), len(chunks), n, len(todo), len(done))
  if todo:
    _fit_shards(config, workdir, records, chunks, todo)
  return target_weights.write_index(workdir)


def _fit_shards(config, workdir, records, chunks, todo):
  if jax.process_count() > 1:  # Shards are read back from every device's rows.
    raise ValueError('Pre-optimization runs on one host (its devices share each step); '
                     f'this job has {jax.process_count()} processes.')
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  if config.bank.subjects_per_step % mesh.size:
    raise ValueError(f'bank.subjects_per_step={config.bank.subjects_per_step} must be a '
                     f'multiple of the {mesh.size} devices.')
  init_rng, fit_rng = jax.random.split(jax.random.key(config.seed))
  objective = objectives.build(config, init_rng)
  models = objective.models
  frozen = sharding.place(objective.frozen, sharding.tree_shardings(
      objective.frozen, mesh, tuple(config.mesh.rules), config.mesh.shard_min_size))
  rows = sharding.batch_sharding(mesh)
  on_rows = lambda tree: sharding.place(tree, jax.tree.map(lambda _: rows, tree))
  fit = train.fit(objective.loss_fn, lora_bank.subject_batch, config.optim, config.train.remat)
  fields = lora_lib.raw_fields(config.bank.param)
  n = config.bank.subjects_per_step
  most = max(len(r) for r in records.values())  # One shape for every shard: one compile.
  for step, k in enumerate(todo):
    identities = chunks[k]
    indices = [i for key in identities for i in records[key]]
    batch = pipeline.load_records(config.data, config.bank.split, indices)
    owner = np.array([key for key in identities for _ in records[key]])
    mine = {key: owner == key for key in identities}
    padded = identities + [identities[-1]] * (n - len(identities))  # a short last shard
    data = lora_bank.cache_latents(models, frozen, lora_bank.subject_data(
        models, [batch['target'][mine[key]] for key in padded],
        [list(batch['prompt'][mine[key]]) for key in padded], most))
    start = time.perf_counter()
    params, loss = fit(on_rows(objective.trainable),
                       frozen, on_rows(data), config.train.num_steps,
                       np.float32(config.optim.lr), jax.random.fold_in(fit_rng, k))
    raw = [np.asarray(g)[:len(identities)] for g in lora_bank.groups(params)]
    seconds = time.perf_counter() - start
    target_weights.write_shard(workdir, k, identities, raw, fields, models.targets)
    if config.bank.lora_format:
      _write_loras(config, objective, params, frozen, workdir, identities)
    logging.info('Shard %d (%d/%d): %d identities x %d steps in %.1f s%s, last loss %.4f.',
                 k, step + 1, len(todo), len(identities), config.train.num_steps, seconds,
                 ' (compile included)' if step == 0 else '', float(loss))


def lora_file(workdir: str, subject: str) -> str:
  """Where a zoo's LoRA of `subject` is: loras/<subject, spaces as '_'>.safetensors."""
  name = ''.join(c if c.isalnum() or c in '-.' else '_' for c in subject)
  return os.path.join(workdir, 'loras', f'{name}.safetensors')


def _write_loras(config, objective, params, frozen, workdir, identities):
  """Each fitted subject's LoRA as a standard file (`convert.lora_files`)."""
  tree = objective.lora(params, frozen, {
      objective.spec.lora_inputs[0]: np.arange(len(identities))})
  os.makedirs(os.path.join(workdir, 'loras'), exist_ok=True)
  for subject, lora in zip(identities, runs.plain_loras(tree)):
    path = lora_file(workdir, subject)
    if config.bank.lora_format == 'kohya':
      lora_files.save_kohya_lora(lora, path, metadata={'hyperlora_jax.subject': subject},
                                 unet_config=objective.models.unet_config)
    else:
      lora_files.save_diffusers_lora(lora, path, metadata={'hyperlora_jax.subject': subject})
