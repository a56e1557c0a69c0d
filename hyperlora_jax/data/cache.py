"""Latent and prompt-embedding cache, for runs whose encoders are frozen.

`write_cache(data, split, encode_images, encode_prompts)` runs the encoders
once over a split and writes, under
<dataset dir>/cache/<data.cache_name>/<split>/ (pipeline.cache_dir):
  latents.npy     [N, ...] encode_images(targets), in record order; targets
                  are float32 [b, R, R, 3] in [-1, 1] at data.resolution.
  prompt_emb.npy  [U, ...] encode_prompts(list of the U distinct prompts of
                  every prompt kind of the split; a few hundred, not N).
  meta.json       resolution, num_examples, and per prompt kind ('prompt',
                  'prompt_static', 'prompt_full') the row of each record's
                  prompt in prompt_emb. Written last: it marks completion.
The encoders are callables (written elsewhere); name the cache after them
(data.cache_name, e.g. 'sd15'). With data.use_cache=True the pipeline adds
'latents' and 'prompt_emb' (of data.prompt) to every batch.

  python -m hyperlora_jax.data.cache --data.name=synthetic \
      --data.data_dir=DIR --data.cache_name=sd15 \
      --encoders=my.module:make_encoders --splits=train,test

where make_encoders(data) returns (encode_images, encode_prompts). Run it on
one host; every host then reads the same files.
"""

import importlib
import json

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

from hyperlora_jax.data import builders
from hyperlora_jax.data import pipeline

_PROMPT_KINDS = ('prompt', 'prompt_static', 'prompt_full')


def write_cache(data, split, encode_images, encode_prompts, *,
                batch_size=64):
  """Encodes `split` once and writes the cache; returns its folder."""
  data = data.copy_and_resolve_references()
  data.use_cache, data.prompt = False, 'scene'
  builder = builders.build(data)
  out = pipeline.cache_dir(builder, data.cache_name, split)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'meta.json').unlink(missing_ok=True)  # Incomplete until rewritten.
  num = builder.info.splits[split].num_examples
  latents = None
  prompts = {}
  for batch in pipeline.create_dataset(data, split, process_index=0,
                                       process_count=1, num_epochs=1,
                                       shuffle=False, batch_size=batch_size):
    valid = batch['valid']
    # Whole (padded) batches: one input shape, one compile of a jit'd encoder.
    z = np.asarray(encode_images(batch['target']))[valid]
    if latents is None:  # Shape known now; write in place, not in memory.
      latents = np.lib.format.open_memmap(
          out / 'latents.npy', mode='w+', dtype=z.dtype,
          shape=(num,) + z.shape[1:])
    latents[batch['index'][valid]] = z
    for kind in _PROMPT_KINDS:
      if kind in batch:
        prompts.setdefault(kind, [None] * num)
        for i, p in zip(batch['index'][valid], batch[kind][valid]):
          prompts[kind][i] = str(p)
  latents.flush()
  texts = sorted({p for ps in prompts.values() for p in ps})
  row = {t: i for i, t in enumerate(texts)}
  emb = np.concatenate([np.asarray(encode_prompts(texts[i:i + batch_size]))
                        for i in range(0, len(texts), batch_size)])
  np.save(out / 'prompt_emb.npy', emb)
  meta = {'resolution': data.resolution, 'num_examples': num,
          'prompt_ids': {k: [row[p] for p in ps] for k, ps in prompts.items()}}
  (out / 'meta.json').write_text(json.dumps(meta))
  return out


def main(argv):
  del argv
  module, fn = _ENCODERS.value.split(':')
  encode_images, encode_prompts = getattr(
      importlib.import_module(module), fn)(_DATA.value)
  for split in _SPLITS.value:
    print(write_cache(_DATA.value, split, encode_images, encode_prompts,
                      batch_size=_BATCH.value))


if __name__ == '__main__':
  _DATA = config_flags.DEFINE_config_dict('data', pipeline.default_config())
  _ENCODERS = flags.DEFINE_string(
      'encoders', None, 'module:function; function(data) returns '
      '(encode_images, encode_prompts).', required=True)
  _SPLITS = flags.DEFINE_list('splits', ['train', 'test'], 'Splits to cache.')
  _BATCH = flags.DEFINE_integer('batch_size', 64, 'Encoder batch size.')
  app.run(main)
