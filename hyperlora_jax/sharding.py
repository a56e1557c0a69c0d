"""One device mesh for everything, partition rules, and host <-> global arrays.

The mesh has axes ('data', 'fsdp'). The batch is split over both axes, so every
device sees a different slice of it. Parameters are replicated unless they are
large: a leaf with at least ``min_size`` elements is split over 'fsdp' along
its largest axis that 'fsdp' divides (ZeRO-3 style; XLA all-gathers it where
it is used). Regex rules over the parameter path come first and can pin any
leaf to an explicit layout. With fsdp=1 everything is replicated and the mesh
is plain data parallelism.
"""
import re
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ('data', 'fsdp')
BATCH_AXES = AXES  # The leading batch axis is split over both mesh axes.
# (path regex, axes per array dimension) - () means replicated.
Rules = Sequence[tuple[str, Sequence[Optional[str]]]]


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
  """Resolves one -1 entry to the remaining devices and checks the product."""
  if data == -1 and fsdp == -1:
    raise ValueError('At most one of mesh.data, mesh.fsdp may be -1.')
  if data == -1 or fsdp == -1:
    known = fsdp if data == -1 else data
    if known <= 0 or num_devices % known:
      raise ValueError(f'mesh axis {known} does not divide {num_devices} '
                       'devices.')
    rest = num_devices // known
    data, fsdp = (rest, fsdp) if data == -1 else (data, rest)
  if data * fsdp != num_devices:
    raise ValueError(f'mesh data={data} x fsdp={fsdp} != {num_devices} '
                     'devices.')
  return data, fsdp


def make_mesh(data: int = -1, fsdp: int = 1,
              devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A ('data', 'fsdp') mesh over all (global) devices, topology-aware."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(data, fsdp, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def path_str(path) -> str:
  """'a/b/0/c' for a jax key path, the form partition rules match against."""
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return '/'.join(parts)


def _largest_divisible_axis(shape, n: int) -> Optional[int]:
  candidates = [i for i, d in enumerate(shape) if d % n == 0]
  return max(candidates, key=lambda i: shape[i]) if candidates else None


def spec_for(path: str, shape: Sequence[int], fsdp: int, rules: Rules = (),
             min_size: int = 2**18) -> P:
  """The PartitionSpec of one leaf: first matching rule, else the size rule."""
  for pattern, axes in rules:
    if re.search(pattern, path):
      return P(*axes)
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  axis = _largest_divisible_axis(shape, fsdp)
  if axis is None:  # No axis splits evenly: replicate rather than pad.
    return P()
  return P(*(('fsdp' if i == axis else None) for i in range(len(shape))))


def tree_shardings(tree, mesh: Mesh, rules: Rules = (),
                   min_size: int = 2**18):
  """NamedShardings for every leaf of a pytree of arrays or ShapeDtypeStructs.

  Works on optimizer states too: Adam's moments have the parameters' shapes
  and their paths end with the parameter path, so they get the same layout.
  """
  fsdp = mesh.shape['fsdp']

  def one(path, leaf):
    spec = spec_for(path_str(path), np.shape(leaf), fsdp, rules, min_size)
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(one, tree)


def place(tree, shardings):
  """Puts host-identical values (numpy or jax) onto their global shardings.

  Every process holds the full value (built from the same seed or files);
  each one only transfers the slices its own devices own, so this works on
  any number of hosts without cross-host traffic.
  """
  def one(x, sharding):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  return jax.tree.map(one, tree, shardings)


def host_to_global(batch: Mapping[str, Any], mesh: Mesh) -> dict:
  """Per-host batch slices (a pytree of arrays) -> global jax.Arrays split over
  the batch axes.

  Each process passes its own rows (global batch / process count of them);
  the global batch is their concatenation in process order.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda v: jax.make_array_from_process_local_data(sharding, np.asarray(v)),
      dict(batch))
