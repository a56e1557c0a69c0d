"""Input pipeline: built TFDS data -> per-host batches of numpy arrays.

  data = default_config()  # The config.data section; fields below.
  it = create_dataset(data, 'train')  # Endless, shuffled: for training.
  batch = next(it)
  state = it.get_state()  # JSON-able dict: save it with the checkpoint.
  it = create_dataset(data, 'train'); it.set_state(state)  # Resume.
  for batch in create_dataset(data, 'test', num_epochs=1, shuffle=False): ...

`create_dataset` returns a grain `DatasetIterator` (`next`, `get_state`,
`set_state`; Orbax saves it with `grain.checkpoint.CheckpointSave`). The
state is only meaningful for the same config, split and host count.

Why grain over the TFDS array_record data source (not tf.data): random
access by record index makes the order a pure function of (seed, epoch,
position), so sharding is exact, shuffling needs no buffer, and the iterator
state is one integer (`next_index`) instead of a tf.data checkpoint of
buffers; and nothing needs TensorFlow.

Sharding: host p of P owns records [p*N//P, (p+1)*N//P) of the split and
reads only those: disjoint, and together complete. Each host shuffles its
own block (a new order each epoch) and batches data.batch_size // P of them.
Endless iteration (num_epochs=None) drops nothing and needs no padding.
With a finite num_epochs every host yields the same number of full batches
(so multi-host eval steps stay in lockstep): blocks are padded to the
largest block, and the last batch is padded, with 'valid' False there.

Batch (numpy, leading dim B = per-host batch size):
  'context', 'target'  float32 [B, R, R, 3] in [-1, 1]: resized (shorter
                       side to R) and center-cropped; single-image data has
                       target = context.
  'prompt'             str [B], the prompt chosen by data.prompt.
  'condition'          float32 [B, R, R, 3] in [-1, 1], where the data has condition
                       images (a pose map: synthetic with data.pose, VITON-HD's
                       openpose_img/, triples' condition.*), resized as the target.
  'prompt_static'      str [B]; synthetic also 'prompt_scene', 'prompt_full'.
  'id'                 str [B] (file names / synthetic index).
  'identity'           str [B], the subject the example shows: the folder layouts' id,
                       the synthetic item ('a red circle with blue stripes').
  'subject'            int32 [B], the identity's index in `subject_keys` of the split
                       (a LoRA bank's row).
  'index'              int64 [B], record index in the split.
  'valid'              bool [B], False for padding.
  synthetic only: 'shape', 'color', 'pattern', 'color2', 'background',
                  'position' int32 [B]; 'box' int32 [B, 4] (x0, y0, x1, y1,
                  end-exclusive) of the item in the target; with data.pose,
                  'pose' float32 [B, 3] (dx, dy, scale: `synthetic.pose_of`).
  data.set_size N > 0: 'context' is [B, N, R, R, 3], a subject's set, with
                  'set_mask', 'region' and 'id_embed' (`data.subjects`).

The config.data keys are documented, with their defaults, in `hyperlora_jax.defaults`.

`python -m hyperlora_jax.data.pipeline --data.name=paired
--data.source_dir=DIR --data.data_dir=OUT` builds a dataset once (do this
before a multi-host run) and prints its splits, counts and one batch.
"""

import functools
import os

from absl import flags
import grain
from ml_collections import config_flags
import numpy as np

from hyperlora_jax import cli
from hyperlora_jax import defaults
from hyperlora_jax.data import augment
from hyperlora_jax.data import builders
from hyperlora_jax.data import images
from hyperlora_jax.data import subjects
from hyperlora_jax.data import synthetic

_PROMPT_KEYS = {'scene': 'prompt', 'static': 'prompt_static',
                'full': 'prompt_full'}


def _field(value):
  """TFDS gives text as bytes and int32 scalars as Python ints."""
  if isinstance(value, bytes):
    return value.decode()
  return np.int32(value) if isinstance(value, int) else value


def identity_of(example) -> str:
  """The subject an example shows: the synthetic item's phrase, else its id."""
  if 'color2' in example:
    return synthetic.item_phrase(*(int(example[k]) for k in
                                   ('shape', 'color', 'pattern', 'color2')))
  return _field(example['id'])


def _style(example):
  if 'style' not in example:
    raise ValueError('Grouping by style needs styled data: set data.styles=True.')
  return int(example['style'])


# What groups a split's examples into the subjects of a LoRA bank: None leaves an
# example out. A zoo's content LoRAs are its items in no style, its style LoRAs its styles.
GROUPINGS = {
    'identity': identity_of,
    'content': lambda ex: identity_of(ex) if _style(ex) == 0 else None,
    'style': lambda ex: synthetic.STYLES[_style(ex)] if _style(ex) else None,
}

# (built data path, split, grouping) -> {subject: record indices}, sorted
_RECORDS = {}


def _records(builder, split, by='identity') -> dict:
  if by not in GROUPINGS:
    raise ValueError(f'Unknown grouping {by!r}; one of {sorted(GROUPINGS)}.')
  key = (str(builder.data_path), split, by)
  if key not in _RECORDS:  # Built data never changes, so one scan per process.
    source = builder.as_data_source(split=split)
    found = {}
    for i in range(len(source)):
      subject = GROUPINGS[by](source[i])
      if subject is not None:
        found.setdefault(subject, []).append(i)
    _RECORDS[key] = dict(sorted(found.items()))
  return _RECORDS[key]


def _subjects(builder, split) -> tuple:
  return tuple(_records(builder, split))


def subject_keys(data, split) -> tuple:
  """The identities of `split`'s examples, sorted: an example's 'subject' is its
  identity's index here (the rows of a LoRA bank fitted on the split)."""
  return _subjects(builders.build(data), split)


def subject_records(data, split, by='identity') -> dict:
  """{subject: its examples' record indices in `split`}, sorted by subject; by
  `GROUPINGS`' rule ('identity': `subject_keys`' order)."""
  return _records(builders.build(data), split, by)


def load_records(data, split, indices) -> dict:
  """The examples at record `indices` of `split`, stacked as a batch (numpy)."""
  builder = builders.build(data)
  source = builder.as_data_source(split=split)
  subject_of = {k: i for i, k in enumerate(_subjects(builder, split))}
  rows = [_load(source, len(source), 0, data, subject_of, i) for i in indices]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _load(source, stop, pad_index, data, subject_of, index):
  """Example `index` of the split; from `stop` on: padding, `pad_index`."""
  valid = index < stop
  index = index if valid else pad_index
  ex = source[index]
  if 'images' in ex:  # A subject's files: `subjects.make_set` decodes the ones it draws.
    return dict(ex, id=_field(ex['id']), prompt_static=_field(ex['prompt_static']),
                index=np.int64(index), valid=valid)
  out = {k: _field(v) for k, v in ex.items()
         if k not in ('context', 'target', 'condition')}
  context = images.fit(ex['context'], data.resolution)
  target = images.fit(ex['target'], data.resolution) if 'target' in ex else context
  if data.context == 'target':  # The subject's own photo is its context.
    context = target
  out['identity'] = identity_of(out)
  out.update(context=images.normalize(context), target=images.normalize(target),
             index=np.int64(index), valid=valid,
             subject=np.int32(subject_of[out['identity']]))
  if 'condition' in ex:  # Built at the target's size: the same resize and crop.
    out['condition'] = images.normalize(images.fit(ex['condition'], data.resolution))
  if 'prompt_full' in out:  # Synthetic: keep the scene prompt by name.
    out['prompt_scene'] = out['prompt']
  key = _PROMPT_KEYS[data.prompt]
  if key not in out:
    raise ValueError(f'data.prompt={data.prompt!r} but {data.name} has no '
                     f'{key}')
  out['prompt'] = out[key]
  return out


def _augment(config, ex, rng):
  context = augment.context(images.to_uint8(ex['context']), rng, config)
  return dict(ex, context=images.normalize(context))


def _pad_batch(batch_size, batch):
  """Pads a short final batch with copies of its last row, valid=False."""
  n = len(batch['valid'])
  if n == batch_size:
    return batch
  pad = {k: np.repeat(v[-1:], batch_size - n, axis=0) for k, v in batch.items()}
  pad['valid'][:] = False
  return {k: np.concatenate([v, pad[k]]) for k, v in batch.items()}


def create_dataset(data, split, *, process_index=None, process_count=None,
                   num_epochs=None, shuffle=True, batch_size=None, augment=False):
  """This host's batches of `split`, as a resumable grain iterator.

  Args:
    data: the data config section (`default_config()`).
    split: 'train' or 'test'.
    process_index: this host's index (default: jax.process_index()).
    process_count: number of hosts (default: jax.process_count()).
    num_epochs: None for endless iteration, else that many epochs with every
      host yielding the same number of full batches ('valid' marks padding).
    shuffle: shuffle each epoch (seeded by data.seed) within the host's block.
    batch_size: global batch size (default data.batch_size), divided among
      the hosts.
    augment: training draws: context-image variations (`data.augment`), or which
      pictures of each subject's set count (`subjects.make_set`).

  Returns:
    A grain DatasetIterator of batch dicts (module docstring).
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  batch_size = batch_size or data.batch_size
  if batch_size % process_count:
    raise ValueError(f'batch_size {batch_size} is not divisible by '
                     f'{process_count} hosts')
  batch_size //= process_count
  if data.context not in ('context', 'target'):
    raise ValueError(f"data.context must be 'context' or 'target', not {data.context!r}")
  builder = builders.build(data)
  if split not in builder.info.splits:
    raise ValueError(f'{builder.data_path} has no split {split!r}; it has '
                     f'{sorted(builder.info.splits)}')
  source = builder.as_data_source(split=split)
  num = len(source)
  if not num:
    raise ValueError(f'split {split!r} of {builder.data_path} is empty')
  start = process_index * num // process_count
  stop = (process_index + 1) * num // process_count
  if num_epochs is None:
    if start == stop:
      raise ValueError(f'split {split!r} has {num} examples, fewer than '
                       f'{process_count} hosts')
    length = stop - start
  else:
    length = -(-num // process_count)  # Every host: the largest block.
  ds = grain.MapDataset.range(start, start + length)
  if shuffle:
    ds = ds.shuffle(seed=data.seed)
  subject_of = {k: i for i, k in enumerate(_subjects(builder, split))}
  ds = ds.repeat(num_epochs).map(
      # Padding repeats a record of the host's own block, if it has one.
      functools.partial(_load, source, stop, start if start < stop else 0,
                        data, subject_of))
  if data.set_size:
    if data.augment.p:
      raise ValueError('data.augment varies single context images; a set of them '
                       '(data.set_size) has its own variation: set data.augment.p=0.')
    # Seeded from the element's position in the stream: resumable, new each epoch.
    ds = ds.random_map(functools.partial(subjects.make_set, data, augment, split),
                       seed=data.seed)
  elif augment and data.augment.p:
    ds = ds.random_map(functools.partial(_augment, data.augment), seed=data.seed)
  elif 'images' in source[0]:
    raise ValueError(f'{builder.data_path} holds sets of images per subject: give '
                     'data.set_size (how many pictures of a subject an example shows).')
  ds = ds.batch(batch_size, drop_remainder=num_epochs is None)
  if num_epochs is not None:
    ds = ds.map(functools.partial(_pad_batch, batch_size))
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=data.num_threads, prefetch_buffer_size=data.prefetch))
  workers = data.num_workers
  if workers:
    workers = min(os.cpu_count() or 1, 16) if workers < 0 else workers
    if not flags.FLAGS.is_parsed():
      raise ValueError(
          f'data.num_workers={data.num_workers} starts grain worker processes, which '
          'read absl flags: parse them first (run under absl.app.run, as '
          'hyperlora_jax.main does, or call absl.flags.FLAGS.mark_as_parsed()), or '
          'set data.num_workers=0.')
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=2), worker_init_fn=_quiet_worker)
  return iter(ds)


def _quiet_worker(index, count):  # pylint: disable=unused-argument
  """In each grain worker: the libraries' routine lines hidden, as in the main process
  (each worker's TFDS builder otherwise logs its "custom data configuration")."""
  cli.quiet_libraries()


def for_training(config, split, process_index, process_count):
  """The training loop's dataset: endless, shuffled, augmented batches of
  config.train.batch_size (the loop's `create_dataset`)."""
  return create_dataset(config.data, split, process_index=process_index,
                        process_count=process_count, batch_size=config.train.batch_size,
                        augment=True)


def main(argv):
  del argv
  data = flags.FLAGS.data
  builder = builders.build(data, rebuild=flags.FLAGS.rebuild)
  print(builder.data_path)
  for name, split in builder.info.splits.items():
    print(f'{name}: {split.num_examples} examples')
  if builder.info.metadata:
    print(dict(builder.info.metadata))
  first = sorted(builder.info.splits)[0]
  batch = next(create_dataset(data, first, process_index=0,
                              process_count=1, num_epochs=1, shuffle=False))
  for k, v in batch.items():
    print(k, v.shape, v.dtype, v[0] if v.ndim == 1 else '')


def run():
  """The console script (`hyperlora-build-data`)."""
  # Flags only here: importing the module must not define global flags.
  config_flags.DEFINE_config_dict('data', defaults.get_config().data)
  flags.DEFINE_bool('rebuild', False, 'Rebuild even if built.')
  cli.run(__name__, main)


if __name__ == '__main__':
  run()
