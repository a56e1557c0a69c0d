"""Hypernetworks: context image -> encoder features -> weight decoder -> LoRA tree.

Three interchangeable parts, each picked by config:

* encoder: a small conv net (tiny configs), a ViT of any size, or the CLIP vision
  tower (the ViT loaded from a transformers folder); each returns tokens [B, N, D] and
  a pooled embedding [B, D].
* decoder: ``transformer`` (HyperDreamBooth: one token per target, K refinement rounds
  from zero weights), ``heads`` (recontextualization paper: one shallow MLP per target
  over the pooled embedding, or by config over its own attention pool of the tokens),
  ``perceiver`` (ByteDance: learned queries over tokens).
* parameterization (`hyperlora_jax.lora`): plain LoRA, LiDB, LoRA basis, VeRA.

Targets of equal (d_in, d_out) form a group; everything per target is vectorized over
its group, so the traced step has a handful of einsums instead of a loop over layers.
The decoder sequence orders targets group by group.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from hyperlora_jax import lora as lora_lib
from hyperlora_jax.models import clip


def group_targets(targets: Sequence[lora_lib.Target]):
  """((d_in, d_out), target indices) in order of first appearance."""
  groups = {}
  for i, t in enumerate(targets):
    groups.setdefault((t.d_in, t.d_out), []).append(i)
  return tuple((shape, tuple(idx)) for shape, idx in groups.items())


class ConvEncoder(nn.Module):
  """A small conv net for tiny configs: stride-2 stages, tokens = the last feature map."""
  channels: Sequence[int] = (32, 64, 128)

  @nn.compact
  def __call__(self, images):
    x = images
    for i, c in enumerate(self.channels):
      x = nn.Conv(c, (3, 3), (2, 2), padding=1, name=f'conv_{i}')(x)
      x = nn.silu(nn.GroupNorm(min(8, c), name=f'norm_{i}')(x))
    tokens = x.reshape(x.shape[0], -1, x.shape[-1])
    return tokens, tokens.mean(axis=1)


class CLIPEncoder(nn.Module):
  """The CLIP vision tower (or a ViT of any size built from a CLIPVisionConfig dict).

  Images arrive in [-1, 1] at any size; they are resized to the tower's resolution and
  normalized with CLIP's mean and std. Returns the hidden states of ``layer`` (-1: the
  last; ByteDance HyperLoRA reads -2, the penultimate) and image_embeds.
  """
  tower: nn.Module
  layer: int = -1

  @nn.compact
  def __call__(self, images):
    size = self.tower.image_size
    x = (images + 1) / 2
    if x.shape[1:3] != (size, size):
      x = jax.image.resize(x, (x.shape[0], size, size, x.shape[-1]), method='bicubic')
    x = (x - jnp.asarray(clip.CLIP_MEAN)) / jnp.asarray(clip.CLIP_STD)
    out = self.tower(x)
    pooled = out.pooler_output if out.image_embeds is None else out.image_embeds
    return out.hidden_states[self.layer], pooled


class Block(nn.Module):
  """Pre-LN transformer block: self-attention, optional cross-attention, MLP."""
  heads: int
  cross: bool

  @nn.compact
  def __call__(self, x, memory=None):
    attn = lambda n: nn.MultiHeadDotProductAttention(self.heads, name=n)
    h = nn.LayerNorm(name='norm_self')(x)
    x = x + attn('self_attn')(h, h)
    if self.cross:
      x = x + attn('cross_attn')(nn.LayerNorm(name='norm_cross')(x), memory)
    h = nn.LayerNorm(name='norm_mlp')(x)
    h = nn.Dense(4 * x.shape[-1], name='mlp_in')(h)
    return x + nn.Dense(x.shape[-1], name='mlp_out')(nn.gelu(h))


class GroupHeads(nn.Module):
  """Linear maps from per-target hidden states [B, T, D] to raw outputs per group.

  ``per_target``: one head per target (shallow heads); otherwise one per target shape
  (transformer and perceiver decoders, whose tokens already tell targets apart).
  """
  groups: Any
  raw_sizes: Sequence[int]
  per_target: bool

  @nn.compact
  def __call__(self, hidden):
    outs, start = [], 0
    for (shape, idx), size in zip(self.groups, self.raw_sizes):
      h = hidden[:, start:start + len(idx)]
      start += len(idx)
      name = f'head_{shape[0]}x{shape[1]}_{idx[0]}'
      if self.per_target:
        w = self.param(name, nn.initializers.lecun_normal(batch_axis=(0,)),
                       (len(idx), h.shape[-1], size))
        outs.append(jnp.einsum('btd,tdr->btr', h, w))
      else:
        outs.append(nn.Dense(size, use_bias=False, name=name)(h))
    return outs


class TransformerDecoder(nn.Module):
  """HyperDreamBooth's decoder: K rounds refine the raw weights from zero.

  Round k embeds the current raw weights (zero at round 0), adds learned target
  position embeddings, attends to the image tokens (encoded once) and adds predicted
  deltas. The same weights serve every round.
  """
  groups: Any
  raw_sizes: Sequence[int]
  width: int
  depth: int
  heads: int
  rounds: int

  @nn.compact
  def __call__(self, tokens, pooled):
    num = sum(len(idx) for _, idx in self.groups)
    memory = nn.Dense(self.width, name='memory_proj')(tokens)
    pos = self.param('pos_embedding', nn.initializers.normal(0.02), (num, self.width))
    embeds = [nn.Dense(self.width, use_bias=False, name=f'embed_{s[0]}x{s[1]}_{i[0]}')
              for s, i in self.groups]
    blocks = [Block(self.heads, cross=True, name=f'blocks_{i}') for i in range(self.depth)]
    norm_out = nn.LayerNorm(name='norm_out')
    heads = GroupHeads(self.groups, self.raw_sizes, per_target=False, name='heads')
    raw = [jnp.zeros((tokens.shape[0], len(i), s), tokens.dtype)
           for (_, i), s in zip(self.groups, self.raw_sizes)]
    for _ in range(self.rounds):
      x = jnp.concatenate([e(r) for e, r in zip(embeds, raw)], axis=1) + pos
      for block in blocks:
        x = block(x, memory)
      x = norm_out(x)
      raw = [r + d for r, d in zip(raw, heads(x))]
    return raw


class ShallowHeads(nn.Module):
  """The recontextualization paper's parallel heads: one small MLP per target over the
  image, all targets in one einsum.

  ``pool`` says what each head reads: 'embedding' (the paper's: the pooled image
  embedding, the same for every head) or 'attention' (each target's own learned query,
  ``heads`` attention heads, over the image tokens; the queries start near zero, so
  every head starts from about the tokens' mean). One embedding averages away where the
  item's fine detail is (the paper says so itself); a query per target can look at it.
  """
  groups: Any
  raw_sizes: Sequence[int]
  hidden: int
  pool: str = 'embedding'
  heads: int = 4

  @nn.compact
  def __call__(self, tokens, pooled):
    num = sum(len(idx) for _, idx in self.groups)
    if self.pool == 'embedding':
      x, spec = pooled, 'bd,tdh->bth'
    elif self.pool == 'attention':
      x, spec = self._attend(tokens, num), 'btd,tdh->bth'
    else:
      raise ValueError(f'Unknown heads pool {self.pool!r}; one of embedding, attention.')
    w = self.param('hidden_kernel', nn.initializers.lecun_normal(batch_axis=(0,)),
                   (num, x.shape[-1], self.hidden))
    b = self.param('hidden_bias', nn.initializers.zeros, (num, self.hidden))
    h = nn.gelu(jnp.einsum(spec, x, w) + b)
    return GroupHeads(self.groups, self.raw_sizes, per_target=True, name='heads')(h)

  def _attend(self, tokens, num):
    """[B, N, D] tokens -> [B, num, D]: each target's queries over the tokens."""
    b, n, d = tokens.shape
    if d % self.heads:
      raise ValueError(f'The heads decoder\'s attention pool splits the {d}-wide tokens '
                       f'into {self.heads} heads: set decoder.heads to a divisor of {d}.')
    k = d // self.heads
    queries = self.param('pool_queries', nn.initializers.normal(0.02), (num, self.heads, k))
    keys = nn.Dense(d, name='pool_keys')(tokens).reshape(b, n, self.heads, k)
    weights = jax.nn.softmax(jnp.einsum('bnhk,thk->bthn', keys, queries) / k ** 0.5)
    values = tokens.reshape(b, n, self.heads, k)
    return jnp.einsum('bthn,bnhk->bthk', weights, values).reshape(b, num, d)


class PerceiverDecoder(nn.Module):
  """Perceiver Resampler (ByteDance HyperLoRA): learned queries attend to the image
  tokens; ``queries`` per target, whose outputs are concatenated into its raw numbers
  (ByteDance: 2, one for the down and one for the up coefficients).

  ``block``: 'joint' (Flamingo's: the queries attend to the tokens together with
  themselves) or 'separate' (ByteDance's PerceiverAttentionBlock: self-attention among
  the queries, cross-attention to the tokens, then to ``extra`` tokens when given, an
  MLP; no biases in the attention, no norm before the heads). ``extra`` tokens [B, M,
  D'] (an identity embedding's, `models.id_base`) have their own projection and
  attention (``id_*`` params), so they can train while the rest stays frozen.
  ``head_dim`` (0: width // heads) sets the attention's inner width.
  """
  groups: Any
  raw_sizes: Sequence[int]
  width: int
  depth: int
  heads: int
  queries: int = 1
  block: str = 'joint'
  head_dim: int = 0

  @nn.compact
  def __call__(self, tokens, pooled, extra=None):
    if self.block not in ('joint', 'separate'):
      raise ValueError(f"Unknown perceiver block {self.block!r}; one of 'joint', 'separate'.")
    if extra is not None and self.block != 'separate':
      raise ValueError("Extra (identity) tokens need the perceiver's 'separate' block.")
    bad = [s for s in self.raw_sizes if s % self.queries]
    if bad:
      raise ValueError(f'{self.queries} queries per target do not split raw sizes {bad}.')
    num = sum(len(idx) for _, idx in self.groups) * self.queries
    inner = self.heads * (self.head_dim or self.width // self.heads)
    attn = lambda name: nn.MultiHeadDotProductAttention(
        self.heads, qkv_features=inner, out_features=self.width,
        use_bias=self.block == 'joint', name=name)
    memory = nn.Dense(self.width, name='memory_proj')(tokens)
    if extra is not None:
      extra = nn.Dense(self.width, name='id_memory_proj')(extra)
    x = jnp.broadcast_to(self.param('queries', nn.initializers.normal(0.02),
                                    (num, self.width)), (tokens.shape[0], num, self.width))
    for i in range(self.depth):
      if self.block == 'joint':
        h = nn.LayerNorm(name=f'norm_q_{i}')(x)
        kv = jnp.concatenate([nn.LayerNorm(name=f'norm_kv_{i}')(memory), h], axis=1)
        x = x + attn(f'attn_{i}')(h, kv)
      else:
        h = nn.LayerNorm(name=f'norm_self_{i}')(x)
        x = x + attn(f'self_attn_{i}')(h, h)
        x = x + attn(f'attn_{i}')(nn.LayerNorm(name=f'norm_q_{i}')(x),
                                  nn.LayerNorm(name=f'norm_kv_{i}')(memory))
        if extra is not None:
          x = x + attn(f'id_attn_{i}')(nn.LayerNorm(name=f'id_norm_q_{i}')(x),
                                       nn.LayerNorm(name=f'id_norm_kv_{i}')(extra))
      h = nn.Dense(4 * self.width, name=f'mlp_in_{i}')(nn.LayerNorm(name=f'norm_mlp_{i}')(x))
      x = x + nn.Dense(self.width, name=f'mlp_out_{i}')(nn.gelu(h))
    if self.block == 'joint':
      x = nn.LayerNorm(name='norm_out')(x)
    q = self.queries
    x = x.reshape(x.shape[0], num // q, q, self.width)  # target-major: a target's queries
    raw = GroupHeads(self.groups, [s // q for s in self.raw_sizes], per_target=False,
                     name='heads')(x)
    return [r.reshape(r.shape[:2] + (-1,)) for r in raw]


class HyperNetwork(nn.Module):
  """images [B, H, W, 3] in [-1, 1] -> a per-sample LoRA tree for ``targets``.

  Every delta is scaled by one trainable ``gamma`` (HyperLoRA eq. 8). It starts at
  ``gamma_init`` (0 by default, so the adapted UNet starts exactly equal to the base;
  Adam moves gamma off zero at the first step, after which the rest trains).
  """
  targets: Sequence[lora_lib.Target]
  encoder: nn.Module
  decoder: nn.Module
  parameterization: nn.Module
  gamma_init: float = 0.0

  @nn.compact
  def __call__(self, images, with_raw: bool = False):
    """The LoRA tree; with ``with_raw``, (tree, raw): the decoder's raw numbers per target
    group ([B, T_g, raw_size], `group_targets`' order) from the same forward, e.g. for a
    weight-space loss against pre-optimized ones."""
    tokens, pooled = self.encoder(images)
    raw = self.decoder(tokens, pooled)
    gamma = self.param('gamma', nn.initializers.constant(self.gamma_init), ())
    tree = lora_tree(self.parameterization, self.targets, raw, gamma)
    return (tree, raw) if with_raw else tree


class RawLoRA(nn.Module):
  """Raw numbers per target group -> a per-sample LoRA tree, without a hypernetwork: how
  a LoRA bank's stacked subjects (objectives/lora_bank.py) become LoRAs, through the same
  parameterization (and the same frozen LiDB aux matrices) as a hypernetwork's output."""
  targets: Sequence[lora_lib.Target]
  parameterization: nn.Module

  @nn.compact
  def __call__(self, raw, scale=1.0):
    return lora_tree(self.parameterization, self.targets, raw, scale)


def lora_tree(parameterization, targets, raw, scale) -> dict:
  """Raw numbers per target group ([B, T_g, raw_size] in `group_targets`' order) -> the
  per-sample LoRA tree, every layer at ``scale``; ``parameterization`` is a bound module."""
  tree = {}
  for ((d_in, d_out), idx), group_raw in zip(group_targets(targets), raw):
    factors = parameterization(group_raw, d_in, d_out, idx[0])
    for j, i in enumerate(idx):
      tree[targets[i].path] = dict(target_factors(factors, j), scale=scale)
  return tree


def raw_shapes(param: nn.Module, targets: Sequence[lora_lib.Target]) -> tuple:
  """(targets in the group, raw numbers per target) of each target group."""
  return tuple((len(idx), param.raw_size(*shape)) for shape, idx in group_targets(targets))


def target_factors(factors, j):
  """Target j of a group's factors: axis 1 for per-sample arrays (batch and target axes
  over a shared factor's), 0 for shared ones."""
  return {k: v[:, j] if v.ndim == lora_lib.SHARED_NDIM[k] + 2 else v[j]
          for k, v in factors.items()}


def build(config, targets: Sequence[lora_lib.Target], encoder_tower: nn.Module = None):
  """Builds the HyperNetwork from ``config.hypernet``-style ConfigDict.

  Args:
    config: fields ``encoder`` (kind 'conv'|'vit'|'clip', ...; ``remat`` for 'vit' and
      'clip': `clip.remat_policy`), ``decoder`` (kind
      'transformer'|'heads'|'perceiver', ...), ``param`` (see lora.parameterization)
      and ``gamma_init``.
    targets: from `lora.find_targets` over the UNet params.
    encoder_tower: for 'vit'/'clip', the CLIP vision tower module (random for 'vit',
      loaded from a folder for 'clip'); built from ``config.encoder.vit`` if None.
  """
  param = lora_lib.parameterization(config.param, targets)
  groups = group_targets(targets)
  raw_sizes = tuple(param.raw_size(*shape) for shape, _ in groups)
  return HyperNetwork(tuple(targets), build_encoder(config.encoder, encoder_tower),
                      build_decoder(config.decoder, groups, raw_sizes), param,
                      config.gamma_init)


def build_encoder(enc, encoder_tower: nn.Module = None) -> nn.Module:
  """The image encoder of a ``config.hypernet.encoder`` section (see `build`)."""
  if enc.kind == 'conv':
    return ConvEncoder(tuple(enc.channels))
  if enc.kind in ('vit', 'clip'):
    tower = encoder_tower or clip.vision_from_config(enc.vit.to_dict())
    return CLIPEncoder(tower.clone(remat=enc.remat), enc.layer)
  raise ValueError(f'Unknown encoder kind {enc.kind!r}; one of conv, vit, clip.')


def build_decoder(dec, groups, raw_sizes: Sequence[int]) -> nn.Module:
  """The weight decoder of a ``config.hypernet.decoder`` section, predicting
  ``raw_sizes`` numbers per target of each group."""
  if dec.kind == 'transformer':
    return TransformerDecoder(groups, raw_sizes, dec.width, dec.depth, dec.heads, dec.rounds)
  if dec.kind == 'heads':
    return ShallowHeads(groups, raw_sizes, dec.hidden, dec.pool, dec.heads)
  if dec.kind == 'perceiver':
    return PerceiverDecoder(groups, raw_sizes, dec.width, dec.depth, dec.heads,
                            dec.queries, dec.block, dec.head_dim)
  raise ValueError(f'Unknown decoder kind {dec.kind!r}; one of transformer, heads, perceiver.')


def predicted_size(param: nn.Module, targets: Sequence[lora_lib.Target]) -> int:
  """How many numbers the hypernetwork predicts per image for these targets."""
  return sum(param.raw_size(t.d_in, t.d_out) for t in targets)
