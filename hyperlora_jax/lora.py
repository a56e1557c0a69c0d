"""LoRA: where it goes, how raw hypernetwork outputs become factors, and applying it.

A LoRA tree maps a target layer's path (its Flax param path joined by '/', e.g.
``down_blocks_1/attentions_0/transformer_blocks_0/attn2/to_q``) to its factors:

  ``down`` [batch?, r, d_in]   ``up`` [batch?, d_out, r]
  ``mid``  [batch?, r]         optional diagonal between them (LoRA basis, VeRA)
  ``out``  [batch?, d_out]     optional output scaling (VeRA)
  ``scale``                    a scalar, or [batch]

With a leading batch axis every sample has its own LoRA; ``down``/``up`` may stay shared
while ``mid``/``out`` are per sample. ``up @ down`` is never formed: the delta is
``out * (((x @ down^T) * mid) @ up^T) * scale``.
"""
import dataclasses
import re
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

LoRATree = Mapping[str, Mapping[str, Any]]


# Rank of each factor of a shared LoRA; one more (a leading batch axis) is per sample.
SHARED_NDIM = {'down': 2, 'up': 2, 'mid': 1, 'out': 1, 'scale': 0}


def tile_samples(tree: LoRATree, n: int) -> dict:
  """The per-sample factors repeated n times along the batch (e.g. for the CFG batch of
  [uncond; cond]); shared factors are left as they are."""
  return {p: {k: jnp.concatenate([v] * n) if jnp.ndim(v) > SHARED_NDIM[k] else v
              for k, v in f.items()} for p, f in tree.items()}


def _per_sample(v, ndim):
  """Broadcasts a per-sample vector [B, n] (or [B]) against [B, ..., n] activations."""
  return v.reshape(v.shape[:1] + (1,) * (ndim - v.ndim) + v.shape[1:])


def lora_delta(x: jnp.ndarray, factors: Mapping[str, Any]) -> jnp.ndarray:
  """The LoRA contribution for inputs x [batch, ..., d_in]."""
  down = factors['down'].astype(x.dtype)
  up = factors['up'].astype(x.dtype)
  h = x @ down.T if down.ndim == 2 else jnp.einsum('b...i,bri->b...r', x, down)
  if 'mid' in factors:
    mid = factors['mid'].astype(x.dtype)
    h = h * (mid if mid.ndim == 1 else _per_sample(mid, h.ndim))
  y = h @ up.T if up.ndim == 2 else jnp.einsum('b...r,bor->b...o', h, up)
  if 'out' in factors:
    out = factors['out'].astype(x.dtype)
    y = y * (out if out.ndim == 1 else _per_sample(out, y.ndim))
  scale = jnp.asarray(factors.get('scale', 1.0), x.dtype)
  return y * (scale if scale.ndim == 0 else _per_sample(scale, y.ndim))


def to_plain(factors: Mapping[str, Any]) -> dict:
  """Folds ``mid``, ``out`` and ``scale`` into plain (down, up) factors with scale 1.

  Works for shared or per-sample factors; this is what exporters write (rank = r).
  """
  down, up = jnp.asarray(factors['down']), jnp.asarray(factors['up'])
  batch = max(down.ndim, up.ndim) == 3
  if batch:
    n = max(a.shape[0] for a in (down, up) if a.ndim == 3)
    down = jnp.broadcast_to(down, (n,) + down.shape[-2:])
    up = jnp.broadcast_to(up, (n,) + up.shape[-2:])
  scale = jnp.asarray(factors.get('scale', 1.0), jnp.float32)
  if 'mid' in factors:
    down = down * jnp.asarray(factors['mid'])[..., :, None]
  if 'out' in factors:
    up = up * jnp.asarray(factors['out'])[..., :, None]
  up = up * (scale.reshape(-1, 1, 1) if batch and scale.ndim == 1 else scale)
  return {'down': down, 'up': up}


class Dense(nn.Dense):
  """nn.Dense that adds the LoRA delta stored under its own path in ``lora``."""

  @nn.compact
  def __call__(self, x: jnp.ndarray, lora: Optional[LoRATree] = None) -> jnp.ndarray:
    y = super().__call__(x)
    factors = lora.get('/'.join(self.path)) if lora else None
    if factors is None:
      return y
    lora_in, lora_out = jnp.shape(factors['down'])[-1], jnp.shape(factors['up'])[-2]
    if (lora_in, lora_out) != (x.shape[-1], self.features):  # Not deep in a dot_general.
      raise ValueError(f'The LoRA at {"/".join(self.path)} is {lora_in} -> {lora_out}, '
                       f'the layer {x.shape[-1]} -> {self.features}: a LoRA for another '
                       'model? (lora_files.load_lora_file(path, pipe) checks a file.)')
    return y + lora_delta(x.astype(y.dtype), factors)


# ---------------------------------------------------------------- which layers
@dataclasses.dataclass(frozen=True)
class Target:
  """One LoRA-adapted Dense layer: its path in the params and its kernel's dims."""
  path: str
  d_in: int
  d_out: int


# Named target sets; a config may also give any regex over '/'-joined Dense paths.
TARGET_SETS = {
    'cross_attn': r'attn2/(to_q|to_k|to_v|to_out_0)$',
    'self_attn': r'attn1/(to_q|to_k|to_v|to_out_0)$',
    'ff': r'ff/(net_0/proj|net_2)$',
    'text_attn': r'self_attn/(q_proj|k_proj|v_proj|out_proj)$',
    'text_mlp': r'mlp/(fc1|fc2)$',
}


def _natural_key(path: str):
  return [int(s) if s.isdigit() else s for s in re.split(r'(\d+)', path)]


def find_targets(params: Any, targets: str | Sequence[str],
                 required: bool = True) -> tuple[Target, ...]:
  """The Dense layers whose path matches any of ``targets`` (set names or regexes).

  The order is the natural order of the paths (down blocks, mid, up blocks), stable
  across runs and checkpoints, so it can index a decoder's token sequence. ``required``:
  no match is an error (else an empty tuple).
  """
  if isinstance(targets, str):
    targets = [t.strip() for t in targets.split(',') if t.strip()]
  patterns = [re.compile(TARGET_SETS.get(t, t)) for t in targets]
  found = []
  for path, kernel in traverse_util.flatten_dict(params, sep='/').items():
    if not path.endswith('/kernel') or len(kernel.shape) != 2:
      continue
    layer = path[:-len('/kernel')]
    if any(p.search(layer) for p in patterns):
      found.append(Target(layer, int(kernel.shape[0]), int(kernel.shape[1])))
  if not found and required:
    raise ValueError(f'No Dense layer matches LoRA targets {list(targets)}.')
  return tuple(sorted(found, key=lambda t: _natural_key(t.path)))


def init_plain(rng, targets: Sequence[Target], rank: int) -> dict:
  """A shared plain LoRA as in the LoRA paper: random down, zero up (starts at the base)."""
  keys = jax.random.split(rng, len(targets))
  return {t.path: {'down': jax.random.normal(k, (rank, t.d_in)) * t.d_in ** -0.5,
                   'up': jnp.zeros((t.d_out, rank))} for k, t in zip(keys, targets)}


# ---------------------------------------------------------------- merging
def merge(params: Any, lora: LoRATree) -> Any:
  """Folds a shared (unbatched) LoRA into the Dense kernels: W += scale * down^T up^T."""
  flat = traverse_util.flatten_dict(params, sep='/')
  for path, f in lora.items():
    f = to_plain(f)
    if f['down'].ndim != 2:
      raise ValueError(f'Cannot merge a per-sample LoRA (at {path}); pick one sample.')
    key = path + '/kernel'
    if key not in flat:
      raise KeyError(f'LoRA target {path} is not a Dense layer of these params.')
    delta = f['down'].T @ f['up'].T
    flat[key] = flat[key] + delta.astype(flat[key].dtype)
  return traverse_util.unflatten_dict(flat, sep='/')


def stack(*trees: LoRATree) -> dict:
  """One LoRA whose delta at every layer is the sum of the trees' deltas there, exactly:
  each tree's plain factors (`to_plain`) side by side along the rank, [U1 U2] [D1; D2] =
  U1 D1 + U2 D2, so ranks add. Shared or per sample: a shared tree's factors are repeated
  along the batch of a per-sample one."""
  out = {}
  for path in dict.fromkeys(p for tree in trees for p in tree):
    parts = [to_plain(tree[path]) for tree in trees if path in tree]
    batch = max((f['down'].shape[0] for f in parts if f['down'].ndim == 3), default=None)
    if batch is not None:
      parts = [f if f['down'].ndim == 3 else
               {k: jnp.broadcast_to(v, (batch,) + v.shape) for k, v in f.items()}
               for f in parts]
    out[path] = {'down': jnp.concatenate([f['down'] for f in parts], axis=-2),
                 'up': jnp.concatenate([f['up'] for f in parts], axis=-1)}
  return out


def compress(tree: LoRATree, rank: int) -> tuple[dict, float]:
  """(a shared LoRA with every layer's delta cut to its best rank-``rank`` approximation
  (truncated SVD: the least Frobenius error, Eckart-Young), the relative error of the
  whole LoRA, ||delta - delta_k|| / ||delta|| over all layers together). Layers of rank
  <= ``rank`` stay exact. The d_out x d_in delta is never formed: a QR of each factor,
  then the SVD of the small r x r core between them."""
  out, lost, total = {}, 0.0, 0.0
  for path, f in tree.items():
    f = to_plain(f)
    down, up = np.asarray(f['down'], np.float64), np.asarray(f['up'], np.float64)
    if down.ndim != 2:
      raise ValueError(f'compress takes a shared LoRA; {path} is per sample '
                       f'(down {down.shape}).')
    q_up, r_up = np.linalg.qr(up)
    q_down, r_down = np.linalg.qr(down.T)
    u, s, vt = np.linalg.svd(r_up @ r_down.T)
    k = min(rank, len(s))
    root = np.sqrt(s[:k])
    out[path] = {'down': ((root[:, None] * vt[:k]) @ q_down.T).astype(np.float32),
                 'up': ((q_up @ u[:, :k]) * root).astype(np.float32)}
    lost += float(np.sum(s[k:] ** 2))
    total += float(np.sum(s ** 2))
  return out, (lost / total) ** 0.5 if total else 0.0


# ---------------------------------------------------------------- parameterizations
# Each maps the raw hypernetwork output for a group of same-shaped targets,
# raw [B, T, raw_size], to factors with a [B, T, ...] (or shared [T, ...]) layout.
# Raw outputs are rescaled by the fan-in of each product so that unit-variance raw
# values give unit-variance activations through the LoRA path.
def _orthonormal_rows(key, rows: int, cols: int) -> jnp.ndarray:
  """A [rows, cols] matrix with orthonormal rows (rows <= cols), from a QR."""
  q, r = jnp.linalg.qr(jax.random.normal(key, (cols, rows)))
  return (q * jnp.sign(jnp.diagonal(r))).T  # sign fix makes the QR unique


class PlainLoRA(nn.Module):
  """A and B predicted directly (HyperLoRA eq. 6): r * (d_in + d_out) numbers."""
  rank: int

  def raw_size(self, d_in: int, d_out: int) -> int:
    return self.rank * (d_in + d_out)

  def down_size(self, d_in: int, d_out: int) -> int:
    """The raw numbers of the down factor, which come first (the rest is up's)."""
    return self.rank * d_in

  @nn.compact
  def __call__(self, raw, d_in, d_out, first_index):
    r = self.rank
    down = raw[..., :r * d_in].reshape(raw.shape[:-1] + (r, d_in)) * d_in ** -0.5
    up = raw[..., r * d_in:].reshape(raw.shape[:-1] + (d_out, r)) * r ** -0.5
    return {'down': down, 'up': up}


class LightweightDreamBooth(nn.Module):
  """LiDB (HyperDreamBooth 4.1): down = D_train D_aux, up = U_aux U_train.

  D_aux [a, d_in] and U_aux^T [b, d_out] are frozen random matrices with orthonormal
  rows, drawn from ``seed`` and the target's index: they live in the 'aux' variable
  collection (not trained) and are rebuilt exactly from the seed saved in the config.
  Predicted numbers per target: r * (a + b).
  """
  rank: int
  a: int
  b: int
  seed: int

  def raw_size(self, d_in: int, d_out: int) -> int:
    return self.rank * (self.a + self.b)

  def down_size(self, d_in: int, d_out: int) -> int:
    """The raw numbers of D_train, which come first (the rest is U_train's)."""
    return self.rank * self.a

  @nn.compact
  def __call__(self, raw, d_in, d_out, first_index):
    r, a, b = self.rank, self.a, self.b
    if a > d_in or b > d_out:
      raise ValueError(f'LiDB aux sizes a={a}, b={b} exceed the layer dims ({d_in}, {d_out}).')
    count = raw.shape[-2]
    down_aux, up_aux = self.variable('aux', f'aux_{d_in}x{d_out}_{first_index}', lambda: lidb_aux(
        self.seed, range(first_index, first_index + count), d_in, d_out, a, b)).value
    d_train = raw[..., :r * a].reshape(raw.shape[:-1] + (r, a))
    u_train = raw[..., r * a:].reshape(raw.shape[:-1] + (b, r))
    down = jnp.einsum('btra,tai->btri', d_train, down_aux) * a ** -0.5
    up = jnp.einsum('toc,btcr->btor', up_aux, u_train) * (b * r) ** -0.5
    return {'down': down, 'up': up}


def lidb_aux(seed: int, indices, d_in: int, d_out: int, a: int, b: int):
  """The frozen LiDB matrices for targets ``indices``: ([T, a, d_in], [T, d_out, b])."""
  downs, ups = [], []
  for i in indices:
    key_down, key_up = jax.random.split(jax.random.fold_in(jax.random.key(seed), i))
    downs.append(_orthonormal_rows(key_down, a, d_in))
    ups.append(_orthonormal_rows(key_up, b, d_out).T)
  return jnp.stack(downs), jnp.stack(ups)


class LoRABasis(nn.Module):
  """ByteDance HyperLoRA: learned basis LoRAs per target, predicted coefficients.

  An ID part (``num_id`` bases) and a Base part (``num_base`` bases) have separate
  coefficients; ``use_id`` / ``use_base`` switch each off (e.g. at inference). Two ways
  to mix the bases (``mix``):

  * 'mid': each basis is a LoRA pair of its part's rank, and one coefficient scales it,
    M = sum_k c_k U_k D_k. The bases stay shared factors; the coefficients become the
    per-sample ``mid`` diagonal, so no per-sample matrix is formed at all.
  * 'factors' (ByteDance's published HyperLoRALayer): the down and the up matrix are
    each a combination of bases with coefficients of their own, down = sum_k a_k D_k,
    up = sum_k b_k U_k, so a part is one LoRA of its rank per sample (ByteDance: ID rank
    8, Base rank 4, K = 128). ``mid`` is then one entry per rank.

  Either way ``mid`` lists the ID part's entries, then the Base part's (`mid_parts`), so
  a caller can scale each part per sample. ``base_rank`` (0: ``rank``) is the Base
  part's rank. ``per_part`` keeps each part's bases in params of their own (``id_*``,
  ``base_*``; always so with 'factors'), so one part can train while the other is
  frozen.
  """
  rank: int
  num_id: int
  num_base: int
  use_id: bool = True
  use_base: bool = True
  mix: str = 'mid'
  base_rank: int = 0
  per_part: bool = False

  @property
  def ranks(self) -> tuple:
    return self.rank, self.base_rank or self.rank

  def part_sizes(self, d_in: int, d_out: int) -> tuple:
    """Raw numbers per target of the ID part and of the Base part (raw lists the ID
    part's first)."""
    per_basis = 2 if self.mix == 'factors' else 1
    return per_basis * self.num_id, per_basis * self.num_base

  def raw_size(self, d_in: int, d_out: int) -> int:
    return sum(self.part_sizes(d_in, d_out))

  def mid_parts(self) -> tuple:
    """Entries of ``mid`` that belong to the ID part and to the Base part."""
    r_id, r_base = self.ranks
    if self.mix == 'factors':
      return r_id, r_base
    return self.num_id * r_id, self.num_base * r_base

  @nn.compact
  def __call__(self, raw, d_in, d_out, first_index):
    if self.mix not in ('mid', 'factors'):
      raise ValueError(f"Unknown basis mix {self.mix!r}; one of 'mid', 'factors'.")
    count = raw.shape[-2]
    init = lambda fan: nn.initializers.normal(fan ** -0.5)
    name = f'{d_in}x{d_out}_{first_index}'
    (r_id, r_base), n_id = self.ranks, self.num_id
    on = jnp.array([self.use_id] * self.mid_parts()[0] + [self.use_base] * self.mid_parts()[1],
                   raw.dtype)
    if self.mix == 'mid':
      k = n_id * r_id + self.num_base * r_base
      if self.per_part:
        parts = [(p, n * r) for p, n, r in (('id', n_id, r_id), ('base', self.num_base, r_base))]
        down = jnp.concatenate([self.param(f'{p}_down_{name}', init(d_in), (count, m, d_in))
                                for p, m in parts if m], axis=1)
        up = jnp.concatenate([self.param(f'{p}_up_{name}', init(k), (count, d_out, m))
                              for p, m in parts if m], axis=2)
      else:
        down = self.param(f'down_{name}', init(d_in), (count, k, d_in))
        up = self.param(f'up_{name}', init(k), (count, d_out, k))
      # One coefficient per basis LoRA, repeated over its ranks.
      mid = jnp.concatenate([jnp.repeat(raw[..., :n_id], r_id, axis=-1),
                             jnp.repeat(raw[..., n_id:], r_base, axis=-1)], axis=-1)
      return {'down': down, 'up': up, 'mid': mid * on}
    downs, ups = [], []
    for part, k, r, coeffs in (('id', n_id, r_id, raw[..., :2 * n_id]),
                               ('base', self.num_base, r_base, raw[..., 2 * n_id:])):
      if not k:
        continue
      bases_down = self.param(f'{part}_down_{name}', init(d_in), (count, k, r, d_in))
      bases_up = self.param(f'{part}_up_{name}', init(r), (count, k, d_out, r))
      # Unit-variance coefficients give unit-variance factors: / sqrt(K).
      downs.append(jnp.einsum('btk,tkri->btri', coeffs[..., :k], bases_down) * k ** -0.5)
      ups.append(jnp.einsum('btk,tkor->btor', coeffs[..., k:], bases_up) * k ** -0.5)
    mid = jnp.broadcast_to(on, raw.shape[:-1] + on.shape)
    return {'down': jnp.concatenate(downs, axis=-2), 'up': jnp.concatenate(ups, axis=-1),
            'mid': mid}


class VeRA(nn.Module):
  """VeRA (Kopiczko et al.): frozen random A [r, d_in] and B [d_out, r] shared by all
  targets (sliced to each layer's dims), predicted vectors d (mid, r) and b (out, d_out).
  """
  rank: int
  seed: int
  max_in: int
  max_out: int

  def raw_size(self, d_in: int, d_out: int) -> int:
    return self.rank + d_out

  @nn.compact
  def __call__(self, raw, d_in, d_out, first_index):
    r = self.rank
    shared_a, shared_b = self.variable('aux', 'vera', lambda: vera_aux(
        self.seed, r, self.max_in, self.max_out)).value
    count = raw.shape[-2]
    down = jnp.broadcast_to(shared_a[:, :d_in], (count, r, d_in))
    up = jnp.broadcast_to(shared_b[:d_out], (count, d_out, r))
    return {'down': down, 'up': up, 'mid': raw[..., :r], 'out': raw[..., r:]}


def vera_aux(seed: int, rank: int, max_in: int, max_out: int):
  key_a, key_b = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(key_a, (rank, max_in)) * max_in ** -0.5,
          jax.random.normal(key_b, (max_out, rank)) * rank ** -0.5)


def parameterization(config, targets: Sequence[Target]) -> nn.Module:
  """Builds the parameterization named by ``config.kind`` from its config section."""
  kinds = {
      'plain': lambda: PlainLoRA(config.rank),
      'lidb': lambda: LightweightDreamBooth(config.rank, config.a, config.b, config.seed),
      'basis': lambda: LoRABasis(config.rank, config.num_id, config.num_base,
                                 config.use_id, config.use_base, config.mix,
                                 config.base_rank),
      'vera': lambda: VeRA(config.rank, config.seed, max(t.d_in for t in targets),
                           max(t.d_out for t in targets)),
  }
  if config.kind not in kinds:
    raise ValueError(f'Unknown LoRA parameterization {config.kind!r}; one of {sorted(kinds)}.')
  return kinds[config.kind]()


# Parameterizations whose raw numbers are a LoRA's own factors, so one subject's can be
# fitted directly (a LoRA bank), compared with a prediction and stacked with a new LoRA.
FACTOR_KINDS = ('plain', 'lidb')


def raw_fields(config) -> dict:
  """What fixes the meaning of a factor parameterization's raw numbers: its kind and rank,
  and for LiDB a, b and the seed its frozen aux matrices are drawn from."""
  names = {'plain': ('rank',), 'lidb': ('rank', 'a', 'b', 'seed')}
  if config.kind not in names:
    raise ValueError(f'The {config.kind!r} parameterization has no per-subject factors; '
                     f'one of {FACTOR_KINDS} has.')
  return {'kind': config.kind, **{n: int(config[n]) for n in names[config.kind]}}
