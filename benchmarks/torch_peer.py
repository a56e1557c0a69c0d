"""The HyperLoRA step as a PyTorch user would write it: the peer of ours (issue 20, item 1).

transformers' CLIPVisionModel (trainable) -> a PyTorch transformer decoder of the design
and size of ours (`hyperlora_jax.models.hypernet.TransformerDecoder`: one token per
target layer, K rounds that refine the raw weights from zero) -> plain rank-r factors per
sample -> diffusers' UNet2DConditionModel, whose attention processors add each sample's
own LoRA to to_q/to_k/to_v/to_out.0: two einsums over the batch, ``up @ down`` never
formed (`PerSampleLoRAProcessor`). `gpu_benchmark.TorchBench.hyper_train` trains it with
AdamW under bf16 autocast, eager and torch.compile'd.
"""
import re

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from hyperlora_jax import lora as lora_lib
from hyperlora_jax.models import hypernet

PROJECTIONS = ('to_q', 'to_k', 'to_v', 'to_out.0')


def _lora_linear(linear: nn.Linear, x, factors):
  """linear(x) plus x's sample's LoRA: scale * up_b (down_b x) for each sample b."""
  y = linear(x)
  if factors is None:
    return y
  down, up, scale = factors  # [B, r, d_in], [B, d_out, r], scalar or [B]
  h = torch.einsum('bni,bri->bnr', x, down.to(x.dtype))
  delta = torch.einsum('bnr,bor->bno', h, up.to(x.dtype))
  scale = torch.as_tensor(scale, dtype=y.dtype, device=y.device)
  return y + delta * (scale.view(-1, 1, 1) if scale.ndim else scale)


class PerSampleLoRAProcessor:
  """diffusers' AttnProcessor2_0 for the UNet's transformer attentions (3-D inputs, no
  mask or norms around the attention), with a per-sample LoRA taken from the UNet call's
  ``cross_attention_kwargs={'lora': {attention name: {projection: (down, up, scale)}}}``."""

  def __init__(self, name: str):
    self.name = name

  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
               temb=None, lora=None):
    del temb
    if attention_mask is not None:
      raise ValueError(f'{self.name}: PerSampleLoRAProcessor takes no attention mask.')
    factors = (lora or {}).get(self.name, {})
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    batch = hidden_states.shape[0]
    q = _lora_linear(attn.to_q, hidden_states, factors.get('to_q'))
    k = _lora_linear(attn.to_k, context, factors.get('to_k'))
    v = _lora_linear(attn.to_v, context, factors.get('to_v'))
    split = lambda a: a.view(batch, -1, attn.heads, a.shape[-1] // attn.heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    out = out.transpose(1, 2).reshape(batch, -1, q.shape[-1]).to(q.dtype)
    out = _lora_linear(attn.to_out[0], out, factors.get('to_out.0'))
    return attn.to_out[1](out)  # dropout


def install_processors(unet) -> None:
  """Every attention of the UNet gets a `PerSampleLoRAProcessor`; attentions this
  processor does not cover (norms, masks, residuals inside) are refused by name."""
  processors = {}
  for key in unet.attn_processors:
    name = key[:-len('.processor')]
    attn = unet.get_submodule(name)
    extras = [f for f in ('spatial_norm', 'group_norm', 'norm_q', 'norm_k')
              if getattr(attn, f, None) is not None]
    if extras or attn.norm_cross or attn.residual_connection or attn.rescale_output_factor != 1:
      raise ValueError(f'{name}: an attention with {extras or "norm/residual settings"}; '
                       'PerSampleLoRAProcessor covers plain transformer attentions only.')
    processors[key] = PerSampleLoRAProcessor(name)
  unet.set_attn_processor(processors)


def _natural_key(name: str):
  return [int(s) if s.isdigit() else s for s in re.split(r'(\d+)', name)]


def lora_targets(unet, attention: str = 'attn2') -> tuple:
  """((attention name, projection, d_in, d_out), ...) for every ``attention`` layer
  (attn2: cross-attention, as our benchmark's HyperLoRA), in our targets' order."""
  found = []
  for key in unet.attn_processors:
    name = key[:-len('.processor')]
    if name.split('.')[-1] != attention:
      continue
    for proj in PROJECTIONS:
      linear = unet.get_submodule(f'{name}.{proj}')
      found.append((name, proj, linear.in_features, linear.out_features))
  return tuple(sorted(found, key=lambda t: _natural_key(f'{t[0]}.{t[1]}')))


class Block(nn.Module):
  """Our decoder's pre-LN block: self-attention, cross-attention to the image tokens,
  GELU MLP (flax's default tanh GELU and LayerNorm epsilon, so it is the same net)."""

  def __init__(self, width: int, heads: int):
    super().__init__()
    norm = lambda: nn.LayerNorm(width, eps=1e-6)
    self.norm_self, self.norm_cross, self.norm_mlp = norm(), norm(), norm()
    self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
    self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
    self.mlp_in, self.mlp_out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

  def forward(self, x, memory):
    h = self.norm_self(x)
    x = x + self.self_attn(h, h, h, need_weights=False)[0]
    h = self.norm_cross(x)
    x = x + self.cross_attn(h, memory, memory, need_weights=False)[0]
    return x + self.mlp_out(F.gelu(self.mlp_in(self.norm_mlp(x)), approximate='tanh'))


class TransformerDecoder(nn.Module):
  """`hypernet.TransformerDecoder` in PyTorch: raw weights per target group, zero at
  round 0, embedded per group with target position embeddings, refined by the blocks
  (attending to the image tokens, projected once) and added to in each round."""

  def __init__(self, groups, raw_sizes, memory_dim: int, width: int, depth: int,
               heads: int, rounds: int):
    super().__init__()
    self.counts = [len(idx) for _, idx in groups]
    self.raw_sizes, self.rounds = list(raw_sizes), rounds
    self.memory_proj = nn.Linear(memory_dim, width)
    self.pos_embedding = nn.Parameter(torch.randn(sum(self.counts), width) * 0.02)
    self.embeds = nn.ModuleList(nn.Linear(s, width, bias=False) for s in raw_sizes)
    self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
    self.norm_out = nn.LayerNorm(width, eps=1e-6)
    self.heads = nn.ModuleList(nn.Linear(width, s, bias=False) for s in raw_sizes)

  def forward(self, tokens):
    memory = self.memory_proj(tokens)
    raw = [tokens.new_zeros(tokens.shape[0], n, s) for n, s in zip(self.counts, self.raw_sizes)]
    for _ in range(self.rounds):
      x = torch.cat([e(r) for e, r in zip(self.embeds, raw)], dim=1) + self.pos_embedding
      for block in self.blocks:
        x = block(x, memory)
      x = self.norm_out(x)
      deltas = [head(h) for head, h in zip(self.heads, x.split(self.counts, dim=1))]
      raw = [r + d for r, d in zip(raw, deltas)]
    return raw


class HyperLoRA(nn.Module):
  """images (CLIP-normalized, NCHW at the tower's size) -> a plain rank-``rank`` LoRA per
  sample on every cross-attention projection, times one trainable gamma -> the frozen
  UNet's prediction. ``vit``: a CLIPVisionConfig dict; ``decoder``: width, depth, heads,
  rounds."""

  def __init__(self, unet, vit: dict, decoder: dict, rank: int):
    super().__init__()
    config = {k: v for k, v in vit.items() if k != 'projection_dim'}
    self.vit = transformers.CLIPVisionModel(
        transformers.CLIPVisionConfig(**config, attn_implementation='sdpa'))
    self.targets = lora_targets(unet)
    # Our grouping (equal (d_in, d_out) share embeddings and heads), so the same net.
    self.groups = hypernet.group_targets(
        [lora_lib.Target(f'{n}.{p}', d_in, d_out) for n, p, d_in, d_out in self.targets])
    self.rank = rank
    raw_sizes = [rank * (d_in + d_out) for (d_in, d_out), _ in self.groups]
    self.decoder = TransformerDecoder(self.groups, raw_sizes, config['hidden_size'], **decoder)
    self.gamma = nn.Parameter(torch.zeros(()))
    install_processors(unet)
    self.unet = unet.requires_grad_(False)  # frozen: the gradients reach the hypernetwork

  def lora(self, images) -> dict:
    """{attention name: {projection: (down [B, r, d_in], up [B, d_out, r], gamma)}}, the
    plain parameterization's fan-in scaling as ours (`lora.PlainLoRA`)."""
    tokens = self.vit(pixel_values=images).last_hidden_state
    r, factors = self.rank, {}
    for ((d_in, d_out), idx), raw in zip(self.groups, self.decoder(tokens)):
      down = raw[..., :r * d_in].unflatten(-1, (r, d_in)) * d_in ** -0.5
      up = raw[..., r * d_in:].unflatten(-1, (d_out, r)) * r ** -0.5
      for j, i in enumerate(idx):
        name, proj = self.targets[i][:2]
        factors.setdefault(name, {})[proj] = (down[:, j], up[:, j], self.gamma)
    return factors

  def forward(self, images, noisy, t, text, added_cond_kwargs=None):
    return self.unet(noisy, t, text, added_cond_kwargs=added_cond_kwargs,
                     cross_attention_kwargs={'lora': self.lora(images)}, return_dict=False)[0]
