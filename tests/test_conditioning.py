"""The controlnet and ip_adapter objectives through the real loop, their exports, the
add-ons any run takes (a ControlNet's pose guidance, an IP-Adapter's tokens beside a
HyperLoRA), per-sample condition images through sampling, and Table 1's grouped report
(tiny, fp32, 16 px posed synthetic data)."""
import json

import diffusers
import jax
import numpy as np
import pytest
import torch
import transformers

from hyperlora_jax import evaluate, objectives, runs, sample, stages, train
from hyperlora_jax.convert import clip_folders, ip_adapter_files
from hyperlora_jax.data import pipeline as data_pipeline
from hyperlora_jax.models import controlnet
from hyperlora_jax.objectives import conditioning
from tests.test_sample import make_run, shared_dirs, tiny_config

# One worker builds its fixtures; slow: scheduled first (tests/conftest.py).
pytestmark = [pytest.mark.xdist_group('conditioning'), pytest.mark.slow]

VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
           image_size=16, patch_size=4, projection_dim=16)
POSED = {'data.pose': True, 'data.resolution': 16,
         # A pixel-space UNet: condition images are not downsampled.
         'controlnet.conditioning_embedding_out_channels': (8,),
         'ip_adapter.hidden': 64, 'ip_adapter.heads': 1, 'ip_adapter.depth': 4,
         'ip_adapter.num_tokens': 4, 'ip_adapter.vit': VIT}


def _train(workdir, config):
  return train.train_and_evaluate(config, str(workdir), build_objective=objectives.build,
                                  create_dataset=data_pipeline.for_training,
                                  evaluate_fn=evaluate.evaluate_fn)


@pytest.fixture(scope='module')
def parts(tmp_path_factory):
  """A controlnet and an ip_adapter run trained 2 steps, exported as stages export
  them, and an untrained hyperlora run, on one from-scratch base model."""
  dirs = shared_dirs(tmp_path_factory)
  base = tmp_path_factory.mktemp('conditioning')
  out = {'dirs': dirs}
  for name in ('controlnet', 'ip_adapter'):
    config = tiny_config(dirs, name, **POSED)
    config.optim.lr = 1e-2
    out[f'{name}_state'] = _train(base / name, config)
    out[name] = str(base / name)
    out[f'{name}_export'] = stages.export_part(out[name], name)
  out['hyper'] = make_run(base / 'hyper', dirs, 'hyperlora', **POSED)
  out['batch'] = next(evaluate.batches(runs.load_config(out['hyper']), 'test', 4, 4))[0]
  return out


def test_controlnet_starts_as_the_base_model_and_trains(parts):
  run = runs.restore(parts['controlnet'])
  config, objective = run.config, run.objective
  assert objective.unet_input_keys == ('condition',) and run.spec.part == 'controlnet'
  trained = jax.tree.leaves(jax.tree.map(np.array_equal, run.params,
                                         parts['controlnet_state']['params']))
  assert all(trained)
  # diffusers' from_unet start: its zero convs give exactly zero residuals.
  start = objectives.build(config, jax.random.split(jax.random.key(config.seed))[0])
  batch = start.prepare(parts['batch'])
  text = {'context': jax.numpy.zeros((4, config.model.max_length, 32))}
  x, t = batch['target'], jax.numpy.full((4,), 500)
  zero = start.unet_inputs(start.trainable, start.frozen, batch).step(x, t, text)
  assert all(not np.any(r) for r in jax.tree.leaves(zero))
  steered = objective.unet_inputs(run.params, objective.frozen, batch).step(x, t, text)
  assert all(np.any(r) for r in jax.tree.leaves(steered))
  assert evaluate.own_mode(run.spec) == 'oracle'  # its eval hook: full prompt, posed


def test_exported_controlnet_is_a_diffusers_folder(parts):
  run = runs.restore(parts['controlnet'])
  with open(f'{parts["controlnet_export"]}/config.json') as f:
    module = controlnet.from_config(json.load(f))
  torch_control = diffusers.ControlNetModel.from_pretrained(parts['controlnet_export']).eval()
  rng = np.random.RandomState(0)
  x = rng.randn(2, 16, 16, 3).astype(np.float32)
  c = rng.randn(2, run.config.model.max_length, 32).astype(np.float32)
  cond = rng.rand(2, 16, 16, 3).astype(np.float32)
  t = np.array([10, 700])
  down, mid = module.apply({'params': run.params}, x, t, c, cond, conditioning_scale=0.7)
  nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)
  with torch.no_grad():
    ref_down, ref_mid = torch_control(torch.tensor(nchw(x)), torch.tensor(t), torch.tensor(c),
                                      torch.tensor(nchw(cond)), conditioning_scale=0.7,
                                      return_dict=False)
  for ours, ref in zip([*down, mid], [*ref_down, ref_mid]):
    scale = np.abs(ref.numpy()).max()
    assert scale > 0 and np.abs(nchw(ours) - ref.numpy()).max() / scale < 1e-4


def test_controlnet_attaches_to_a_hyperlora_run_per_sample(parts):
  """Pose guidance for a run trained without it: the ControlNet attached, each image's
  own pose map in both branches of guidance, beside its own predicted LoRA."""
  plain = runs.restore(parts['hyper'])
  guided = runs.restore(parts['hyper'], attach={'controlnet': {
      'folder': parts['controlnet_export'], 'scale': 30.0}})
  assert plain.objective.unet_input_keys == () and guided.objective.unet_input_keys == (
      'condition',)
  b = parts['batch']
  context, prompts = b['context'][:1].repeat(2, 0), [b['prompt_scene'][0]] * 2
  poses = b['condition'][:2]
  make = lambda run, poses: np.asarray(sample.generate(
      run, context, prompts, num_steps=2, image_ids=[0, 0],
      inputs=None if poses is None else {'condition': poses}))
  one = make(guided, poses)
  swapped = make(guided, poses[::-1])
  np.testing.assert_allclose(swapped, one[::-1], atol=1e-5)  # each image its own pose
  assert np.abs(one[0] - one[1]).max() > 1e-2  # ... and the pose steers it
  assert np.abs(one[0] - make(plain, None)[0]).max() > 1e-2
  with pytest.raises(ValueError, match=r"2 prompts need as many 'condition' inputs"):
    make(guided, None)
  with pytest.raises(ValueError, match='Cannot attach'):
    runs.restore(parts['hyper'], attach={'vae': {}})


def test_ip_adapter_trains_exports_and_joins_a_hyperlora(parts, tmp_path):
  run = runs.restore(parts['ip_adapter'])
  assert evaluate.own_mode(run.spec) == 'ip_adapter'
  evaluate.check_mode(run.config, 'ip_adapter')
  with pytest.raises(ValueError, match='needs image tokens'):
    evaluate.check_mode(runs.load_config(parts['hyper']), 'ip_adapter')
  folder = parts['ip_adapter_export']
  # What was trained is what the file holds, in the layout diffusers reads.
  adapter = ip_adapter_files.load_ip_adapter(f'{folder}/ip-adapter.safetensors',
                                             run.objective.frozen['unet'])
  for ours, theirs in ((adapter.projection_params, run.params['projection']),
                       (adapter.unet_params, run.params['unet'])):
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, ours, theirs)))
  # Its image encoder (random here) is a transformers folder.
  encoder, encoder_params, _ = clip_folders.load_vision_model(f'{folder}/image_encoder')
  images = parts['batch']['context']
  pixels = np.asarray((images + 1) / 2)
  torch_encoder = transformers.CLIPVisionModelWithProjection.from_pretrained(
      f'{folder}/image_encoder').eval()
  ours = encoder.apply({'params': encoder_params}, jax.numpy.asarray(pixels)).image_embeds
  with torch.no_grad():
    ref = torch_encoder(torch.tensor(pixels.transpose(0, 3, 1, 2))).image_embeds.numpy()
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
  # HyperLoRA + IP-Adapter: a hyperlora config with the exported adapter, frozen, gets
  # the same image tokens in its UNet call as the ip_adapter run it came from.
  config = tiny_config(parts['dirs'], 'hyperlora', **POSED)
  config.model.ip_adapter.update(weights=f'{folder}/ip-adapter.safetensors',
                                 image_encoder=f'{folder}/image_encoder')
  both = objectives.build(config, jax.random.key(0))
  assert both.unet_input_keys == ('context',) and 'ip_adapter' in both.frozen
  inputs = {'context': jax.numpy.asarray(images)}
  kw = lambda fn, params, frozen: fn(params, frozen, inputs).step(None, None, {})
  np.testing.assert_allclose(kw(both.unet_inputs, both.trainable, both.frozen)['ip_tokens'],
                             kw(run.objective.unet_inputs, run.params, run.objective.frozen)[
                                 'ip_tokens'], rtol=1e-5, atol=1e-6)
  assert evaluate.own_mode(both.spec) == 'hyperlora'
  evaluate.check_mode(config, 'ip_adapter')  # tokens without the LoRA: the add-on's


def test_grouped_report_rows_without_and_with_pose(parts, tmp_path):
  attach = {'controlnet': {'folder': parts['controlnet_export']}}
  rows = {evaluate.group_row(name, group): (workdir, mode, {'attach': a} if a else {})
          for group, a in (('without pose', {}), ('with pose', attach))
          for name, workdir, mode in (('HyperLoRA', parts['hyper'], 'hyperlora'),
                                      ('IP-Adapter', parts['ip_adapter'], 'ip_adapter'))}
  results = evaluate.compare(rows, str(tmp_path), num_examples=2, num_steps=1,
                             batch_size=4, grid_examples=2)
  for name, row in results['rows'].items():
    assert set(row['metrics']) >= {'color_acc', 'pose_acc', 'pose_err'}, name
    assert ('attach' in row.get('options', {})) == name.endswith('with pose')
  table = evaluate.grouped_table(results, ['HyperLoRA', 'IP-Adapter'],
                                 ['without pose', 'with pose']).splitlines()
  assert table[0] == ('| Row | without pose: color | without pose: pattern | without pose: pose '
                      '| with pose: color | with pose: pattern | with pose: pose |')
  assert [line.split(' | ')[0] for line in table[2:4]] == ['| HyperLoRA', '| IP-Adapter']
  assert (tmp_path / 'grid.png').stat().st_size > 0


def test_mismatches_are_named(parts):
  config = tiny_config(parts['dirs'], 'controlnet', **dict(
      POSED, **{'controlnet.conditioning_embedding_out_channels': (8, 16)}))
  with pytest.raises(ValueError, match=r'embeds condition images 2x smaller.*latents are 1x'):
    objectives.build(config, jax.random.key(0))
  own = tiny_config(parts['dirs'], 'controlnet', **POSED)
  own.model.controlnet.folder = parts['controlnet_export']
  with pytest.raises(ValueError, match='trains its own controlnet'):
    objectives.build(own, jax.random.key(0))
  flat = tiny_config(parts['dirs'], 'hyperlora', **dict(POSED, **{'data.pose': False}))
  flat.model.controlnet.folder = parts['controlnet_export']
  objective = objectives.build(flat, jax.random.key(0))
  batch = next(data_pipeline.create_dataset(flat.data, 'train', process_index=0,
                                            process_count=1, batch_size=4))
  with pytest.raises(ValueError, match=r"need \['condition'\] in the data"):
    objective.prepare(batch)
  assert conditioning.ADDONS == objectives.ADDONS


def test_init_from_starts_from_another_runs_params(parts, tmp_path):
  """train.init_from (the prompt schedule's second stage): the other run's newest params,
  or an error naming the run when there is none or they do not fit."""
  run = runs.restore(parts['controlnet'])
  zeros = jax.tree.map(jax.numpy.zeros_like, run.params)
  loaded = train._init_from(parts['controlnet'], zeros)  # pylint: disable=protected-access
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, loaded, run.params)))
  with pytest.raises(FileNotFoundError, match='no training run there'):
    train._init_from(str(tmp_path), zeros)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match='do not fit this run'):
    train._init_from(parts['ip_adapter'], zeros)  # pylint: disable=protected-access
