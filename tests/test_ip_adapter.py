"""IP-Adapter parity against diffusers' own loader and IPAdapterAttnProcessor2_0 (tiny, fp32).

The files are random state dicts in the original IP-Adapter layout; diffusers reads
them with `_load_ip_adapter_weights`, we read them from safetensors.
"""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from flax import traverse_util
from safetensors.numpy import save_file

from hyperlora_jax import convert
from hyperlora_jax.convert import core, ip_adapter_files
from hyperlora_jax.models import ip_adapter, unet
from tests.test_unet import SD1_TINY, SD2_TINY, _inputs, _peft_lora, _rel_err, _torch_unet

pytestmark = pytest.mark.xdist_group('ip_adapter')  # one worker builds its fixtures

EMBED_DIM = 24  # the (tiny) CLIP image embedding


def _random_file(torch_unet, kind, rng, cross=32, pairs=None):
  """A random IP-Adapter state dict in the original layout, numbered as diffusers does."""
  w = lambda *shape: rng.randn(*shape).astype(np.float32) * 0.2
  if kind == 'plain':  # 4 tokens
    proj = {'proj.weight': w(4 * cross, EMBED_DIM), 'proj.bias': w(4 * cross),
            'norm.weight': 1 + w(cross), 'norm.bias': w(cross)}
  else:  # Plus: 4 latent queries, hidden 48, 1 head of 64, depth 4 (diffusers' only one)
    hidden, inner = 48, 64
    proj = {'latents': w(1, 4, hidden), 'proj_in.weight': w(hidden, EMBED_DIM),
            'proj_in.bias': w(hidden), 'proj_out.weight': w(cross, hidden),
            'proj_out.bias': w(cross), 'norm_out.weight': 1 + w(cross), 'norm_out.bias': w(cross)}
    for i in range(4):
      proj.update({f'layers.{i}.0.{n}.{leaf}': (1 if leaf == 'weight' else 0) + w(hidden)
                   for n in ('norm1', 'norm2') for leaf in ('weight', 'bias')})
      proj.update({f'layers.{i}.0.to_q.weight': w(inner, hidden),
                   f'layers.{i}.0.to_kv.weight': w(2 * inner, hidden),
                   f'layers.{i}.0.to_out.weight': w(hidden, inner),
                   f'layers.{i}.1.0.weight': 1 + w(hidden), f'layers.{i}.1.0.bias': w(hidden),
                   f'layers.{i}.1.1.weight': w(4 * hidden, hidden),
                   f'layers.{i}.1.3.weight': w(hidden, 4 * hidden)})
  modules = dict(torch_unet.named_modules())
  cross_attns = [n[:-len('.processor')] for n in torch_unet.attn_processors
                 if n.endswith('attn2.processor')]
  attn = {}
  for i in range(len(cross_attns) if pairs is None else pairs):
    inner = modules[cross_attns[min(i, len(cross_attns) - 1)]].to_k.weight.shape[0]
    attn[f'{2 * i + 1}.to_k_ip.weight'] = w(inner, cross)
    attn[f'{2 * i + 1}.to_v_ip.weight'] = w(inner, cross)
  return {'image_proj': proj, 'ip_adapter': attn}


def _save(parts, path):
  save_file({f'{part}.{k}': v for part, state in parts.items() for k, v in state.items()}, path)
  return path


def _diffusers_ip_unet(torch_unet, parts, with_lora=False):
  """diffusers' UNet with the IP-Adapter loaded, and our tree of its peft LoRA (added
  first, so that the LoRA stays off the Resampler's own to_q/to_k/to_v)."""
  model = copy.deepcopy(torch_unet)
  lora = _peft_lora(model) if with_lora else None
  model._load_ip_adapter_weights([{part: {k: torch.tensor(v) for k, v in state.items()}
                                   for part, state in parts.items()}], low_cpu_mem_usage=False)
  return model.eval(), lora


def _diffusers_out(model, x, t, c, image_embeds, scale, lora_scale=None):
  for processor in model.attn_processors.values():
    if isinstance(processor, IPAdapterAttnProcessor2_0):
      processor.scale = [scale]
  kwargs = {'cross_attention_kwargs': {'scale': lora_scale}} if lora_scale else {}
  with torch.no_grad():
    return model(torch.tensor(x), torch.tensor(t), torch.tensor(c),
                 added_cond_kwargs={'image_embeds': [torch.tensor(image_embeds)[:, None]]},
                 **kwargs).sample.numpy()


@pytest.fixture(scope='module')
def base(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp('unet'))
  torch_unet = _torch_unet(SD1_TINY)
  torch_unet.save_pretrained(folder)
  module, params, _ = convert.load_flax_model(folder, unet.from_config)

  @jax.jit
  def call(params, x, t, c, tokens, scale, lora):
    out = module.apply({'params': params}, jnp.asarray(x.transpose(0, 2, 3, 1)), t, c, lora=lora,
                       ip_tokens=tokens, ip_scale=scale)
    return out.transpose(0, 3, 1, 2)

  return dict(torch_unet=torch_unet, folder=folder, module=module, params=params, call=call)


def _ours(base, adapter, x, t, c, image_embeds, scale, lora=None):
  tokens = adapter.projection.apply({'params': adapter.projection_params}, image_embeds)
  params = ip_adapter.merge_params(base['params'], adapter.unet_params)
  return tokens, np.asarray(base['call'](params, x, t, c, tokens, jnp.asarray(scale), lora))


def test_ip_adapter_matches_diffusers_with_per_sample_scale(base, tmp_path):
  rng = np.random.RandomState(0)
  parts = _random_file(base['torch_unet'], 'plain', rng)
  adapter = ip_adapter_files.load_ip_adapter(_save(parts, str(tmp_path / 'ip-adapter.safetensors')),
                                             base['params'])
  assert isinstance(adapter.projection, ip_adapter.ImageProjection)
  x, t, c = _inputs()
  embeds = rng.randn(2, EMBED_DIM).astype(np.float32)
  model, _ = _diffusers_ip_unet(base['torch_unet'], parts)
  refs = {s: _diffusers_out(model, x, t, c, embeds, s) for s in (0.6, 1.0)}
  assert _rel_err(refs[0.6], refs[1.0]) > 1e-2  # the image tokens really steer the UNet
  tokens, out = _ours(base, adapter, x, t, c, embeds, [0.6, 1.0])  # one scale per sample
  with torch.no_grad():
    ref_tokens = model.encoder_hid_proj.image_projection_layers[0](torch.tensor(embeds)).numpy()
  assert _rel_err(np.asarray(tokens), ref_tokens) < 1e-5
  err = _rel_err(out, np.concatenate([refs[0.6][:1], refs[1.0][1:]]))
  print(f'IP-Adapter UNet max rel err {err:.2e}')
  assert err < 2e-5
  # ip_scale 0 is the UNet without IP-Adapter (its params are unchanged by it).
  with torch.no_grad():
    plain = base['torch_unet'](torch.tensor(x), torch.tensor(t), torch.tensor(c)).sample.numpy()
  assert _rel_err(_ours(base, adapter, x, t, c, embeds, [0.0, 0.0])[1], plain) < 2e-5
  assert not any('_ip' in '/'.join(p) for p in traverse_util.flatten_dict(base['params']))


def test_ip_adapter_plus_with_lora_matches_diffusers(base, tmp_path):
  """The Resampler's tokens and a LoRA on the UNet, in the same call."""
  rng = np.random.RandomState(1)
  parts = _random_file(base['torch_unet'], 'plus', rng)
  adapter = ip_adapter_files.load_ip_adapter(_save(parts, str(tmp_path / 'plus.safetensors')),
                                             base['params'])
  assert isinstance(adapter.projection, ip_adapter.Resampler) and adapter.projection.depth == 4
  x, t, c = _inputs()
  hidden_states = rng.randn(2, 5, EMBED_DIM).astype(np.float32)  # CLIP's penultimate layer
  model, lora = _diffusers_ip_unet(base['torch_unet'], parts, with_lora=True)
  ref = _diffusers_out(model, x, t, c, hidden_states, 0.5, lora_scale=0.8)
  lora = {p: dict(f, scale=f['scale'] * 0.8) for p, f in lora.items()}
  tokens, out = _ours(base, adapter, x, t, c, hidden_states, [0.5, 0.5], lora)
  with torch.no_grad():
    ref_tokens = model.encoder_hid_proj.image_projection_layers[0](
        torch.tensor(hidden_states)).numpy()
  assert _rel_err(np.asarray(tokens), ref_tokens) < 1e-5
  err = _rel_err(out, ref)
  print(f'IP-Adapter Plus + LoRA UNet max rel err {err:.2e}')
  assert err < 2e-5


def test_bin_file_needs_allow_pickle_and_reads_the_same(base, tmp_path):
  parts = _random_file(base['torch_unet'], 'plus', np.random.RandomState(2))
  bin_path = str(tmp_path / 'ip-adapter-plus.bin')
  torch.save({part: {k: torch.tensor(v) for k, v in state.items()}
              for part, state in parts.items()}, bin_path)
  with pytest.raises(convert.CheckpointError, match='pickle'):
    ip_adapter_files.load_ip_adapter(bin_path, base['params'])
  from_bin = ip_adapter_files.load_ip_adapter(bin_path, base['params'], allow_pickle=True)
  from_safetensors = ip_adapter_files.load_ip_adapter(
      _save(parts, str(tmp_path / 'plus.safetensors')), base['params'])
  same = jax.tree.map(np.array_equal, from_bin[1:], from_safetensors[1:])
  assert jax.tree.leaves(same) and all(jax.tree.leaves(same))


def test_cross_attentions_in_diffusers_order(tmp_path):
  """N counts diffusers' attention processors; SD2 stacks 2 transformer blocks per attention."""
  torch_unet = _torch_unet(SD2_TINY)
  torch_unet.save_pretrained(str(tmp_path))
  _, params, _ = convert.load_flax_model(str(tmp_path), unet.from_config)
  ours = [core.flax_path_to_torch_key(p) for p in ip_adapter_files.cross_attention_paths(params)]
  theirs = [n[:-len('.processor')] for n in torch_unet.attn_processors]
  assert theirs[1::2] == ours and all(n.endswith('attn1') for n in theirs[::2])
  assert ours[-1].startswith('mid_block') and any('transformer_blocks.1' in n for n in ours)


def test_file_that_does_not_fit_is_named(base, tmp_path):
  torch_unet, params, rng = base['torch_unet'], base['params'], np.random.RandomState(3)
  load = lambda parts, name: ip_adapter_files.load_ip_adapter(
      _save(parts, str(tmp_path / name)), params)
  sd15_like = _random_file(torch_unet, 'plain', rng, pairs=16)  # ip_adapter.1 ... ip_adapter.31
  with pytest.raises(convert.CheckpointError,
                     match=r'(?s)weights for 16 cross-attentions.*the UNet has 7 '
                           r'\(N = 1, 3, \.\.\., 13\).*18 unexpected.*ip_adapter\.15\.to_k_ip'):
    load(sd15_like, 'sd15.safetensors')
  narrow = _random_file(torch_unet, 'plain', rng, cross=16)  # text tokens of another width
  with pytest.raises(convert.CheckpointError, match=r'makes 16-dim tokens.*take 32'):
    load(narrow, 'narrow.safetensors')
  wrong = _random_file(torch_unet, 'plain', rng)
  wrong['ip_adapter']['3.to_v_ip.weight'] = wrong['ip_adapter']['3.to_v_ip.weight'][:, :8]
  del wrong['ip_adapter']['5.to_k_ip.weight']
  with pytest.raises(convert.CheckpointError,
                     match=r'(?s)1 missing:\n  ip_adapter\.5\.to_k_ip\.weight \(64, 32\) '
                           r'for up_blocks_1/attentions_0/transformer_blocks_0/attn2\n'
                           r'1 misshaped:\n  ip_adapter\.3\.to_v_ip\.weight: \(64, 8\), '
                           r'expected \(64, 32\) for down_blocks_1/'):
    load(wrong, 'wrong.safetensors')
  full = {'image_proj': {'proj.0.weight': np.zeros((4, 4), np.float32),
                         'proj.3.weight': np.zeros((4,), np.float32)},
          'ip_adapter': _random_file(torch_unet, 'plain', rng)['ip_adapter']}
  with pytest.raises(convert.CheckpointError, match='IP-Adapter Full is not supported'):
    load(full, 'full.safetensors')
  with pytest.raises(convert.CheckpointError, match='not an IP-Adapter file: no image_proj'):
    load({'ip_adapter': full['ip_adapter']}, 'no_proj.safetensors')
  with pytest.raises(FileNotFoundError, match='No such IP-Adapter file'):
    ip_adapter_files.load_ip_adapter(str(tmp_path / 'nowhere.safetensors'), params)


@pytest.mark.parametrize('kind', ['plain', 'plus'])
def test_written_file_is_the_original_layout(base, tmp_path, kind):
  """save_ip_adapter writes back, key for key and bit for bit, the file diffusers' loader
  took above (the layout of the original release), so what the ip_adapter objective
  trains loads in diffusers and here alike."""
  parts = _random_file(base['torch_unet'], kind, np.random.RandomState(4))
  adapter = ip_adapter_files.load_ip_adapter(_save(parts, str(tmp_path / 'in.safetensors')),
                                             base['params'])
  out = str(tmp_path / 'out.safetensors')
  ip_adapter_files.save_ip_adapter(out, adapter.projection, adapter.projection_params,
                                   adapter.unet_params, base['params'])
  written = ip_adapter_files.read_ip_adapter_file(out)
  assert {p: sorted(s) for p, s in written.items()} == {p: sorted(s) for p, s in parts.items()}
  for part, state in parts.items():
    for key, value in state.items():
      np.testing.assert_array_equal(written[part][key], value, err_msg=f'{part}.{key}')
  # The objective's start: the image attention reads as the text attention does.
  start = traverse_util.flatten_dict(ip_adapter_files.ip_params_from_unet(base['params']))
  flat = traverse_util.flatten_dict(base['params'])
  assert len(start) == 2 * len(ip_adapter_files.cross_attention_paths(base['params']))
  for path, value in start.items():
    np.testing.assert_array_equal(value, flat[path[:-2] + (path[-2][:-3], 'kernel')])
