"""benchmarks/torch_peer.py, the PyTorch peer of the HyperLoRA step: its per-sample LoRA
attention is diffusers' attention with each sample's LoRA merged into the weights, and
its hypernetwork is ours in size."""
import copy

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from benchmarks import torch_peer
from hyperlora_jax import defaults
from hyperlora_jax import lora as lora_lib
from hyperlora_jax.convert import core
from hyperlora_jax.models import clip, hypernet
from tests.test_unet import _rel_err, _torch_unet

pytestmark = pytest.mark.xdist_group('torch_peer')  # one worker builds its fixtures

UNET = dict(defaults.tiny_unet(channels=(32, 64), cross_attention_dim=32, heads=2),
            in_channels=4, out_channels=4)
VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
           image_size=32, patch_size=8, projection_dim=16)
DECODER = dict(width=32, depth=2, heads=2, rounds=2)


@pytest.fixture(scope='module')
def unet():
  return _torch_unet(UNET)


def _factors(unet, batch, rank=3, seed=0):
  """Random per-sample factors on every attention projection (self and cross)."""
  gen = torch.Generator().manual_seed(seed)
  factors = {}
  for attention in ('attn1', 'attn2'):
    for name, proj, d_in, d_out in torch_peer.lora_targets(unet, attention):
      factors.setdefault(name, {})[proj] = (
          torch.randn(batch, rank, d_in, generator=gen) * 0.3,
          torch.randn(batch, d_out, rank, generator=gen) * 0.3, torch.tensor([0.7, 1.3]))
  return factors


def test_per_sample_lora_attention_is_each_samples_merged_lora(unet):
  gen = torch.Generator().manual_seed(1)
  x, t = torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([10, 600])
  text = torch.randn(2, 5, 32, generator=gen)
  factors = _factors(unet, 2)
  peer = copy.deepcopy(unet)
  torch_peer.install_processors(peer)
  with torch.no_grad():
    ours = peer(x, t, text, cross_attention_kwargs={'lora': factors}).sample.numpy()
    plain = peer(x, t, text).sample.numpy()
  assert _rel_err(plain, ours) > 1e-2  # the LoRAs change the output, so the match counts
  for b in range(2):
    merged = copy.deepcopy(unet)
    merged.set_attn_processor(AttnProcessor2_0())
    with torch.no_grad():
      for name, projections in factors.items():
        for proj, (down, up, scale) in projections.items():
          merged.get_submodule(f'{name}.{proj}').weight += scale[b] * up[b] @ down[b]
      ref = merged(x[b:b + 1], t[b:b + 1], text[b:b + 1]).sample.numpy()
    err = _rel_err(ours[b:b + 1], ref)
    print(f'sample {b}: per-sample LoRA vs merged, max rel err {err:.2e}')
    assert err < 1e-5


def test_peer_hypernetwork_is_ours_in_size_and_runs(unet):
  """Same targets in the same groups, the same number of decoder params as our
  TransformerDecoder, and a ViT of our encoder's size (ours adds the CLIP projection)."""
  peer = torch_peer.HyperLoRA(copy.deepcopy(unet), VIT, DECODER, rank=4)
  targets = lora_lib.find_targets(_flax_unet_shapes(), 'cross_attn')
  assert [(f'{n}.{p}', d_in, d_out) for n, p, d_in, d_out in peer.targets] == [
      (core.flax_path_to_torch_key(t.path.split('/')), t.d_in, t.d_out) for t in targets]
  config = defaults.get_config('hyperlora').hypernet
  config.encoder.update(kind='vit', vit=VIT)
  config.decoder.update(kind='transformer', **DECODER)
  config.param.update(kind='plain', rank=4)
  net = hypernet.build(config, targets, clip.vision_from_config(VIT))
  params = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
  count = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))
  ours_decoder = count(params['decoder'])
  assert sum(p.numel() for p in peer.decoder.parameters()) == ours_decoder
  projection = VIT['hidden_size'] * VIT['projection_dim']
  assert sum(p.numel() for p in peer.vit.parameters()) == count(params['encoder']) - projection

  images = torch.randn(2, 3, 32, 32)
  factors = peer.lora(images)
  for name, proj, d_in, d_out in peer.targets:
    down, up, gamma = factors[name][proj]
    assert down.shape == (2, 4, d_in) and up.shape == (2, d_out, 4) and gamma.requires_grad
  out = peer(images, torch.randn(2, 4, 16, 16), torch.tensor([3, 9]), torch.randn(2, 5, 32))
  out.float().square().mean().backward()
  assert peer.gamma.grad is not None and peer.unet.conv_in.weight.grad is None


def _flax_unet_shapes():
  from hyperlora_jax.models import unet as unet_lib  # pylint: disable=g-import-not-at-top
  module = unet_lib.from_config(UNET)
  return jax.eval_shape(lambda: module.init(jax.random.key(0), *module.dummy_inputs()))['params']


def test_diffusers_attention_refuses_what_the_processor_does_not_cover():
  vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4,
                                down_block_types=('DownEncoderBlock2D',),
                                up_block_types=('UpDecoderBlock2D',))
  with pytest.raises(ValueError, match='mid_block.attentions.0: an attention with'):
    torch_peer.install_processors(vae)
