"""Export: predicted LoRA files read back, the merged UNet, the hypernetwork
without Orbax, and the CLI. The run's LoRAs are LoRA-basis ones, so the export
must fold their per-sample coefficients into plain factors."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from hyperlora_jax import export, lora as lora_lib, runs
from hyperlora_jax.convert import core, hypernet_files, lora_files
from hyperlora_jax.data import images
from hyperlora_jax.models import unet
from tests.test_sample import examples, make_run, run_cli, shared_dirs

pytestmark = pytest.mark.xdist_group('export')  # one worker builds its fixtures

NUM_BASES, RANK = 3, 2


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  dirs = shared_dirs(tmp_path_factory)
  workdir = make_run(tmp_path_factory.mktemp('export_run'), dirs, gamma=0.7, **{
      'hypernet.param.kind': 'basis', 'hypernet.param.rank': RANK,
      'hypernet.param.num_id': 2, 'hypernet.param.num_base': 1})
  run = runs.restore(workdir)
  context = examples(2)[0][1:2]
  return dict(dirs=dirs, workdir=workdir, run=run, objective=run.objective,
              context=context, lora=runs.lora(run, {'context': context}))


def _deltas(tree):
  """Each layer's weight delta [d_in, d_out] as the UNet applies it: the LoRA
  delta of the identity (of sample 0 for per-sample trees)."""
  out = {}
  for path, f in tree.items():
    eye = jnp.eye(f['down'].shape[-1])
    batched = any(np.ndim(v) > lora_lib.SHARED_NDIM[k] for k, v in f.items())
    delta = lora_lib.lora_delta(eye[None] if batched else eye, f)
    out[path] = np.asarray(delta[0] if batched else delta)
  return out


def _assert_same_deltas(actual, expected):
  assert set(actual) == set(expected)
  for path, d in expected.items():
    assert np.abs(d).max() > 1e-3, path  # The LoRA is not trivially zero.
    np.testing.assert_allclose(actual[path], d, atol=1e-6 * np.abs(d).max(),
                               rtol=1e-5, err_msg=path)


@pytest.mark.parametrize('fmt', ['diffusers', 'kohya'])
def test_lora_file_round_trip(run, tmp_path, fmt):
  path = str(tmp_path / 'lora.safetensors')
  export.export_lora(run['run'], fmt, path, run['context'], {'hyperlora_jax.source': 'test'})
  _assert_same_deltas(_deltas(lora_files.load_lora_file(path)),
                      _deltas(run['lora']))
  with safe_open(path, 'np') as f:
    header = f.metadata()
  # Basis LoRAs become plain factors of rank (bases x rank), as stated.
  assert json.loads(header['hyperlora_jax.ranks']) == [NUM_BASES * RANK]
  assert header['hyperlora_jax.parameterization'] == 'basis'
  assert header['hyperlora_jax.source'] == 'test'


def test_shared_lora_of_a_unet_lora_run(run, tmp_path):
  workdir = make_run(tmp_path / 'lora_run', run['dirs'], 'unet_lora',
                     **{'lora.alpha': 2.0})
  lora_run = runs.restore(workdir)
  path = str(tmp_path / 'lora.safetensors')
  export.export_lora(lora_run, 'diffusers', path)
  expected = {p: dict(f, scale=0.5) for p, f in lora_run.params.items()}  # alpha / rank
  _assert_same_deltas(_deltas(lora_files.load_lora_file(path)), _deltas(expected))


def test_merged_unet(run, tmp_path):
  folder = str(tmp_path / 'unet')
  export.export_lora(run['run'], 'merged-unet', folder, run['context'])
  module, merged, _ = core.load_flax_model(folder, unet.from_config)
  rng = np.random.RandomState(0)
  x = rng.randn(1, 32, 32, 3).astype(np.float32)
  t = np.array([500], np.int32)
  tokens = rng.randn(1, 40, 32).astype(np.float32)
  apply = jax.jit(lambda p, lora: module.apply({'params': p}, x, t, tokens, lora=lora))
  ours = apply(merged, None)
  adapted = apply(run['objective'].frozen['unet'], run['lora'])
  base = apply(run['objective'].frozen['unet'], None)
  assert np.abs(adapted - base).max() > 1e-3
  np.testing.assert_allclose(ours, adapted, atol=1e-5)


def test_hypernet_round_trip(run, tmp_path):
  folder = str(tmp_path / 'hypernet')
  export.save_hypernet(run['run'], folder)
  assert sorted(os.listdir(folder)) == ['hypernet.json', 'hypernet.safetensors']
  module, variables, spec = hypernet_files.load(folder)
  assert spec['resolution'] == 32
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               module.apply(variables, run['context']), run['lora'])
  with pytest.raises(FileNotFoundError, match='not an exported hypernetwork'):
    hypernet_files.load(str(tmp_path))


def test_cli(run, tmp_path):
  image = tmp_path / 'item.png'
  Image.fromarray(images.to_uint8(run['context'])[0]).save(image)
  out = tmp_path / 'item.safetensors'
  result = run_cli('export', run['dirs'], f'--workdir={run["workdir"]}',
                   f'--context={image}', '--format=kohya', f'--out={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  _assert_same_deltas(_deltas(lora_files.load_lora_file(str(out))),
                      _deltas(run['lora']))


@pytest.mark.parametrize('args,message', [
    (['--workdir=RUN', '--format=lora'], 'flag --format=lora: value should be one '
     'of <diffusers|kohya|merged-unet|hypernet|comfyui|a1111>'),
    (['--workdir=/nonexistent/run', '--format=kohya'],
     'Error: No training run at /nonexistent/run'),
    (['--workdir=RUN', '--format=kohya', '--context=BAD'], 'Error: Cannot read the image'),
    (['--workdir=RUN', '--format=kohya'],
     'Error: A hyperlora run predicts its LoRA from --context'),
])
def test_cli_errors(run, tmp_path, args, message):
  bad = tmp_path / 'bad.png'
  bad.write_text('not an image')
  args = [a.replace('RUN', run['workdir']).replace('BAD', str(bad)) for a in args]
  result = run_cli('export', run['dirs'], *args, f'--out={tmp_path / "x"}')
  assert result.returncode == 1
  assert message in result.stderr, result.stderr[-2000:]


def test_comfyui_is_the_kohya_format(run, tmp_path):
  paths = [str(tmp_path / f'{fmt}.safetensors') for fmt in ('kohya', 'comfyui')]
  for fmt, path in zip(('kohya', 'comfyui'), paths):
    export.export_lora(run['run'], fmt, path, run['context'])
  kohya, comfyui = (core.read_safetensors(p) for p in paths)
  assert kohya.keys() == comfyui.keys() and all(k.startswith('lora_unet_') for k in kohya)
  for k, v in kohya.items():
    np.testing.assert_array_equal(comfyui[k], v)
