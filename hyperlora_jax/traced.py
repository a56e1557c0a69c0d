"""Traced programs kept on disk beside JAX's persistent compilation cache.

The compilation cache spares a fresh process XLA's compile, not the tracing before it:
Python running the model once to build the program's StableHLO, ~10 s for the
fine-tuning loop at SD1.5 shape (finetune.py). `lower` keeps that StableHLO as a
jax.export file, keyed by everything the program is made from (`key`: this package's
source, the versions of JAX, Flax and Optax, the backend, the caller's description of
its configuration, the arguments' structure, shapes, dtypes and placement), so a fresh
process reads it back in well under a second and then finds its compile in the
compilation cache.

A program with a host callback (jax.debug.print, a progress report) cannot be kept (the
callback is a Python function of the process that traced it): it is lowered as usual.
"""
import functools
import hashlib
from importlib import metadata
import os
import re

from absl import logging
import jax
import numpy as np

from hyperlora_jax import files

SUFFIX = '.jaxexport'
_CUSTOM_CALL = re.compile(r'custom_call @([\w$.-]+)')
_CALLBACK = re.compile(r'python\w*callback')


def folder() -> str | None:
  """Where traced programs are kept: `traced/` in the compilation cache (None: off)."""
  cache = jax.config.jax_compilation_cache_dir
  return os.path.join(cache, 'traced') if cache else None


def lower(fn, args: tuple, description: str) -> jax.stages.Lowered:
  """`jax.jit(fn).lower(*args)`, read from `folder()` when an earlier process traced
  the same program. description: what `fn` is made of besides this package's code and
  the arguments' shapes (e.g. its config as JSON); a different one is another program."""
  jitted = jax.jit(fn)
  where = folder()
  if not where:
    return jitted.lower(*args)
  path = os.path.join(where, key(description, args) + SUFFIX)
  exported = _read(path)
  if exported is None:
    lowered = jitted.lower(*args)
    text = lowered.as_text()
    if _CALLBACK.search(text):
      return lowered
    # Custom calls (cuDNN attention) have no cross-version guarantee, which the key's
    # JAX version and backend already stand in for.
    checks = [jax.export.DisabledSafetyCheck.custom_call(t)
              for t in sorted(set(_CUSTOM_CALL.findall(text)))]
    try:
      exported = jax.export.export(jitted, disabled_checks=checks)(*args)
    except Exception as e:  # pylint: disable=broad-except  (kept or not, it runs)
      logging.warning('Not keeping the traced program (%s: %s).', type(e).__name__, e)
      return lowered
    with files.atomic_file(path) as tmp, open(tmp, 'wb') as out:
      out.write(exported.serialize())
  # The first process lowers the same call as the later ones: one compilation-cache key.
  return jax.jit(exported.call).lower(*args)


def key(description: str, args: tuple) -> str:
  """A digest of the program `description` and `args` make (the file's name)."""
  leaves, treedef = jax.tree.flatten(args)
  parts = [_source_digest(), *_versions(), jax.default_backend(), description, str(treedef)]
  parts += [f'{np.shape(x)} {getattr(x, "dtype", type(x).__name__)} '
            f'{getattr(x, "sharding", "")}' for x in leaves]
  return hashlib.sha256('\n'.join(parts).encode()).hexdigest()


@functools.cache
def _versions() -> tuple:
  """The libraries whose code builds the programs besides this package's."""
  return tuple(f'{name} {metadata.version(name)}' for name in ('jax', 'jaxlib', 'flax', 'optax'))


@functools.cache
def _source_digest() -> str:
  """This package's Python source: any change to the code is a new program."""
  root = os.path.dirname(os.path.abspath(__file__))
  digest = hashlib.sha256()
  for dirpath, dirnames, names in os.walk(root):
    dirnames.sort()
    for name in sorted(n for n in names if n.endswith('.py')):
      path = os.path.join(dirpath, name)
      digest.update(os.path.relpath(path, root).encode())
      with open(path, 'rb') as f:
        digest.update(f.read())
  return digest.hexdigest()


def _read(path: str):
  if not os.path.exists(path):
    return None
  try:
    with open(path, 'rb') as f:
      return jax.export.deserialize(bytearray(f.read()))
  except Exception as e:  # pylint: disable=broad-except  (traced again, and rewritten)
    logging.warning('Tracing again: the traced program %s does not load (%s: %s).', path,
                    type(e).__name__, e)
    return None
