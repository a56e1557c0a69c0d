"""HyperDreamBooth end to end: batched pre-optimization into a target-weights dataset,
the weight-space loss, text-tower LoRAs through diffusers, rank-relaxed fast fine-tuning
(library and CLI) and the Table 3 report, on tiny from-scratch models."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import quickstart_hdb, sd15_hyperdreambooth
from hyperlora_jax import export, finetune, lora as lora_lib, main, objectives, preoptimize
from hyperlora_jax import runs, sample, stages, traced, train
from hyperlora_jax.convert import lora_files, pipeline, target_weights
from hyperlora_jax.data import images, pipeline as data_pipeline
from hyperlora_jax.objectives import base as objective_base, hyperlora, lora_bank
from tests.test_sample import make_run, run_cli, shared_dirs, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The paper's layers (UNet self attention is the tiny UNet's cost, so cross only here).
TARGETS = 'cross_attn,text_attn,text_mlp'
LIDB = {'hypernet.param.kind': 'lidb', 'hypernet.param.rank': 1, 'hypernet.param.a': 8,
        'hypernet.param.b': 8}


def _data(**more):
  return {'data.prompt': 'static', 'data.context': 'target', 'model.targets': TARGETS, **more}


@pytest.fixture(scope='module')
def dirs(tmp_path_factory):
  return shared_dirs(tmp_path_factory)


@pytest.fixture(scope='module')
def bank(dirs, tmp_path_factory):
  """A pre-optimization of the tiny data's training identities (2 shards), run by main."""
  config = tiny_config(dirs, 'lora_bank', **_data(**{
      'bank.param.kind': 'lidb', 'bank.param.a': 8, 'bank.param.b': 8,
      'bank.subjects_per_step': 32}))
  workdir = str(tmp_path_factory.mktemp('bank'))
  index = main.train_one(config, workdir)
  return dict(config=config, workdir=workdir, index=index,
              keys=data_pipeline.subject_keys(config.data, 'train'))


def _delta(tree):
  """path -> the dense delta [d_out, d_in] of a shared tree, in float64."""
  out = {}
  for path, f in tree.items():
    f = lora_lib.to_plain(f)
    out[path] = np.asarray(f['up'], np.float64) @ np.asarray(f['down'], np.float64)
  return out


# ---------------------------------------------------------------- LoRA algebra
def test_stack_adds_deltas_and_compress_is_the_truncated_svd():
  rng = np.random.RandomState(0)
  shared = {'a': {'down': rng.randn(2, 6), 'up': rng.randn(5, 2), 'scale': 0.5}}
  batched = {'a': {'down': rng.randn(3, 1, 6), 'up': rng.randn(3, 5, 1),
                   'scale': np.array([1.0, 2.0, 0.0])}, 'b': {'down': rng.randn(3, 1, 4),
                                                              'up': rng.randn(3, 4, 1)}}
  stacked = lora_lib.stack(batched, shared)
  assert stacked['a']['down'].shape == (3, 3, 6) and stacked['b']['down'].shape == (3, 1, 4)
  for i in range(3):
    sample = {p: {k: np.asarray(v)[i] for k, v in f.items()} for p, f in stacked.items()}
    want = _delta({'a': {k: np.asarray(v)[i] for k, v in batched['a'].items()}})['a']
    np.testing.assert_allclose(_delta(sample)['a'], want + _delta(shared)['a'], rtol=1e-5,
                               atol=1e-6)

  tree = {p: {'down': rng.randn(4, d), 'up': rng.randn(d + 1, 4)} for p, d in
          (('x', 7), ('y', 3))}
  cut, error = lora_lib.compress(tree, 2)
  full, lost = _delta(tree), 0.0
  for path, delta in full.items():
    s = np.linalg.svd(delta, compute_uv=False)
    lost += np.sum(s[2:] ** 2)
    assert cut[path]['down'].shape[0] == 2
    u, sv, vt = np.linalg.svd(delta)
    np.testing.assert_allclose(_delta(cut)[path], (u[:, :2] * sv[:2]) @ vt[:2], atol=1e-5)
  total = sum(np.sum(d ** 2) for d in full.values())
  np.testing.assert_allclose(error, np.sqrt(lost / total), rtol=1e-6)
  assert lora_lib.compress(tree, 4)[1] < 1e-7  # rank 4 is exact


# ---------------------------------------------------------------- pre-optimization
@pytest.mark.xdist_group('hdb_bank')  # one worker fits the bank
@pytest.mark.slow
def test_preoptimization_fits_every_identity_and_resumes_without_refitting(bank):
  workdir, keys = bank['workdir'], bank['keys']
  index = bank['index']
  assert sorted(index['identities']) == sorted(keys) and len(keys) > 32  # 2 shards
  assert index['parameterization'] == {'kind': 'lidb', 'rank': 1, 'a': 8, 'b': 8, 'seed': 0}
  rows = target_weights.load(workdir, keys, index['parameterization'],
                             objectives.build(bank['config'], jax.random.key(0)).models.targets)
  # Every identity's up numbers moved off zero in the fit, each its own way.
  ups = np.concatenate([g[..., 8:].reshape(len(keys), -1) for g in rows], axis=1)
  assert np.all(np.abs(ups).max(axis=1) > 0)
  assert len({tuple(np.round(u, 6)) for u in ups}) == len(keys)

  first = os.path.join(workdir, target_weights.shard_name(0))
  second = os.path.join(workdir, target_weights.shard_name(1))
  before = (os.path.getmtime(first), target_weights.load(workdir, keys[32:],
                                                         index['parameterization'],
                                                         _targets(index)))
  os.remove(second)  # An interrupted run: shard 1 and the index were never written.
  os.remove(os.path.join(workdir, target_weights.INDEX))
  assert not preoptimize.finished(workdir)
  main.train_one(bank['config'], workdir)
  assert os.path.getmtime(first) == before[0]  # not refitted
  again = target_weights.load(workdir, keys[32:], index['parameterization'], _targets(index))
  for a, b in zip(again, before[1]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # the same fit again

  # A rerun with another config would fit the missing shards otherwise than these.
  other = bank['config'].copy_and_resolve_references()
  other.bank.subjects_per_step, other.optim.lr = 16, 0.5
  with pytest.raises(ValueError, match=r'(?s)holds 2 shards fitted with another config:'
                     r'\n  bank.subjects_per_step: 32 -> 16\n  optim.lr: .* -> 0.5\n'):
    main.train_one(other, workdir)


@pytest.mark.xdist_group('hdb_bank')  # one worker fits the bank
@pytest.mark.slow
def test_target_noise_measures_what_a_hypernetwork_can_learn_of_the_targets(bank):
  """benchmarks/target_noise.py on the bank's fit: a fit agrees with itself, attribute-
  linear numbers are explained and noise is not."""
  spec = importlib.util.spec_from_file_location(
      'target_noise', os.path.join(ROOT, 'benchmarks', 'target_noise.py'))
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  r = tool.report(bank['workdir'], again=bank['workdir'])
  assert r['identities'] == len(bank['keys']) and r['variance'] > 0
  assert r['retest'] == pytest.approx(1.0)
  identities, y = tool.load(bank['workdir'])
  assert tool.retest(y, 2 * y.mean(0) - y) == pytest.approx(-1.0)
  x = tool.attributes(identities)
  assert np.all(x.sum(1) == 5)  # shape, color, pattern, second color, the constant
  rng = np.random.RandomState(0)
  assert tool.attribute_r2(identities, x @ rng.randn(x.shape[1], 7)) > 0.999
  assert tool.attribute_r2(identities, rng.randn(len(identities), 7)) < 0.2


def _targets(index):
  return [lora_lib.Target(p, i, o) for p, i, o in index['targets']]


def test_bank_subjects_train_independently_in_one_compiled_loop(dirs):
  """Fitting subjects [A, B] and [A, C] gives A the same weights: no coupling between
  the rows (what makes a batched fit the fits one by one), in one fori_loop whose step
  count is an argument (no retracing)."""
  config = tiny_config(dirs, 'lora_bank', **_data(**{
      'bank.param.kind': 'plain', 'bank.param.rank': 2, 'bank.subjects_per_step': 2}))
  objective = objectives.build(config, jax.random.key(0))
  test = data_pipeline.load_records(config.data, 'test', [0, 1, 2])['target']
  fit = train.fit(objective.loss_fn, lora_bank.subject_batch, config.optim)
  rows = {}
  for name, pair in (('ab', [0, 1]), ('ac', [0, 2])):
    data = lora_bank.subject_data(objective.models, test[pair][:, None],
                                  [['a figure wearing S*']] * 2)
    rows[name], _ = fit(objective.trainable, objective.frozen, data, 3, np.float32(1e-2),
                        jax.random.key(1))
  for g in lora_bank.groups(rows['ab']):
    assert np.abs(np.asarray(g[:, :, -8:])).max() > 0  # up numbers moved
  for a, b in zip(lora_bank.groups(rows['ab']), lora_bank.groups(rows['ac'])):
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(a[1] - b[1])).max() > 1e-4
  same, _ = fit(objective.trainable, objective.frozen, data, 0, np.float32(1e-2),
                jax.random.key(1))
  jax.tree.map(np.testing.assert_array_equal, same, objective.trainable)
  assert fit._cache_size() == 1
  assert 'while' in str(jax.make_jaxpr(fit)(objective.trainable, objective.frozen, data,
                                            3, np.float32(1e-2), jax.random.key(1)))

  # Shards whose subjects have other image counts, padded to one k, run that program.
  prompts = [['a figure wearing S*'] * 2] * 2
  for shard in ([test[[0]], test[[1, 2]]], [test[[0, 1]], test[[2]]]):
    padded = lora_bank.subject_data(objective.models, shard, prompts, k=3)
    assert padded['target'].shape[:2] == (2, 3) and list(padded['count']) == [
        len(x) for x in shard]
    fit(objective.trainable, objective.frozen, padded, 1, np.float32(1e-2),
        jax.random.key(1))
  assert fit._cache_size() == 2  # k=1 above, k=3 here
  with pytest.raises(ValueError, match='k=1 images per subject, fewer than a subject'):
    lora_bank.subject_data(objective.models, [test[[0, 1]]], prompts[:1], k=1)


# ---------------------------------------------------------------- the weight-space loss
def _hyper_config(dirs, **more):
  return tiny_config(dirs, 'hyperlora', **_data(**{
      **LIDB, 'hypernet.decoder.kind': 'transformer', 'hypernet.decoder.width': 16,
      'hypernet.decoder.depth': 1, 'hypernet.decoder.heads': 2, 'hypernet.gamma_init': 1.0,
      **more}))


def _loss(objective, config, rng=1):
  it = data_pipeline.for_training(config, 'train', 0, 1)
  batch = jax.tree.map(jnp.asarray, objective.prepare(next(it)))
  return batch, objective.loss_fn(objective.trainable, objective.frozen, batch,
                                  jax.random.key(rng))


@pytest.mark.xdist_group('hdb_bank')  # one worker fits the bank
@pytest.mark.slow
def test_weight_space_loss_and_beta_zero_is_the_diffusion_loss_exactly(dirs, bank):
  config = _hyper_config(dirs)
  plain = objectives.build(config, jax.random.key(0))
  # The loss as it was before the weight-space term: the diffusion loss of the LoRA.
  reference = objective_base.diffusion_objective(
      hyperlora.SPEC, config, plain.models, plain.trainable, plain.frozen, lora=plain.lora)
  batch, (loss, metrics) = _loss(plain, config)
  assert 'subject' not in batch  # beta = 0 reads nothing new
  ref_loss, _ = reference.loss_fn(plain.trainable, plain.frozen, batch, jax.random.key(1))
  assert float(loss) == float(ref_loss) == float(metrics['diffusion_loss'])

  config = _hyper_config(dirs, **{'hypernet.loss.alpha': 2.0, 'hypernet.loss.beta': 0.5,
                                  'hypernet.loss.targets': bank['workdir']})
  weighted = objectives.build(config, jax.random.key(0))
  batch, (loss, metrics) = _loss(weighted, config)
  targets = target_weights.load(bank['workdir'], bank['keys'],
                                lora_lib.raw_fields(config.hypernet.param),
                                weighted.models.targets)
  _, raw = weighted.models.hypernet.apply(hyperlora.variables(
      weighted.trainable, weighted.frozen), batch['context'], with_raw=True)
  diffs = [np.asarray(r) - t[np.asarray(batch['subject'])] for r, t in zip(raw, targets)]
  want = sum(np.sum(d ** 2) for d in diffs) / sum(d.size for d in diffs)
  np.testing.assert_allclose(float(metrics['weight_loss']), want, rtol=1e-5)
  np.testing.assert_allclose(float(loss), 2 * float(metrics['diffusion_loss']) + 0.5 * want,
                             rtol=1e-5)


@pytest.mark.xdist_group('hdb_bank')  # one worker fits the bank
@pytest.mark.slow
def test_target_weights_that_do_not_fit_fail_at_start_naming_what_differs(dirs, bank,
                                                                          tmp_path):
  workdir, keys, index = bank['workdir'], bank['keys'], bank['index']
  fields, targets = index['parameterization'], _targets(index)
  with pytest.raises(ValueError, match='parameterization a: the dataset has 8, the '
                                       'hypernetwork 4'):
    objectives.build(_hyper_config(dirs, **{'hypernet.param.a': 4, 'hypernet.loss.beta': 1.0,
                                           'hypernet.loss.targets': workdir}),
                     jax.random.key(0))
  with pytest.raises(ValueError, match='has no layer up_blocks_9/attn2/to_q'):
    target_weights.load(workdir, keys, fields, targets + [
        lora_lib.Target('up_blocks_9/attn2/to_q', 4, 4)])
  with pytest.raises(ValueError, match=f'has other shapes at {targets[0].path}'):
    target_weights.load(workdir, keys, fields, [lora_lib.Target(targets[0].path, 1, 1)]
                        + targets[1:])
  with pytest.raises(ValueError, match=f'does not predict {targets[0].path}'):
    target_weights.load(workdir, keys, fields, targets[1:])
  with pytest.raises(ValueError, match=r"lack 1 of the .* e.g. \['a purple unicorn'\]"):
    target_weights.load(workdir, list(keys) + ['a purple unicorn'], fields, targets)
  with pytest.raises(FileNotFoundError, match='No target-weights dataset'):
    target_weights.load(str(tmp_path), keys, fields, targets)
  with pytest.raises(ValueError, match='needs hypernet.loss.targets'):
    objectives.build(_hyper_config(dirs, **{'hypernet.loss.beta': 1.0}), jax.random.key(0))


# ---------------------------------------------------------------- text-tower LoRAs
@pytest.fixture(scope='module')
def hyper_run(dirs, tmp_path_factory):
  """A LiDB hypernetwork run over UNet and text-tower layers (untrained, gamma 0.7)."""
  workdir = make_run(tmp_path_factory.mktemp('hyper_run'), dirs, gamma=0.7, **LIDB,
                     **_data(**{'hypernet.decoder.kind': 'transformer',
                                'hypernet.decoder.width': 16, 'hypernet.decoder.depth': 1,
                                'hypernet.decoder.heads': 2}))
  run = runs.restore(workdir)
  contexts = data_pipeline.load_records(run.config.data, 'test', [0, 1])['context']
  return dict(workdir=workdir, run=run, contexts=contexts)


@pytest.mark.xdist_group('hdb_hyper_run')  # one worker builds the run
@pytest.mark.slow
@pytest.mark.parametrize('fmt', ['diffusers', 'kohya'])
def test_predicted_text_tower_lora_loads_in_diffusers(hyper_run, tmp_path, fmt):
  import diffusers  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  run = hyper_run['run']
  models, params = run.objective.models, runs.base_params(run)
  path = str(tmp_path / 'lora.safetensors')
  export.export_lora(run, fmt, path, hyper_run['contexts'][:1])
  tree = runs.plain_loras(runs.lora(run, {'context': hyper_run['contexts'][:1]}))[0]
  assert any(p.endswith('mlp/fc1') for p in tree) and any('self_attn' in p for p in tree)
  folder = str(tmp_path / 'pipe')
  pipeline.save_pipeline(folder, params['unet'], models.unet_config, params['text'],
                         models.text_config, models.tokenizer_folder, models.scheduler_config)
  vae = diffusers.AutoencoderKL(
      block_out_channels=[8], norm_num_groups=8, layers_per_block=1, latent_channels=3,
      down_block_types=['DownEncoderBlock2D'], up_block_types=['UpDecoderBlock2D'])
  pipe = diffusers.StableDiffusionPipeline(
      unet=diffusers.UNet2DConditionModel.from_pretrained(f'{folder}/unet').eval(), vae=vae,
      text_encoder=transformers.CLIPTextModel.from_pretrained(f'{folder}/text_encoder').eval(),
      tokenizer=None, scheduler=diffusers.DDIMScheduler(), safety_checker=None,
      feature_extractor=None, requires_safety_checker=False)
  ids = objectives.tokenize(models, ['a figure wearing S*', 'a figure on the left'])
  with torch.no_grad():
    before = pipe.text_encoder(torch.tensor(ids[0])).last_hidden_state.numpy()
  pipe.load_lora_weights(path)
  with torch.no_grad():
    theirs = pipe.text_encoder(torch.tensor(ids[0])).last_hidden_state.numpy()
  ours = np.asarray(objectives.encode_prompts(models.text_towers, params, ids, tree)['context'])
  err = np.abs(theirs - ours).max() / np.abs(ours).max()
  assert np.abs(before - ours).max() / np.abs(ours).max() > 1e-2  # the LoRA matters
  assert err < 1e-4, err
  # The UNet part in the same file, through the same call.
  x = np.random.RandomState(0).randn(1, 16, 16, 3).astype(np.float32)
  t = np.array([500])
  ours_unet = np.asarray(models.unet.apply({'params': params['unet']}, x, t, ours[:1],
                                           lora=tree))
  with torch.no_grad():
    theirs_unet = pipe.unet(torch.tensor(x).permute(0, 3, 1, 2), torch.tensor(t),
                            torch.tensor(ours[:1])).sample.permute(0, 2, 3, 1).numpy()
  assert np.abs(theirs_unet - ours_unet).max() / np.abs(ours_unet).max() < 1e-4


# ---------------------------------------------------------------- fast fine-tuning
@pytest.mark.xdist_group('hdb_hyper_run')  # one worker builds the run
@pytest.mark.slow
def test_fast_finetuning_stacks_the_prediction_and_the_relaxed_lora(hyper_run):
  run, contexts = hyper_run['run'], hyper_run['contexts']
  with pytest.raises(ValueError, match='1 prompts for 2 subjects'):
    finetune.personalize(run, contexts, steps=3, rank=2, lr=1e-2, prompt=['a'])
  # One prompt per subject (e.g. each photo's caption).
  captions = ['a figure on the left wearing S*', 'a figure on the right wearing S*']
  personal = finetune.personalize(run, contexts, steps=3, rank=2, lr=1e-2, prompt=captions)
  trees, errors = finetune.loras(personal)
  # The next subjects of these shapes run the same compiled loop, to the same numbers.
  again = finetune.personalize(run, contexts, steps=3, rank=2, lr=1e-2, prompt=captions)
  assert personal.compile_s > 0 and again.compile_s == 0
  for tree, tree_again in zip(trees, finetune.loras(again)[0]):
    for path, factors in tree.items():
      np.testing.assert_array_equal(factors['up'], tree_again[path]['up'])
  assert errors == [0.0, 0.0] and len(trees) == 2
  predicted = runs.plain_loras(personal.predicted)
  module = lora_bank.raw_lora(personal.run.config.bank.param, run.objective.models.targets)
  relaxed = module.apply({}, lora_bank.groups(personal.run.params))
  for i, tree in enumerate(trees):
    assert {f['down'].shape[0] for f in tree.values()} == {1 + 2}  # LiDB rank 1 + 2
    relaxed_i = {p: {k: np.asarray(v)[i] if np.ndim(v) else v for k, v in f.items()}
                 for p, f in relaxed.items()}
    want = {p: d + _delta(relaxed_i)[p] for p, d in _delta(predicted[i]).items()}
    moved = max(np.abs(d).max() for d in _delta(relaxed_i).values())
    assert moved > 1e-4
    for path, d in _delta(tree).items():
      np.testing.assert_allclose(d, want[path], rtol=1e-5, atol=1e-6 * np.abs(d).max())
  # Compressed to rank 1: the truncated SVD's error of the whole stacked LoRA.
  cut, cut_errors = finetune.loras(personal, export_rank=1)
  assert {f['down'].shape[0] for f in cut[0].values()} == {1}
  assert cut_errors[0] == pytest.approx(lora_lib.compress(trees[0], 1)[1]) and cut_errors[0] > 0
  # 0 steps: the hypernetwork alone, exactly its prediction.
  alone = finetune.loras(finetune.personalize(run, contexts, steps=0, rank=2, lr=1e-2))[0]
  for path, d in _delta(alone[1]).items():
    np.testing.assert_array_equal(d, _delta(predicted[1])[path])
  # Each subject's own LoRA is what its sampling applies.
  pictures = np.asarray(sample_images(personal.run, 2))
  assert np.abs(pictures[0] - pictures[1]).max() > 1e-3


def test_a_fresh_process_reads_the_traced_loop_back(hyper_run, dirs, monkeypatch):
  """With a compilation cache, the loop's traced program is kept beside it (traced.py):
  a process without the loop in memory (here: an emptied _FITS) does not trace the
  model again, and runs the same numbers."""
  run, contexts = hyper_run['run'], hyper_run['contexts']
  kwargs = dict(steps=2, rank=2, lr=1e-2)
  monkeypatch.setattr(finetune, '_FITS', {})
  first = finetune.personalize(run, contexts, **kwargs)
  assert any(n.endswith(traced.SUFFIX) for n in os.listdir(traced.folder()))
  draws, draw = [], lora_bank.subject_batch
  monkeypatch.setattr(lora_bank, 'subject_batch',
                      lambda *a, **k: draws.append(1) or draw(*a, **k))
  monkeypatch.setattr(finetune, '_FITS', {})
  again = finetune.personalize(run, contexts, **kwargs)
  assert again.compile_s > 0 and not draws  # compiled, from the file: never traced
  for tree, tree_again in zip(finetune.loras(first)[0], finetune.loras(again)[0]):
    for path, factors in tree.items():
      np.testing.assert_array_equal(factors['up'], tree_again[path]['up'])


def sample_images(run, n):
  return sample.generate(run, None, ['a figure wearing S*'] * n, num_steps=2,
                         inputs={'subject': np.arange(n)})


@pytest.mark.xdist_group('hdb_hyper_run')  # one worker builds the run
@pytest.mark.slow
def test_what_cannot_be_fine_tuned_is_refused(hyper_run, dirs, tmp_path):
  run = hyper_run['run']
  for kwargs, message in ((dict(steps=-1), '--steps must be >= 0'),
                          (dict(rank=0), '--rank must be >= 1'),
                          (dict(steps=0, from_scratch=True), 'nothing to write')):
    with pytest.raises(ValueError, match=message):
      finetune.check(run, **{'steps': 40, 'rank': 4, 'from_scratch': False, **kwargs})
  basis = run._replace(config=run.config.copy_and_resolve_references())
  basis.config.hypernet.param.kind = 'basis'
  with pytest.raises(ValueError, match="'basis' LoRAs, which cannot be rank-relaxed"):
    finetune.check(basis, 40, 4, False)
  finetune.check(basis, 40, 4, True)  # from scratch needs no prediction
  shared = runs.restore(make_run(tmp_path / 'lora', dirs, 'unet_lora'))
  with pytest.raises(ValueError, match='has no hypernetwork.*--from_scratch'):
    finetune.check(shared, 40, 4, False)


@pytest.mark.xdist_group('hdb_hyper_run')  # one worker builds the run
@pytest.mark.slow
def test_finetune_cli(hyper_run, dirs, tmp_path):
  faces = tmp_path / 'faces'
  faces.mkdir()
  for i, context in enumerate(hyper_run['contexts']):
    Image.fromarray(images.to_uint8(context)).save(faces / f'subject{i}.png')
  out = tmp_path / 'loras'
  result = run_cli('finetune', dirs, f'--workdir={hyper_run["workdir"]}',
                   f'--context={faces}', '--steps=3', '--rank=2', '--format=kohya',
                   '--export_rank=2', '--log_every=1', f'--out={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'step 3/3' in result.stdout and 'per subject' in result.stdout
  assert result.stdout.count('Wrote kohya LoRA of rank 2') == 2
  assert 'relative error' in result.stdout
  for i in range(2):
    tree = lora_files.load_lora_file(str(out / f'subject{i}.safetensors'))
    assert {f['down'].shape[0] for f in tree.values()} == {2}
  bad = run_cli('finetune', dirs, f'--workdir={hyper_run["workdir"]}', f'--context={faces}',
                '--steps=-1', f'--out={out}')
  assert bad.returncode != 0 and '--steps must be >= 0' in bad.stderr


# ---------------------------------------------------------------- the Table 3 report
@pytest.mark.xdist_group('hdb_hyper_run')  # one worker builds the run
@pytest.mark.slow
def test_personalization_report(hyper_run, tmp_path):
  os.symlink(hyper_run['workdir'], tmp_path / 'hyper')
  config = quickstart_hdb.get_config('smoke')
  with config.unlocked():
    config.report.update(num_examples=2, num_steps=2, rows=(
        dict(name='base model', runs=['hyper'], mode='no_lora'),
        dict(name='Only Hyper', runs=['hyper'], mode='hyperlora'),
        dict(name='Hyper + 1 step', runs=['hyper'], mode='hyperlora', steps=1, rank=2,
             lr=1e-2, from_scratch=False),
        dict(name='No Hyper, 2 steps', runs=['hyper'], mode='hyperlora', steps=2, rank=2,
             lr=1e-2, from_scratch=True)))
  results = stages.personalization_report(config, str(tmp_path))
  table = (tmp_path / 'report' / 'results.md').read_text()
  lines = table.splitlines()
  assert lines[0].startswith('| Row | color acc (%) | pattern acc (%) |')
  assert lines[0].endswith('| steps | s / subject |')
  assert [line.split(' | ')[0] for line in lines[2:6]] == [
      '| base model', '| Only Hyper', '| Hyper + 1 step', '| No Hyper, 2 steps']
  assert [results['rows'][n]['steps'] for n in ('Only Hyper', 'Hyper + 1 step')] == [0, 1]
  assert results['rows']['Hyper + 1 step']['objective'] == 'lora_bank'
  assert results['rows']['Hyper + 1 step']['seconds_per_subject'] > 0
  assert os.path.getsize(tmp_path / 'report' / 'grid.png') > 0


@pytest.mark.parametrize('size', sorted(quickstart_hdb.SIZES))
def test_hdb_config_is_complete(size):
  c = quickstart_hdb.get_config(size)
  assert c.stage_order[:2] == ('base', 'targets')
  assert objectives.spec(c.stages.targets.objective).per_subject
  for name in c.stage_order[1:]:
    stage = c.stages[name]
    assert stage.model.pretrained == 'stage:base'
    assert stage.data.prompt == quickstart_hdb.SIZES[size].get('prompt', 'static')
    assert stage.data.context == 'target'
    for key in ('resolution', 'item_frac', 'num_train', 'seed', 'test_fraction'):
      assert stage.data[key] == c.stages.base.data[key], key
    if stage.objective == 'hyperlora':  # predicts the very numbers the targets hold
      assert lora_lib.raw_fields(stage.hypernet.param) == lora_lib.raw_fields(
          c.stages.targets.bank.param)
      assert stage.hypernet.loss.targets in ('stage:targets', '')
  for row in c.report.rows:
    assert all(r in c.stages for r in row['runs']), row
  stage = c.stages.hyper.copy_and_resolve_references()
  stages._resolve_stages(stage, '/w', '/w/hyper')  # no export there: nothing recorded
  assert stage.hypernet.loss.targets == '/w/targets'
  assert stage.model.pretrained == '/w/base/pipeline'


def test_sd15_hyperdreambooth_targets_are_what_its_hypernetwork_predicts():
  targets, hyper = (sd15_hyperdreambooth.get_config(p) for p in ('targets', 'hypernet'))
  assert objectives.spec(targets.objective).per_subject and hyper.hypernet.loss.beta > 0
  assert lora_lib.raw_fields(targets.bank.param) == lora_lib.raw_fields(hyper.hypernet.param)
  assert targets.model.targets == hyper.model.targets and 'text_mlp' in hyper.model.targets
  assert targets.data.to_dict() == hyper.data.to_dict()
