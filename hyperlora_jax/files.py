"""Writing files so that nothing half-written is ever taken as complete.

Every file and folder the project writes (LoRA files, model and pipeline folders,
hypernetworks, reports, samples, a run's config.json) is written under a temporary name
beside its destination, ``<name>.tmp-<pid>``, and renamed onto it (``os.replace``, atomic
on one filesystem) only once complete. A kill at any point leaves the old version or the
new one, never a mix; the stray temporary is removed by the next write of that name.
Modes follow the user's umask (safetensors and tempfile create 0600 files).

  with files.atomic_file(path) as tmp:      # one file: write to tmp
    save_file(state, tmp)
  with files.atomic_folder(folder) as tmp:  # a folder: fill tmp
    ...
"""
import contextlib
import json
import os
import shutil


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Someone else's process.
    return True
  return True


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.lexists(path):
    os.remove(path)


def _clean_stale(path: str) -> None:
  """Removes temporaries of `path` left by processes that died before renaming them."""
  folder, base = os.path.split(os.path.abspath(path))
  if not os.path.isdir(folder):
    return
  for name in os.listdir(folder):
    for tag in ('.tmp-', '.old-'):
      pid = name[len(base) + len(tag):] if name.startswith(base + tag) else ''
      if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
        _remove(os.path.join(folder, name))


def _fix_modes(path: str) -> None:
  """Files 0666 and folders 0777 less the umask, as open() and mkdir() would make them."""
  mask = _umask()
  os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)
  for root, dirs, names in os.walk(path):
    for d in dirs:
      os.chmod(os.path.join(root, d), 0o777 & ~mask)
    for n in names:
      os.chmod(os.path.join(root, n), 0o666 & ~mask)


@contextlib.contextmanager
def atomic_file(path: str):
  """Yields a temporary path to write; renamed onto `path` when the block completes,
  removed when it raises."""
  path = os.fspath(path)
  if os.path.isdir(path):
    raise IsADirectoryError(f'Cannot write the file {path}: it is a folder.')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  _clean_stale(path)
  tmp = f'{path}.tmp-{os.getpid()}'
  try:
    yield tmp
    _fix_modes(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.lexists(tmp):
      _remove(tmp)


@contextlib.contextmanager
def atomic_folder(path: str):
  """Yields an empty temporary folder to fill; it replaces `path` when the block completes.

  An existing `path` is replaced only if it holds nothing the new folder lacks (an
  earlier write of the same thing, or a partial one): a folder of other files (a run's
  workdir, a home folder given as an output) is refused, naming what it holds.
  """
  path = os.fspath(path).rstrip(os.sep) or os.sep
  if os.path.exists(path) and not os.path.isdir(path):
    raise NotADirectoryError(f'Cannot write the folder {path}: it is a file.')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  _clean_stale(path)
  tmp, old = f'{path}.tmp-{os.getpid()}', f'{path}.old-{os.getpid()}'
  _remove(tmp)
  os.makedirs(tmp)
  try:
    yield tmp
    if os.path.isdir(path):
      others = sorted(set(os.listdir(path)) - set(os.listdir(tmp)))
      if others:
        raise FileExistsError(
            f'{path} exists and holds files this write would not replace '
            f'({", ".join(others[:5])}{", ..." if len(others) > 5 else ""}): choose '
            'another output folder, or remove it.')
      _fix_modes(tmp)
      os.replace(path, old)
      try:
        os.replace(tmp, path)
      except BaseException:
        os.replace(old, path)
        raise
    else:
      _fix_modes(tmp)
      os.replace(tmp, path)
  finally:
    _remove(tmp)
    _remove(old)


def write_text(path: str, text: str) -> None:
  with atomic_file(path) as tmp, open(tmp, 'w') as f:
    f.write(text)


def write_json(path: str, value, **kwargs) -> None:
  write_text(path, json.dumps(value, **{'indent': 2, **kwargs}))


def print_and_write(table: str, out: str = '', json_path: str = '', value=None) -> None:
  """A benchmark's markdown `table` printed, and written to `out` and `value` as JSON to
  `json_path`, each where given (its --out and --json)."""
  print(table)
  if out:
    write_text(out, table)
  if json_path:
    write_json(json_path, value)


def save_image(image, path: str, format: str = 'PNG') -> None:  # pylint: disable=redefined-builtin
  """A PIL image to `path` (the temporary name hides the extension: give the format)."""
  with atomic_file(path) as tmp:
    image.save(tmp, format=format)
