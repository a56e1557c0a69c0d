"""Target-weights datasets: each subject's pre-optimized LoRA numbers, keyed by identity.

A lora_bank run (`preoptimize`) writes its workdir as

  shard_00000.safetensors  'group_<g>' [n, T_g, raw_size_g]: the raw numbers of n subjects
                           per target group (`models.hypernet.group_targets`' order), the
                           very numbers a hypernetwork of that parameterization predicts;
                           the header holds 'identities' (JSON, the rows' order),
                           'parameterization' (`lora.raw_fields`) and 'targets' (JSON
                           [[path, d_in, d_out], ...])
  index.json               parameterization, targets, and identity -> [shard, row]

Each shard is written whole (to a temporary name, then renamed): an interrupted
pre-optimization leaves finished shards only, and its rerun fits the missing ones. `load`
stacks the rows of the identities a hypernetwork trains on, after checking that the
dataset was fitted for its parameterization and targets (naming what differs).
"""
import json
import os
import re
from typing import Sequence

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from hyperlora_jax import files
from hyperlora_jax import lora as lora_lib

INDEX = 'index.json'
_SHARD = re.compile(r'shard_(\d{5})\.safetensors')


def shard_name(k: int) -> str:
  return f'shard_{k:05d}.safetensors'


def _targets_json(targets: Sequence[lora_lib.Target]) -> list:
  return [[t.path, t.d_in, t.d_out] for t in targets]


def write_shard(folder: str, k: int, identities: Sequence[str], raw: Sequence[np.ndarray],
                parameterization: dict, targets: Sequence[lora_lib.Target]) -> str:
  """Writes shard k: the raw groups [n, T_g, size] of `identities` (one row each)."""
  if any(len(r) != len(identities) for r in raw):
    raise ValueError(f'{len(identities)} identities but groups of {[len(r) for r in raw]} rows.')
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, shard_name(k))
  header = {'identities': json.dumps(list(identities)),
            'parameterization': json.dumps(parameterization),
            'targets': json.dumps(_targets_json(targets))}
  with files.atomic_file(path) as tmp:
    save_file({f'group_{g}': np.asarray(r, np.float32) for g, r in enumerate(raw)}, tmp,
              metadata=header)
  return path


def _header(path: str) -> dict:
  with safe_open(path, 'np') as f:
    return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}


def finished_shards(folder: str) -> dict:
  """{k: identities} of the shards written whole in `folder` ({} if none)."""
  if not os.path.isdir(folder):
    return {}
  found = {}
  for name in sorted(os.listdir(folder)):
    match = _SHARD.fullmatch(name)
    if match:
      found[int(match.group(1))] = _header(os.path.join(folder, name))['identities']
  return found


def write_index(folder: str) -> dict:
  """Writes index.json from the shards' headers (which must agree); returns it."""
  index = {'parameterization': None, 'targets': None, 'identities': {}}
  for k in sorted(finished_shards(folder)):
    header = _header(os.path.join(folder, shard_name(k)))
    for key in ('parameterization', 'targets'):
      if index[key] is None:
        index[key] = header[key]
      elif index[key] != header[key]:
        raise ValueError(f'{folder}: {shard_name(k)} was fitted with another {key} than '
                         'the shards before it; delete the folder and fit it again.')
    for row, identity in enumerate(header['identities']):
      index['identities'][identity] = [shard_name(k), row]
  files.write_json(os.path.join(folder, INDEX), index, indent=1)
  return index


def _differences(name: str, theirs: dict, ours: dict) -> list:
  return [f'{name} {k}: the dataset has {theirs.get(k)!r}, the hypernetwork {ours.get(k)!r}'
          for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]


def check(index: dict, parameterization: dict, targets: Sequence[lora_lib.Target],
          where: str, shown: int = 5) -> None:
  """Raises ValueError naming every way the dataset's parameterization and targets
  differ from a hypernetwork's (other a/b/rank/seed, missing, extra or misshaped layers)."""
  problems = _differences('parameterization', index['parameterization'], parameterization)
  theirs = {p: (i, o) for p, i, o in index['targets']}
  ours = {t.path: (t.d_in, t.d_out) for t in targets}
  for what, paths in (('has no layer', [p for p in ours if p not in theirs]),
                      ('has layers the hypernetwork does not predict',
                       [p for p in theirs if p not in ours]),
                      ('has other shapes at', [p for p in ours if p in theirs
                                               and theirs[p] != ours[p]])):
    if paths:
      problems.append(f'it {what} {", ".join(paths[:shown])}'
                      + (f' and {len(paths) - shown} more' if len(paths) > shown else ''))
  if not problems and list(theirs) != list(ours):
    problems.append('its layers are in another order')
  if problems:
    raise ValueError(f'The target weights in {where} do not fit this hypernetwork: '
                     + '; '.join(problems) + '.')


def read_index(folder: str) -> dict:
  """A finished target-weights dataset's index (parameterization, targets, identity ->
  [shard, row]); a clear error where there is none."""
  path = os.path.join(folder, INDEX)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'No target-weights dataset at {folder}: {INDEX} is missing (a finished '
        'pre-optimization, a lora_bank run, writes it; rerun an interrupted one).')
  with open(path) as f:
    return json.load(f)


def load(folder: str, identities: Sequence[str], parameterization: dict,
         targets: Sequence[lora_lib.Target]) -> list:
  """The raw groups [len(identities), T_g, size] of `identities`, in their order."""
  index = read_index(folder)
  check(index, parameterization, targets, folder)
  missing = [i for i in identities if i not in index['identities']]
  if missing:
    raise ValueError(f'The target weights in {folder} lack {len(missing)} of the '
                     f'{len(identities)} training identities, e.g. {missing[:5]}: fit them '
                     'on the same data (data.* as the hypernetwork\'s run).')
  rows = {}
  for identity in identities:
    shard, row = index['identities'][identity]
    rows.setdefault(shard, []).append(row)
  groups = {}
  for shard in rows:
    with safe_open(os.path.join(folder, shard), 'np') as f:
      groups[shard] = [f.get_tensor(k) for k in sorted(f.keys(), key=lambda k: int(k[6:]))]
  return [np.stack([groups[s][g][r] for s, r in (index['identities'][i]
                                                  for i in identities)])
          for g in range(len(next(iter(groups.values()))))]
