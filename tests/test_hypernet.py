"""Hypernetworks: every decoder x parameterization behind one interface."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from hyperlora_jax import defaults, lora, objectives
from hyperlora_jax.models import clip, hypernet, unet
from tests.test_unet import SD1_TINY

# One worker builds its fixtures; slow: scheduled first (tests/conftest.py).
pytestmark = [pytest.mark.xdist_group('hypernet'), pytest.mark.slow]

# Smaller than the parity config: these tests are about the hypernetwork, not the UNet.
UNET = dict(SD1_TINY, block_out_channels=(16, 32), cross_attention_dim=16,
            down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
            up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'))

DECODERS = ('transformer', 'heads', 'perceiver')
PARAMS = ('plain', 'lidb', 'basis', 'vera')


def _config(decoder, param, gamma_init=0.0, rounds=2):
  """decoder: a kind, or 'heads:attention' for the heads over their attention pool."""
  config = defaults.get_config().hypernet
  config.encoder.update(kind='conv', channels=(16, 32))
  kind, _, pool = decoder.partition(':')
  config.decoder.update(kind=kind, width=32, depth=1, heads=2, rounds=rounds, hidden=16,
                        pool=pool or 'embedding')
  config.param.update(kind=param, rank=2, a=8, b=8, seed=0, num_id=3, num_base=2)
  config.gamma_init = gamma_init
  return config


@pytest.fixture(scope='module')
def base():
  model = unet.from_config(UNET)
  params = jax.jit(model.init)(jax.random.key(0), *model.dummy_inputs())['params']
  targets = lora.find_targets(params, 'cross_attn,self_attn')
  images = jax.random.uniform(jax.random.key(2), (2, 16, 16, 3), minval=-1, maxval=1)
  inputs = (jax.random.normal(jax.random.key(3), (2, 8, 8, 4)), jnp.array([10, 700]),
            jax.random.normal(jax.random.key(4), (2, 5, 16)))
  return model, params, targets, images, inputs


COMBOS = [('transformer', 'lidb'), ('heads', 'plain'), ('perceiver', 'basis'), ('heads', 'vera'),
          ('heads:attention', 'plain')]


@pytest.mark.parametrize('decoder,param', list(itertools.product(DECODERS, PARAMS)))
def test_every_combination_starts_with_zero_scale(base, decoder, param):
  _, _, targets, images, _ = base
  net = hypernet.build(_config(decoder, param), targets)
  tree = jax.jit(net.apply)(jax.jit(net.init)(jax.random.key(5), images), images)
  assert set(tree) == {t.path for t in targets}
  assert all(float(f['scale']) == 0.0 for f in tree.values())


@pytest.mark.parametrize('decoder,param', COMBOS)
def test_starts_exactly_at_the_base_model(base, decoder, param):
  model, params, targets, images, inputs = base
  net = hypernet.build(_config(decoder, param), targets)
  tree = net.apply(jax.jit(net.init)(jax.random.key(5), images), images)
  # Every layer's predicted delta (up @ down, scale folded in) is exactly zero...
  for factors in tree.values():
    plain = lora.to_plain(factors)
    assert not np.any(np.asarray(plain['up'] @ plain['down']))
  # ...so the UNet's output is the base model's, up to how XLA fuses the two programs
  # (bitwise equal with its fusion emitters, within 1e-6 with its loop emitters).
  apply = jax.jit(lambda tree: model.apply({'params': params}, *inputs, lora=tree))
  np.testing.assert_allclose(apply(tree), apply(None), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('decoder,param', COMBOS)
def test_gradients_reach_every_trainable_param_only(base, decoder, param):
  model, params, targets, images, inputs = base
  net = hypernet.build(_config(decoder, param, gamma_init=0.5), targets)
  variables = jax.jit(net.init)(jax.random.key(5), images)
  frozen = {k: v for k, v in variables.items() if k != 'params'}

  def loss(trainable, unet_params):
    tree = net.apply({'params': trainable, **frozen}, images)
    return jnp.mean(model.apply({'params': unet_params}, *inputs, lora=tree) ** 2)

  grads = jax.jit(jax.grad(loss))(variables['params'], params)
  flat = traverse_util.flatten_dict(grads, sep='/')
  dead = [k for k, g in flat.items() if not np.any(np.asarray(g) != 0)]
  assert not dead, f'no gradient reaches {dead}'
  # Frozen random matrices are variables outside 'params': the optimizer never sees them.
  assert ('aux' in variables) == (param in ('lidb', 'vera'))


def test_heads_attention_pool_is_a_weighted_mean_of_the_tokens(base):
  _, _, targets, images, _ = base
  pooled = hypernet.build(_config('heads', 'plain', gamma_init=1.0), targets)
  attend = hypernet.build(_config('heads:attention', 'plain', gamma_init=1.0), targets)
  variables = jax.jit(attend.init)(jax.random.key(5), images)
  params = variables['params']
  decoder = dict(params['decoder'])
  tree = lambda net, dec: net.apply({**variables, 'params': {**params, 'decoder': dec}},
                                    images)
  # Zero queries weigh every token alike: the conv encoder's pooled embedding (their
  # mean), so the heads' weights give the embedding heads' LoRAs...
  zero = {**decoder, 'pool_queries': jnp.zeros_like(decoder['pool_queries'])}
  plain = {k: v for k, v in decoder.items() if not k.startswith('pool_')}
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               tree(attend, zero), tree(pooled, plain))
  # ...and a query per target makes each target read the tokens its own way.
  first = targets[0].path
  queries = jax.random.normal(jax.random.key(6), decoder['pool_queries'].shape) * 4
  weighted = tree(attend, {**decoder, 'pool_queries': queries})
  assert np.abs(weighted[first]['down'] - tree(attend, zero)[first]['down']).max() > 1e-3


def test_refinement_rounds_build_on_each_other(base):
  _, _, targets, images, _ = base
  one = hypernet.build(_config('transformer', 'plain', rounds=1), targets)
  two = hypernet.build(_config('transformer', 'plain', rounds=2), targets)
  variables = jax.jit(one.init)(jax.random.key(5), images)  # rounds share weights: same params
  first = one.apply(variables, images, method=lambda m, x: m.decoder(*m.encoder(x)))
  second = two.apply(variables, images, method=lambda m, x: m.decoder(*m.encoder(x)))
  for r1, r2 in zip(first, second):
    delta2 = r2 - r1
    assert np.abs(delta2).max() > 1e-4
    # Round 2 sees round 1's weights: its delta is not a repeat of round 1's.
    assert np.abs(delta2 - r1).max() > 1e-4


def test_per_sample_loras_differ_between_images(base):
  _, _, targets, images, _ = base
  net = hypernet.build(_config('heads', 'plain', gamma_init=1.0), targets)
  tree = net.apply(jax.jit(net.init)(jax.random.key(5), images), images)
  f = tree[targets[0].path]
  assert f['down'].shape == (2, 2, targets[0].d_in)
  assert np.abs(f['down'][0] - f['down'][1]).max() > 1e-4


def test_lidb_aux_is_row_orthonormal_and_rebuilt_from_the_seed(base):
  _, _, targets, images, _ = base
  net = hypernet.build(_config('transformer', 'lidb'), targets)
  aux_a = jax.jit(net.init)(jax.random.key(5), images)['aux']
  aux_b = net.init(jax.random.key(99), images)['aux']  # other init key, same seed
  jax.tree.map(np.testing.assert_array_equal, aux_a, aux_b)
  for down_aux, up_aux in jax.tree.leaves(aux_a, is_leaf=lambda x: isinstance(x, tuple)):
    for d, u in zip(down_aux, up_aux):
      np.testing.assert_allclose(d @ d.T, np.eye(d.shape[0]), atol=1e-5)
      np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), atol=1e-5)
  other = _config('transformer', 'lidb')
  other.param.seed = 1
  aux_c = hypernet.build(other, targets).init(jax.random.key(5), images)['aux']
  assert not np.allclose(jax.tree.leaves(aux_a)[0], jax.tree.leaves(aux_c)[0])


def _materialize(module, raw, d_in, d_out):
  variables = module.init(jax.random.key(0), raw, d_in, d_out, 0)
  return module.apply(variables, raw, d_in, d_out, 0), variables


def _delta(factors, b, t):
  """Dense update W (d_in x d_out) of target t in sample b, from the plain factors."""
  plain = lora.to_plain(hypernet.target_factors(factors, t))
  down = plain['down'][b] if plain['down'].ndim == 3 else plain['down']
  up = plain['up'][b] if plain['up'].ndim == 3 else plain['up']
  return np.asarray(down.T @ up.T)


def test_parameterizations_turn_known_raw_values_into_factors():
  rng = np.random.RandomState(0)
  d_in, d_out, r = 6, 5, 2
  # Plain: the raw vector is A then B, rescaled by the fan-ins.
  raw = jnp.asarray(rng.randn(2, 3, r * (d_in + d_out)), jnp.float32)
  f, _ = _materialize(lora.PlainLoRA(r), raw, d_in, d_out)
  a = np.asarray(raw[1, 2, :r * d_in]).reshape(r, d_in) / np.sqrt(d_in)
  b = np.asarray(raw[1, 2, r * d_in:]).reshape(d_out, r) / np.sqrt(r)
  np.testing.assert_allclose(_delta(f, 1, 2), a.T @ b.T, rtol=1e-5)
  # LiDB: down = D_train D_aux / sqrt(a), up = U_aux U_train / sqrt(b r).
  lidb = lora.LightweightDreamBooth(r, a=4, b=3, seed=7)
  raw = jnp.asarray(rng.randn(2, 3, r * 7), jnp.float32)
  f, variables = _materialize(lidb, raw, d_in, d_out)
  down_aux, up_aux = lora.lidb_aux(7, range(3), d_in, d_out, 4, 3)
  d_train = np.asarray(raw[0, 1, :r * 4]).reshape(r, 4)
  u_train = np.asarray(raw[0, 1, r * 4:]).reshape(3, r)
  down = d_train @ np.asarray(down_aux[1]) / 2
  up = np.asarray(up_aux[1]) @ u_train / np.sqrt(3 * r)
  np.testing.assert_allclose(_delta(f, 0, 1), down.T @ up.T, rtol=1e-5, atol=1e-6)
  # Basis: the update is the coefficient-weighted sum of the basis LoRAs.
  basis = lora.LoRABasis(r, num_id=2, num_base=1)
  raw = jnp.asarray(rng.randn(2, 3, 3), jnp.float32)
  f, variables = _materialize(basis, raw, d_in, d_out)
  p = variables['params']
  downs = np.asarray(p['down_6x5_0'][1]).reshape(3, r, d_in)
  ups = np.asarray(p['up_6x5_0'][1]).reshape(d_out, 3, r).transpose(1, 0, 2)
  want = sum(float(raw[1, 1, k]) * downs[k].T @ ups[k].T for k in range(3))
  np.testing.assert_allclose(_delta(f, 1, 1), want, rtol=1e-4, atol=1e-6)
  switched, _ = _materialize(lora.LoRABasis(r, 2, 1, use_id=False), raw, d_in, d_out)
  want_base = float(raw[1, 1, 2]) * downs[2].T @ ups[2].T
  np.testing.assert_allclose(_delta(switched, 1, 1), want_base, rtol=1e-4, atol=1e-6)
  # VeRA: W = A^T diag(d) B^T diag(b) with shared frozen A, B.
  vera = lora.VeRA(r, seed=3, max_in=8, max_out=8)
  raw = jnp.asarray(rng.randn(2, 3, r + d_out), jnp.float32)
  f, _ = _materialize(vera, raw, d_in, d_out)
  shared_a, shared_b = lora.vera_aux(3, r, 8, 8)
  d, bvec = np.asarray(raw[0, 2, :r]), np.asarray(raw[0, 2, r:])
  want = (np.asarray(shared_a[:, :d_in]).T * d) @ (np.asarray(shared_b[:d_out]) * bvec[:, None]).T
  np.testing.assert_allclose(_delta(f, 0, 2), want, rtol=1e-4, atol=1e-6)


def test_lidb_size_matches_the_paper_for_sd15():
  """HyperDreamBooth: rank 1, a=100, b=50 gives ~30K predicted numbers for SD1.5 (UNet
  self+cross attention plus the text encoder's attention and MLP layers), with the
  targets found as every objective finds them (UNet and text tower together)."""
  sd15 = dict(SD1_TINY, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
              down_block_types=('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',),
              up_block_types=('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3,
              cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
  model = unet.from_config(sd15)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *model.dummy_inputs()))
  text = clip.text_from_config(dict(hidden_size=768, intermediate_size=3072,
                                    num_hidden_layers=12, num_attention_heads=12))
  text_shapes = jax.eval_shape(lambda: text.init(jax.random.key(0), *text.dummy_inputs()))
  targets = objectives.base.find_targets(shapes['params'], (text_shapes['params'],),
                                         'cross_attn,self_attn,text_attn,text_mlp')
  unet_targets = [t for t in targets if not t.path.startswith('text_model/')]
  assert targets[:len(unet_targets)] == tuple(unet_targets)  # the UNet's first
  assert len(unet_targets) == 128 and len(targets) == 128 + 72
  assert {t.path.split('/')[-1] for t in targets[128:]} == {
      'q_proj', 'k_proj', 'v_proj', 'out_proj', 'fc1', 'fc2'}
  lidb = lora.LightweightDreamBooth(1, 100, 50, 0)
  assert hypernet.predicted_size(lidb, unet_targets) == 19_200
  assert hypernet.predicted_size(lidb, targets) == 30_000


def test_unknown_parts_are_refused(base):
  _, _, targets, _, _ = base
  for section, kind in (('encoder', 'resnet'), ('decoder', 'lstm'), ('param', 'dora')):
    config = _config('heads', 'plain')
    config[section].kind = kind
    with pytest.raises(ValueError, match=kind):
      hypernet.build(config, targets)


VIT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
           image_size=16, patch_size=8, projection_dim=8)


def test_vit_encoder_remat_keeps_params_values_and_gradients(base):
  """encoder.remat (a checkpointed lax.scan over the layers) changes memory, not math."""
  _, _, targets, images, _ = base

  def build(**encoder):
    config = _config('transformer', 'plain', gamma_init=0.5)
    config.encoder.update(kind='vit', vit=VIT, **encoder)
    return hypernet.build(config, targets)

  # The default: the projections' outputs are kept.
  assert build().encoder.tower.remat == 'dots_with_no_batch_dims_saveable'
  ref = build(remat='none')
  variables = jax.jit(ref.init)(jax.random.key(5), images)

  def outputs(net):
    loss = lambda v: sum(jnp.sum(x ** 2) for x in jax.tree.leaves(net.apply(v, images)))
    return jax.jit(net.apply)(variables, images), jax.jit(jax.grad(loss))(variables)

  ref_tree, ref_grads = outputs(ref)
  for remat in ('full', 'dots_with_no_batch_dims_saveable'):
    net = build(remat=remat)
    shapes = jax.eval_shape(net.init, jax.random.key(5), images)
    assert jax.tree.structure(shapes) == jax.tree.structure(variables)  # same param paths
    tree, grads = outputs(net)
    jax.tree.map(np.testing.assert_array_equal, tree, ref_tree)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6 * float(np.abs(r).max()) + 1e-12)
  with pytest.raises(ValueError, match='no_such_policy'):
    build(remat='no_such_policy').init(jax.random.key(5), images)
