"""Merging (sum, average, ZipLoRA, LoRA.rar) and the merge CLI, its files proven through
diffusers' own loader on a tiny random UNet; every bad input of issue 17 a clear error."""
import os
import subprocess
import sys

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft.utils import get_peft_model_state_dict
from safetensors.numpy import save_file

from hyperlora_jax import defaults
from hyperlora_jax import lora as lora_lib
from hyperlora_jax import merge
from hyperlora_jax import merging
from hyperlora_jax import objectives
from hyperlora_jax.convert import core, lora_files, pipeline
from hyperlora_jax.models import merger as merger_lib
from tests.test_unet import SD1_TINY, _inputs, _peft_lora, _rel_err, _torch_unet

pytestmark = pytest.mark.xdist_group('merge')  # one worker builds its fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _delta(f):
  f = lora_lib.to_plain(f)
  return np.asarray(f['up'], np.float64) @ np.asarray(f['down'], np.float64)


def _random_tree(paths_dims, rank, seed):
  rng = np.random.RandomState(seed)
  return {p: {'down': rng.randn(rank, d_in).astype(np.float32) * 0.3,
              'up': rng.randn(d_out, rank).astype(np.float32) * 0.3,
              'scale': np.float32(0.5)} for p, (d_in, d_out) in paths_dims.items()}


@pytest.fixture(scope='module')
def loras(tmp_path_factory):
  """A content LoRA made by diffusers/peft (rank 4, alpha 8, its own file) and a style
  LoRA of rank 2 written as a kohya file, over the same tiny UNet's attention."""
  folder = tmp_path_factory.mktemp('merge')
  unet_folder = str(folder / 'unet')
  _torch_unet(SD1_TINY).save_pretrained(unet_folder)
  model = diffusers.UNet2DConditionModel.from_pretrained(unet_folder)
  content = _peft_lora(model, rank=4, alpha=8)
  diffusers.StableDiffusionPipeline.save_lora_weights(
      str(folder), unet_lora_layers=get_peft_model_state_dict(model),
      unet_lora_adapter_metadata=model.peft_config['default'].to_dict())
  dims = {p: (f['down'].shape[1], f['up'].shape[0]) for p, f in content.items()}
  style = _random_tree(dims, rank=2, seed=1)
  lora_files.save_kohya_lora(style, str(folder / 'style.safetensors'))
  return dict(folder=folder, unet=unet_folder, content=content, style=style,
              content_file=str(folder / 'pytorch_lora_weights.safetensors'),
              style_file=str(folder / 'style.safetensors'))


def _torch_out(model):
  x, t, c = _inputs()
  with torch.no_grad():
    return model(torch.tensor(x), torch.tensor(t), torch.tensor(c)).sample.numpy()


def _with_delta(unet_folder, deltas):
  """The torch UNet with the given deltas added to its weights by hand."""
  model = diffusers.UNet2DConditionModel.from_pretrained(unet_folder).eval()
  state = model.state_dict()
  with torch.no_grad():
    for path, delta in deltas.items():
      state[core.flax_path_to_torch_key(path.split('/')) + '.weight'] += torch.tensor(
          delta, dtype=torch.float32)
  model.load_state_dict(state)
  return model


@pytest.mark.parametrize('method,fmt', [('sum', 'diffusers'), ('average', 'kohya')])
def test_merged_file_loads_in_diffusers_with_the_merged_delta(loras, tmp_path, method, fmt):
  out = str(tmp_path / 'merged.safetensors')
  lines = []
  merge.merge_files(loras['content_file'], loras['style_file'], method, out, fmt,
                    weight=0.3, log=lines.append)
  assert 'merged in' in lines[-1] and 's in all' in lines[-1]
  w_c, w_s = (1.0, 1.0) if method == 'sum' else (0.3, 0.7)
  expected = {p: w_c * _delta(loras['content'][p]) + w_s * _delta(loras['style'][p])
              for p in loras['content']}
  model = diffusers.UNet2DConditionModel.from_pretrained(loras['unet']).eval()
  if fmt == 'diffusers':
    model.load_lora_adapter(out, prefix='unet')
  else:  # kohya files go through the pipeline's converter
    pipe = diffusers.StableDiffusionPipeline(
        unet=model, vae=diffusers.AutoencoderKL(
            block_out_channels=[8], norm_num_groups=8, layers_per_block=1,
            down_block_types=['DownEncoderBlock2D'], up_block_types=['UpDecoderBlock2D']),
        text_encoder=None, tokenizer=None, scheduler=diffusers.DDIMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(out)
  reference = _torch_out(_with_delta(loras['unet'], expected))
  assert _rel_err(_torch_out(diffusers.UNet2DConditionModel.from_pretrained(
      loras['unet']).eval()), reference) > 1e-2  # the merge matters
  assert _rel_err(_torch_out(model), reference) < 1e-4
  # Ranks add: 4 + 2 in every layer.
  read = lora_files.load_lora_file(out)
  assert {f['down'].shape[0] for f in read.values()} == {6}


def test_combine_is_exact_and_lorarar_starts_at_the_sum():
  dims = {'a/to_q': (6, 5), 'a/to_k': (6, 5), 'b/to_out_0': (5, 6)}
  content, style = _random_tree(dims, 3, 0), _random_tree(dims, 2, 1)
  rng = np.random.RandomState(2)
  m = {p: (rng.rand(d_in).astype(np.float32), rng.rand(d_in).astype(np.float32))
       for p, (d_in, _) in dims.items() if p != 'a/to_k'}
  merged = merging.combine(content, style, m)
  for p in dims:
    m_c, m_s = m.get(p, (np.ones(dims[p][0]),) * 2)
    np.testing.assert_allclose(
        _delta(merged[p]), _delta(content[p]) * m_c + _delta(style[p]) * m_s, rtol=1e-5,
        atol=1e-6)
  paths = merging.merger_paths(content, style)
  assert paths == ('a/to_q', 'b/to_out_0')
  net = merger_lib.Merger(paths, tuple(dims[p] for p in paths), hidden=8)
  x = [jnp.zeros((dims[p][0], 2 * dims[p][1])) for p in paths]
  params = net.init(jax.random.key(0), x)['params']
  summed = merging.merge(content, style, 'lorarar', merger=merging.TrainedMerger(net, params))
  for p in dims:
    np.testing.assert_allclose(_delta(summed[p]), _delta(content[p]) + _delta(style[p]),
                               rtol=1e-5, atol=1e-6)
  # A merger for other layers is refused, naming them.
  other = merger_lib.Merger(('c/to_q',), ((6, 5),), hidden=8)
  with pytest.raises(ValueError, match=r"trained for other layers.*c/to_q"):
    merging.merge(content, style, 'lorarar', merger=merging.TrainedMerger(other, params))


def _toy_predict(tree, inputs, base):
  """A two-layer model with LoRA: enough for ZipLoRA's loss to have something to do."""
  h = jnp.tanh(inputs['x'] @ base['w0'] + lora_lib.lora_delta(inputs['x'], tree['l0']))
  return h @ base['w1'] + lora_lib.lora_delta(h, tree['l1'])


def test_ziplora_compiled_loop_equals_the_python_loop_and_lowers_the_loss():
  dims = {'l0': (6, 8), 'l1': (8, 4)}
  content, style = _random_tree(dims, 3, 0), _random_tree(dims, 2, 1)
  rng = np.random.RandomState(3)
  base = {'w0': rng.randn(6, 8).astype(np.float32), 'w1': rng.randn(8, 4).astype(np.float32)}
  inputs = {k: {'x': rng.randn(16, 6).astype(np.float32)} for k in ('content', 'style')}
  opts = dict(steps=30, lr=0.05, similarity=0.01)
  fast = merging.ziplora(content, style, _toy_predict, base, inputs, **opts)
  slow = merging.ziplora(content, style, _toy_predict, base, inputs, compiled=False, **opts)
  for p in dims:
    for a, b in zip(fast[p], slow[p]):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  targets = merging.lora_targets(content, style, _toy_predict, base, inputs)
  ones = {p: (jnp.ones(d), jnp.ones(d)) for p, (d, _) in dims.items()}
  loss = lambda m: float(merging.ziplora_loss(m, content, style, _toy_predict, base, inputs,
                                              targets)[0])
  assert loss(fast) < 0.7 * loss(ones)


@pytest.fixture(scope='module')
def tiny_base(tmp_path_factory):
  """A from-scratch tiny pipeline saved as a diffusers folder (--base)."""
  config = defaults.get_config('unet_full')
  config.data.resolution = 16
  pipe, tokenizers = objectives.base.load_base(config, jax.random.key(0))
  folder = str(tmp_path_factory.mktemp('base') / 'pipe')
  pipeline.save_pipeline(folder, pipe.unet_params, pipe.unet_config, pipe.text_params,
                         pipe.text_config, tokenizers[0], pipe.scheduler_config)
  targets = lora_lib.find_targets(pipe.unet_params, 'cross_attn')
  dims = {t.path: (t.d_in, t.d_out) for t in targets}
  files = {}
  for k, (name, rank) in enumerate((('content', 2), ('style', 3))):
    files[name] = str(tmp_path_factory.mktemp('loras') / f'{name}.safetensors')
    lora_files.save_diffusers_lora(_random_tree(dims, rank, k), files[name])
  return dict(folder=folder, files=files)


def test_cli_ziplora_through_the_base(tiny_base, tmp_path):
  out = str(tmp_path / 'zip.safetensors')
  files = tiny_base['files']
  result = _cli(f'--content={files["content"]}', f'--style={files["style"]}',
                '--method=ziplora', f'--base={tiny_base["folder"]}', '--steps=5',
                '--resolution=16', '--content_prompt=a figure wearing S*', f'--out={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Merging (ziplora)' in result.stdout and 'merged in' in result.stdout
  merged = lora_files.load_lora_file(out)
  content = lora_files.load_lora_file(tiny_base['files']['content'])
  style = lora_files.load_lora_file(tiny_base['files']['style'])
  summed = merging.merge(content, style, 'sum')
  diffs = [np.abs(_delta(merged[p]) - _delta(summed[p])).max() for p in merged]
  assert max(diffs) > 1e-4  # ZipLoRA moved the coefficients off the sum
  assert {f['down'].shape[0] for f in merged.values()} == {5}


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'hyperlora_jax.merge', *args],
                        capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)


def test_bad_inputs_are_clear_errors_and_leave_no_file(loras, tmp_path):
  content, style = loras['content_file'], loras['style_file']
  out = str(tmp_path / 'out.safetensors')
  # Other layer sets: named, and --allow_partial merges the common ones.
  some = {p: f for p, f in loras['style'].items() if 'attn1' in p}
  partial = str(tmp_path / 'partial.safetensors')
  lora_files.save_kohya_lora(some, partial)
  with pytest.raises(ValueError, match=r'other layers: only in the content LoRA .*attn2.*'
                     r'--allow_partial'):
    merge.merge_files(content, partial, 'sum', out, log=lambda _: None)
  tree = merge.merge_files(content, partial, 'sum', out, allow_partial=True, log=lambda _: None)
  ranks = {p: f['down'].shape[0] for p, f in tree.items()}
  assert all(r == (6 if 'attn1' in p else 4) for p, r in ranks.items())
  os.remove(out)
  # Other base model: a common layer of other shapes.
  small = {p: {'down': f['down'][:, :8], 'up': f['up'], 'scale': f['scale']}
           for p, f in loras['style'].items()}
  other = str(tmp_path / 'other.safetensors')
  lora_files.save_diffusers_lora(small, other)
  with pytest.raises(ValueError, match='other shapes'):
    merge.merge_files(content, other, 'sum', out, log=lambda _: None)
  # LoHa, LoKr, DoRA: refused naming their keys.
  name = 'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q'
  for key, kind in (('hada_w1_a', 'LoHa'), ('lokr_w1', 'LoKr'), ('dora_scale', 'DoRA')):
    path = str(tmp_path / f'{kind}.safetensors')
    save_file({f'{name}.{key}': np.ones((2, 2), np.float32),
               f'{name}.lora_down.weight': np.ones((2, 32), np.float32)}, path)
    with pytest.raises(ValueError, match=f'{kind} file.*{key}'):
      merge.merge_files(content, path, 'sum', out, log=lambda _: None)
  # Truncated, not safetensors, a pickle, missing.
  data = open(style, 'rb').read()
  bad = {'truncated': data[:len(data) // 2], 'text': b'{"not": "a LoRA"}'}
  for kind, payload in bad.items():
    path = tmp_path / f'{kind}.safetensors'
    path.write_bytes(payload)
    with pytest.raises(core.CheckpointError, match=f'{path}.*not a readable safetensors'):
      merge.merge_files(content, str(path), 'sum', out, log=lambda _: None)
  torch.save({'w': torch.ones(2)}, str(tmp_path / 'lora.pt'))
  with pytest.raises(ValueError, match='pickle.*refused'):
    merge.merge_files(str(tmp_path / 'lora.pt'), style, 'sum', out, log=lambda _: None)
  with pytest.raises(FileNotFoundError, match='missing.safetensors'):
    merge.merge_files(content, str(tmp_path / 'missing.safetensors'), 'sum', out,
                      log=lambda _: None)
  with pytest.raises(ValueError, match='--base'):
    merge.merge_files(content, style, 'ziplora', out, log=lambda _: None)
  with pytest.raises(ValueError, match='--merger'):
    merge.merge_files(content, style, 'lorarar', out, log=lambda _: None)
  assert not [n for n in os.listdir(tmp_path) if n.startswith('out.safetensors')]
  # The command line says it in one line.
  result = _cli(f'--content={content}', f'--style={tmp_path / "lora.pt"}', f'--out={out}')
  assert result.returncode == 1 and result.stderr.strip().startswith('Error: ')
  assert 'pickle' in result.stderr and 'Traceback' not in result.stderr
  assert not os.path.exists(out)
