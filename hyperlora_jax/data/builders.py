"""TFDS builders: synthetic task, paired folders, single images, triples.

Why TFDS + array_record (read later through grain, see pipeline.py): the
built data is a versioned, random-access file set with a recorded split size,
so every host can read exactly its own records in a seeded order and a
resumed run can jump to any position without replaying the stream. Nothing
here needs TensorFlow: images are stored as encoded bytes (the file's own
JPEG/PNG bytes when it is already RGB, else PNG after conversion) in a
`Tensor(dtype=object)` feature, because `tfds.features.Image` encodes with
TensorFlow (a ~600 MB install) and re-encoding would change user JPEGs.

Layouts on disk (`root` comes from the builder config):

paired (VITON-HD):
  root/train_pairs.txt     one '<target image> <context image>' per line
  root/train/image/<target image>   root/train/cloth/<context image>
  root/train/openpose_img/<target stem>_rendered.png   optional: the target's pose
                           map (VITON-HD's names), the example's 'condition'
  root/test_pairs.txt, root/test/...   (same; either split may be absent)
  root/prompts.jsonl       optional, one {"context": name, "target": name,
                           "prompt": text} per pair (names are base names);
                           pairs without a line get the static prompt.
single (HyperDreamBooth, one image per identity):
  root/train/<id>.<ext>, root/test/<id>.<ext>, or root/<id>.<ext> (= train);
  the prompt is the static prompt ('a [V] face').
triples (any paired task):
  root/<split>/<example id>/context.<ext>, target.<ext>, prompt.txt
  (prompt.txt optional: falls back to the static prompt), condition.<ext> (optional:
  a condition image, e.g. the target's pose map).
subjects (several images per identity: ByteDance HyperLoRA's recipe, `data.subjects`):
  root/<split>/<subject>/<image>.<ext>   one or more images of the subject
  beside an image X (all optional): X.json {"box": [x0, y0, x1, y1]}, its identity
  region in its pixels; X.npy, its identity embedding (e.g. ArcFace's 512 numbers);
  X.txt, its caption (else <subject>/prompt.txt, else the static prompt). Or one file
  for all: root/regions.json {"<subject>/<image file>": [x0, y0, x1, y1]},
  root/embeddings.npz {"<subject>/<image stem>": embedding}. Once any region (or
  embedding) is given, every image needs one: a region file that does not cover an
  image, or a region outside it, is a bad example naming the image; without any
  region, an image's region is the whole image.

Every example has 'context' (bytes), 'prompt', 'prompt_static' and 'id'
(text); all but single have 'target' (bytes). Synthetic adds 'prompt_full',
the attribute ids and the item's 'box' in the target; with data.pose, its 'pose' and
its pose map as 'condition'.

Condition images: a paired folder with an openpose_img/ in any split, or a triples
folder with a condition.* in any example, gives every example a 'condition' (bytes);
an example without one is a bad example (below). A condition image of another size
than its target is resized to the target's size (counted in
`metadata['resized']`), so the pipeline's resize and crop treat the two alike.

Bad input never becomes a silent wrong sample. An unreadable or missing
image, a listed pair whose file is absent, a malformed line: with
on_bad_example='error' the build stops with an error naming the file; with
'skip' the example is skipped with a warning and counted in
`builder.info.metadata['skipped'][split]`. A grayscale / RGBA (composited
on white) / CMYK / palette / 16-bit image is converted to RGB with a logged
note and counted in `metadata['converted']` if convert_modes, else treated
as bad; `metadata['static_prompt']` counts prompts that fell back to the
static one. An empty split is an error, or with 'skip' it is left out with a
warning; a split whose examples were all bad is always an error.
"""

import collections
import dataclasses
import hashlib
import io
import json
import os
import pathlib

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from hyperlora_jax.data import images as image_io
from hyperlora_jax.data import subjects
from hyperlora_jax.data import synthetic

VERSION = '1.0.0'
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.webp', '.bmp', '.tif', '.tiff')
# Per-split counts kept in builder.info.metadata: bad examples left out,
# images converted to RGB, prompts that fell back to the static prompt.
_COUNTS = ('skipped', 'converted', 'static_prompt', 'resized')


class BadExample(Exception):
  """An example that cannot be built; the message names the file."""


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
  resolution: int = 32
  num_train: int = 1000
  num_test: int = 200
  seed: int = 0
  holdout_seed: int = 0
  test_fraction: float = 0.2
  item_frac: float = synthetic.ITEM_FRAC
  pose: bool = False
  styles: bool = False


@dataclasses.dataclass
class FolderConfig(tfds.core.BuilderConfig):
  root: str = ''
  prompts_file: str = ''  # Paired only; '' -> root/prompts.jsonl if present.
  static_prompt: str = ''  # '' -> the builder's STATIC_PROMPT.
  on_bad_example: str = 'error'  # Or 'skip'.
  convert_modes: bool = True


def _config_name(prefix, fields):
  """Config names encode every build parameter: a changed one rebuilds."""
  digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode())
  return f'{prefix}_{digest.hexdigest()[:10]}'


def synthetic_config(resolution=32, num_train=1000, num_test=200, seed=0,
                     holdout_seed=0, test_fraction=0.2,
                     item_frac=synthetic.ITEM_FRAC, pose=False, styles=False):
  fields = dict(resolution=resolution, num_train=num_train,
                num_test=num_test, seed=seed, holdout_seed=holdout_seed,
                test_fraction=test_fraction)
  # In the name only when not the default: data built before item_frac, pose and
  # styles existed keeps its name (and folder), any other value gets its own.
  named = dict(fields, item_frac=float(item_frac)) if (
      item_frac != synthetic.ITEM_FRAC) else dict(fields)
  if pose:
    named['pose'] = True
  if styles:
    named['styles'] = True
  return SyntheticConfig(name=_config_name(f'r{resolution}', named),
                         version=VERSION, item_frac=float(item_frac), pose=bool(pose),
                         styles=bool(styles), **fields)


def folder_config(root, prompts_file='', static_prompt='',
                  on_bad_example='error', convert_modes=True):
  if on_bad_example not in ('error', 'skip'):
    raise ValueError(f"on_bad_example must be 'error' or 'skip', got "
                     f'{on_bad_example!r}')
  root = os.path.abspath(os.path.expanduser(root))
  fields = dict(root=root, prompts_file=prompts_file,
                static_prompt=static_prompt, on_bad_example=on_bad_example,
                convert_modes=convert_modes)
  prefix = ''.join(c if c.isalnum() else '_' for c in os.path.basename(root))
  return FolderConfig(name=_config_name(prefix or 'root', fields),
                      version=VERSION, **fields)


def _text_features(*names):
  return {n: tfds.features.Text() for n in names}


_BYTES = tfds.features.Tensor(shape=(), dtype=np.object_)


def source_fingerprint(root, extra=()) -> dict:
  """{'files': count, 'digest': ...} of every file under `root` (and the `extra` files):
  relative names, sizes and modification times, so adding, removing, replacing or
  editing a file changes it. Stored with a built folder dataset (`build`)."""
  digest, count = hashlib.sha1(), 0
  root = pathlib.Path(root)
  paths = sorted(p for p in root.rglob('*') if p.is_file())
  paths += [pathlib.Path(e) for e in extra if e and pathlib.Path(e).is_file()]
  for p in paths:
    stat = p.stat()
    digest.update(f'{p.relative_to(root) if p.is_relative_to(root) else p}\0'
                  f'{stat.st_size}\0{stat.st_mtime_ns}\n'.encode())
    count += 1
  return {'files': count, 'digest': digest.hexdigest()}


class _Builder(tfds.core.GeneratorBasedBuilder):
  """TFDS' builder, saying in our words what it builds: its own lines print a
  'download: Unknown size' for data made here, bypassing the log."""

  def _log_download_bytes(self):
    logging.info('Building the %s dataset once, in %s ...', self.name, self.data_dir)

  def _log_download_done(self):
    logging.info('Built %s; later runs reuse it.', self.data_dir)


class _FolderBuilder(_Builder):
  """Shared reading, conversion and bad-example policy of folder builders."""

  VERSION = tfds.core.Version(VERSION)
  STATIC_PROMPT = ''
  HAS_TARGET = True

  def _info(self):
    features = _text_features('prompt', 'prompt_static', 'id')
    features['context'] = _BYTES
    if self.HAS_TARGET:
      features['target'] = _BYTES
    if self._has_condition():
      features['condition'] = _BYTES
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict(features),
        metadata=tfds.core.MetadataDict({k: {} for k in _COUNTS}))

  @property
  def _cfg(self):
    return self.builder_config

  @property
  def _root(self):
    root = pathlib.Path(self._cfg.root)
    if not root.is_dir():
      raise FileNotFoundError(f'{self.name}: data folder {root} not found '
                              '(set data.source_dir)')
    return root

  def fingerprint(self) -> dict:
    return source_fingerprint(self._root, [self._cfg.prompts_file])

  def _has_condition(self) -> bool:
    """Whether the folder holds condition images (then every example needs one)."""
    return False

  def _condition(self, path, target: bytes, split) -> bytes:
    """The condition image at `path` (BadExample when missing or unreadable), at the
    size of the `target` bytes: resized (and counted) when it is another."""
    if not pathlib.Path(path).exists():
      raise BadExample(f'{path}: file not found (the condition image: the dataset has '
                       'condition images, so every example needs one)')
    data = self._image(path, split)
    size, want = image_io.size_of(data), image_io.size_of(target)
    if size != want:
      logging.info("%s: condition image of %dx%d resized to its target's %dx%d", path,
                   *size, *want)
      self._counts[split]['resized'] += 1
      data = image_io.resized(data, want)
    return data

  @property
  def _static_prompt(self):
    return self._cfg.static_prompt or self.STATIC_PROMPT

  def _image(self, path, split):
    """Encoded RGB image bytes of `path` (`image_io.rgb_bytes`: the one loader the
    tools share), or BadExample naming it."""
    try:
      data, converted = image_io.rgb_bytes(str(path), self._cfg.convert_modes)
    except (FileNotFoundError, ValueError) as e:
      raise BadExample(str(e)) from None
    if converted:
      logging.info('%s: converted %s to RGB', path, converted)
      self._counts[split]['converted'] += 1
    return data

  def _generate_examples(self, split, items):
    """Yields (key, example) of items [(key, make)], applying the policy."""
    self._counts[split] = collections.Counter()
    n_ok = 0
    for key, make in items:
      try:
        example = make()
      except BadExample as e:
        if self._cfg.on_bad_example == 'error':
          raise BadExample(f"{self.name} split '{split}': {e} (or set "
                           "on_bad_example='skip')") from None
        logging.warning("%s split '%s': skipping: %s", self.name, split, e)
        self._counts[split]['skipped'] += 1
        continue
      n_ok += 1
      yield key, example
    counts = self._counts[split]
    if n_ok == 0:
      raise BadExample(f"{self.name} split '{split}' under {self._root}: all "
                       f'{counts["skipped"]} examples are bad')
    for what in _COUNTS:
      self.info.metadata[what][split] = counts[what]
    # A warning when anything was skipped or converted: users must see it.
    log = logging.warning if counts['skipped'] + counts['converted'] else (
        logging.info)
    log("%s split '%s': %d examples; %s", self.name, split, n_ok,
        ', '.join(f'{counts[k]} {k}' for k in _COUNTS))

  def _split_generators(self, dl_manager):
    del dl_manager
    self._counts = {}
    self.info.metadata['source'] = self.fingerprint()
    gens = {}
    for split, items in self._list_splits().items():
      if items:
        gens[split] = self._generate_examples(split, items)
      elif self._cfg.on_bad_example == 'skip':
        logging.warning('%s: split %s under %s is empty; left out', self.name,
                        split, self._root)
      else:
        raise BadExample(f"{self.name}: split '{split}' under {self._root} "
                         "is empty (or set on_bad_example='skip')")
    if not gens:
      raise BadExample(f'{self.name}: no examples under {self._root}')
    return gens

  def _list_splits(self):
    """{split: [(key, make)]} where make() builds one example."""
    raise NotImplementedError


class PairedFolders(_FolderBuilder):
  """VITON-HD layout: cloth (context) and image (target), prompts JSONL."""

  name = 'hyperlora_paired'
  STATIC_PROMPT = 'a person wearing S*'

  def _has_condition(self):
    root = pathlib.Path(self._cfg.root)
    return any((root / split / 'openpose_img').is_dir() for split in ('train', 'test'))

  def _prompts(self):
    path = pathlib.Path(self._cfg.prompts_file or self._root / 'prompts.jsonl')
    if not path.exists():
      if self._cfg.prompts_file:
        raise FileNotFoundError(f'prompts file {path} not found')
      return {}
    prompts = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        key = (os.path.basename(row['context']),
               os.path.basename(row['target']))
        prompts[key] = str(row['prompt'])
      except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f'{path}:{i}: expected {{"context", "target", '
                         f'"prompt"}}: {e!r}') from None
    return prompts

  def _list_splits(self):
    prompts = self._prompts()
    splits = {}
    for split in ('train', 'test'):
      pairs = self._root / f'{split}_pairs.txt'
      if not pairs.exists() and not (self._root / split).is_dir():
        continue
      lines = pairs.read_text().splitlines() if pairs.exists() else []
      splits[split] = [(f'{i}', self._maker(pairs, i, line, split, prompts))
                       for i, line in enumerate(lines, 1) if line.strip()]
    return splits

  def _maker(self, pairs, lineno, line, split, prompts):
    def make():
      names = line.split()
      if len(names) != 2:
        raise BadExample(f'{pairs}:{lineno}: expected "<image> <cloth>", got '
                         f'{line!r}')
      target, context = names
      try:
        images = {
            'context': self._image(self._root / split / 'cloth' / context,
                                   split),
            'target': self._image(self._root / split / 'image' / target,
                                  split)}
      except BadExample as e:
        raise BadExample(f'{e} (pair listed at {pairs}:{lineno})') from None
      if self._has_condition():
        pose = (self._root / split / 'openpose_img'
                / f'{pathlib.Path(target).stem}_rendered.png')
        try:
          images['condition'] = self._condition(pose, images['target'], split)
        except BadExample as e:
          raise BadExample(f'{e} (pair listed at {pairs}:{lineno})') from None
      prompt = prompts.get((context, target))
      if prompt is None:
        self._counts[split]['static_prompt'] += 1
      return {
          **images,
          'prompt': prompt or self._static_prompt,
          'prompt_static': self._static_prompt,
          'id': f'{target} {context}',
      }
    return make


class SingleImages(_FolderBuilder):
  """One image per identity (HyperDreamBooth); context is also the target."""

  name = 'hyperlora_single'
  STATIC_PROMPT = 'a [V] face'
  HAS_TARGET = False

  def _list_splits(self):
    dirs = {s: self._root / s for s in ('train', 'test')
            if (self._root / s).is_dir()}
    if not dirs:
      dirs = {'train': self._root}
    return {split: [(p.name, self._maker(p, split))
                    for p in sorted(d.iterdir())
                    if p.suffix.lower() in IMAGE_SUFFIXES]
            for split, d in dirs.items()}

  def _maker(self, path, split):
    def make():
      return {'context': self._image(path, split), 'id': path.stem,
              'prompt': self._static_prompt,
              'prompt_static': self._static_prompt}
    return make


class Triples(_FolderBuilder):
  """root/<split>/<id>/{context.*, target.*, prompt.txt}."""

  name = 'hyperlora_triples'
  STATIC_PROMPT = 'a photo of S*'

  def _has_condition(self):
    root = pathlib.Path(self._cfg.root)
    return any(p.suffix.lower() in IMAGE_SUFFIXES
               for split in ('train', 'test') for p in root.glob(f'{split}/*/condition.*'))

  def _list_splits(self):
    return {split: [(d.name, self._maker(d, split))
                    for d in sorted((self._root / split).iterdir())
                    if d.is_dir()]
            for split in ('train', 'test') if (self._root / split).is_dir()}

  def _maker(self, folder, split):
    def find(stem):
      found = [p for p in folder.glob(f'{stem}.*')
               if p.suffix.lower() in IMAGE_SUFFIXES]
      if len(found) != 1:
        raise BadExample(f'{folder}: expected one {stem}.<image suffix>, '
                         f'found {len(found)}')
      return found[0]

    def make():
      images = {'context': self._image(find('context'), split),
                'target': self._image(find('target'), split)}
      if self._has_condition():
        images['condition'] = self._condition(find('condition'), images['target'], split)
      prompt_file = folder / 'prompt.txt'
      prompt = prompt_file.read_text().strip() if prompt_file.exists() else ''
      if not prompt:
        self._counts[split]['static_prompt'] += 1
      return {**images, 'prompt': prompt or self._static_prompt,
              'prompt_static': self._static_prompt, 'id': folder.name}
    return make


class Subjects(_FolderBuilder):
  """root/<split>/<subject>/<images>, with regions and embeddings (module docstring)."""

  name = 'hyperlora_subjects'
  STATIC_PROMPT = 'a photo of a person'

  def _info(self):
    object_list = lambda: tfds.features.Tensor(shape=(None,), dtype=np.object_)
    features = _text_features('prompt_static', 'id')
    features.update(images=object_list(), names=object_list(), prompts=object_list(),
                    boxes=tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
                    sizes=tfds.features.Tensor(shape=(None, 2), dtype=np.int32),
                    embeds=tfds.features.Tensor(shape=(None, None), dtype=np.float32))
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict(features),
        metadata=tfds.core.MetadataDict({k: {} for k in _COUNTS}))

  def _list_splits(self):
    root = self._root
    regions_file, embeds_file = root / 'regions.json', root / 'embeddings.npz'
    self._regions = json.loads(regions_file.read_text()) if regions_file.exists() else {}
    self._embeds = dict(np.load(embeds_file)) if embeds_file.exists() else {}
    images = [p for p in root.rglob('*') if p.suffix.lower() in IMAGE_SUFFIXES]
    self._has = {'region': bool(self._regions) or any(
        p.with_suffix('.json').exists() for p in images),
                 'embedding': bool(self._embeds) or any(
                     p.with_suffix('.npy').exists() for p in images)}
    self._embed_size = None
    return {split: [(d.name, self._maker(d, split))
                    for d in sorted((root / split).iterdir()) if d.is_dir()]
            for split in ('train', 'test') if (root / split).is_dir()}

  def _region(self, path, size):
    sidecar = path.with_suffix('.json')
    key = f'{path.parent.name}/{path.name}'
    if sidecar.exists():
      try:
        box = json.loads(sidecar.read_text())['box']
      except (ValueError, KeyError, TypeError) as e:
        raise BadExample(f'{sidecar}: expected {{"box": [x0, y0, x1, y1]}} ({e!r})') from None
      where = str(sidecar)
    elif key in self._regions:
      box, where = self._regions[key], f'{self._root / "regions.json"} [{key!r}]'
    elif self._has['region']:
      raise BadExample(f'{path} has no identity region: the region file does not cover '
                       f'it (give {sidecar.name} or "{key}" in regions.json)')
    else:
      return [0, 0, *size]
    try:
      return subjects.check_box(box, *size, where)
    except ValueError as e:
      raise BadExample(str(e)) from None

  def _embedding(self, path):
    sidecar, key = path.with_suffix('.npy'), f'{path.parent.name}/{path.stem}'
    if sidecar.exists():
      vector, where = np.load(sidecar, allow_pickle=False), sidecar
    elif key in self._embeds:
      vector, where = self._embeds[key], f'{self._root / "embeddings.npz"} [{key!r}]'
    elif self._has['embedding']:
      raise BadExample(f'{path} has no identity embedding ({sidecar.name} or "{key}" in '
                       'embeddings.npz), as other images have')
    else:
      return np.zeros(0, np.float32)
    vector = np.asarray(vector, np.float32)
    if vector.ndim != 1 or (self._embed_size and vector.size != self._embed_size):
      raise BadExample(f'{where}: an identity embedding of shape {vector.shape}; the '
                       f'others have ({self._embed_size},)' if self._embed_size else
                       f'{where}: an identity embedding is one vector, not {vector.shape}')
    self._embed_size = vector.size
    return vector

  def _maker(self, folder, split):
    def make():
      paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
      if not paths:
        raise BadExample(f'{folder}: a subject with no images (a set needs at least one)')
      caption = folder / 'prompt.txt'
      caption = caption.read_text().strip() if caption.exists() else ''
      rows = []
      for path in paths:
        data = self._image(path, split)
        size = Image.open(io.BytesIO(data)).size
        own = path.with_suffix('.txt')
        prompt = own.read_text().strip() if own.exists() else caption
        if not prompt:
          self._counts[split]['static_prompt'] += 1
        rows.append((data, f'{folder.name}/{path.name}', prompt or self._static_prompt,
                     self._region(path, size), size, self._embedding(path)))
      data, names, prompts, boxes, sizes, embeds = zip(*rows)
      return {'images': np.array(data, object), 'names': np.array(names, object),
              'prompts': np.array(prompts, object),
              'boxes': np.array(boxes, np.float32), 'sizes': np.array(sizes, np.int32),
              'embeds': np.stack(embeds), 'prompt_static': self._static_prompt,
              'id': folder.name}
    return make


class Synthetic(_Builder):
  """The synthetic recontextualization task of synthetic.py."""

  name = 'hyperlora_synthetic'
  VERSION = tfds.core.Version(VERSION)
  _INTS = ('shape', 'color', 'pattern', 'color2', 'background', 'position')

  def _ints(self):
    return self._INTS + (('style',) if self.builder_config.styles else ())

  def _info(self):
    features = _text_features('prompt', 'prompt_static', 'prompt_full', 'id')
    features.update(context=_BYTES, target=_BYTES,
                    box=tfds.features.Tensor(shape=(4,), dtype=np.int32))
    features.update({k: np.int32 for k in self._ints()})
    if self.builder_config.pose:
      features.update(condition=_BYTES,
                      pose=tfds.features.Tensor(shape=(3,), dtype=np.float32))
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    return {'train': self._generate_examples('train', cfg.num_train),
            'test': self._generate_examples('test', cfg.num_test)}

  def _generate_examples(self, split, num):
    cfg = self.builder_config
    for i in range(num):
      ex = synthetic.example(
          i, split, resolution=cfg.resolution, seed=cfg.seed,
          holdout_seed=cfg.holdout_seed, test_fraction=cfg.test_fraction,
          item_frac=cfg.item_frac, pose=cfg.pose, styled=cfg.styles)
      out = {k: ex[k] for k in self._ints() + ('box', 'prompt_static',
                                               'prompt_full')}
      out.update(context=image_io.png_bytes(ex['context']),
                 target=image_io.png_bytes(ex['target']),
                 prompt=ex['prompt_scene'], id=str(i))
      if cfg.pose:
        out.update(condition=image_io.png_bytes(ex['condition']), pose=ex['pose'])
      yield i, out


_FOLDER_BUILDERS = {'paired': PairedFolders, 'single': SingleImages,
                    'triples': Triples, 'subjects': Subjects}


def static_prompt(data) -> str:
  """The static (supervisory) prompt of a data config's examples ('prompt_static')."""
  if data.name == 'synthetic':
    return synthetic.STATIC_PROMPT
  return data.static_prompt or _FOLDER_BUILDERS[data.name].STATIC_PROMPT


def make_builder(data):
  """The TFDS builder (not yet built) for a pipeline data config section."""
  kwargs = dict(data_dir=data.data_dir or None, file_format='array_record')
  if data.name == 'synthetic':
    return Synthetic(config=synthetic_config(
        data.resolution, data.num_train, data.num_test, data.seed,
        data.holdout_seed, data.test_fraction,
        # Configs saved before the fields existed lack them.
        data.get('item_frac', synthetic.ITEM_FRAC), data.get('pose', False),
        data.get('styles', False)), **kwargs)
  if data.name not in _FOLDER_BUILDERS:
    raise ValueError(f'unknown data.name {data.name!r}: expected synthetic, '
                     f'{", ".join(_FOLDER_BUILDERS)}')
  if not data.source_dir:
    raise ValueError(f'data.name={data.name!r} needs data.source_dir')
  return _FOLDER_BUILDERS[data.name](config=folder_config(
      data.source_dir, data.prompts_file, data.static_prompt,
      data.on_bad_example, data.convert_modes), **kwargs)


def build(data, rebuild=False):
  """Builds the dataset of `data` once (a no-op when built) and returns it.

  A folder dataset is rebuilt when its source folder changed since it was built (files
  added, removed or modified: `source_fingerprint`), with a warning saying so."""
  builder = make_builder(data)
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if rebuild else
          tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(download_mode=mode))
  if isinstance(builder, _FolderBuilder) and not rebuild:
    was, now = builder.info.metadata.get('source'), builder.fingerprint()
    if was != now:
      logging.warning(
          '%s changed since its dataset was built (%s files then, %d now, or files '
          'replaced or modified): rebuilding %s.', builder._cfg.root,  # pylint: disable=protected-access
          was['files'] if was else 'unknown', now['files'], builder.data_path)
      return build(data, rebuild=True)
  return builder
