"""SDXL against diffusers and transformers: a tiny random StableDiffusionXLPipeline, saved
by diffusers itself, loaded by our code; its UNet, both text towers, two guided DDIM
steps, its LoRA files through diffusers' own loader, the merged UNet and bad folders."""
import functools
import json
import os
import shutil

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from safetensors.numpy import load_file

from configs import sdxl_basis
from hyperlora_jax import convert, defaults, diffusion, objectives, runs, sample
from hyperlora_jax import lora as lora_lib
from hyperlora_jax.convert import clip_folders, core, lora_files, pipeline
from hyperlora_jax.models import unet
from tests.test_sample import loss_and_grads
from tests.test_unet import _rel_err, _torch_unet

# SDXL's layout at toy width: no attention at full resolution, two layers per block,
# deeper transformers below, linear projections, text_time added conditioning whose
# input is the second tower's projection (32) + 6 time ids x 8.
SDXL_TINY = dict(
    sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=2,
    down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'),
    up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'),
    transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 2, 4),
    use_linear_projection=True, cross_attention_dim=64, addition_embed_type='text_time',
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=80, norm_num_groups=8)
# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json, every field it sets.
SDXL_BASE = json.loads("""{
  "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0",
  "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
  "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
  "block_out_channels": [320, 640, 1280], "center_input_sample": false,
  "class_embed_type": null, "class_embeddings_concat": false, "conv_in_kernel": 3,
  "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": null,
  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
  "downsample_padding": 1, "dual_cross_attention": false, "encoder_hid_dim": null,
  "encoder_hid_dim_type": null, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
  "layers_per_block": 2, "mid_block_only_cross_attention": null, "mid_block_scale_factor": 1,
  "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
  "num_attention_heads": null, "num_class_embeds": null, "only_cross_attention": false,
  "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
  "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": false,
  "resnet_time_scale_shift": "default", "sample_size": 128, "time_cond_proj_dim": null,
  "time_embedding_act_fn": null, "time_embedding_dim": null,
  "time_embedding_type": "positional", "timestep_post_act": null,
  "transformer_layers_per_block": [1, 2, 10],
  "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
  "upcast_attention": null, "use_linear_projection": true}""")
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=12)
PROMPTS = ['a photo of a red cat', 'blue dog']
SIZE = 16  # pixels; the VAE halves it


def _tokenizers(root):
  clip_folders.write_tokenizer(['a', 'photo', 'of', 'red', 'blue', 'cat', 'dog'],
                               str(root / 'tok'), max_length=TEXT['max_position_embeddings'])
  # SDXL's second tokenizer pads with '!', not with the end token.
  shutil.copytree(root / 'tok', root / 'tok2')
  config_path = root / 'tok2' / 'tokenizer_config.json'
  config = dict(json.loads(config_path.read_text()), pad_token='!')
  config_path.write_text(json.dumps(config))
  return [transformers.CLIPTokenizer.from_pretrained(str(root / t)) for t in ('tok', 'tok2')]


@pytest.fixture(scope='module')
def xl(tmp_path_factory):
  """The diffusers pipeline, its folder and our Pipeline loaded from it."""
  root = tmp_path_factory.mktemp('sdxl')
  tok, tok2 = _tokenizers(root)
  text = dict(TEXT, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
              bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
  torch.manual_seed(0)
  pipe = diffusers.StableDiffusionXLPipeline(
      vae=diffusers.AutoencoderKL(
          block_out_channels=(16, 32), norm_num_groups=8, latent_channels=4,
          down_block_types=('DownEncoderBlock2D',) * 2, up_block_types=('UpDecoderBlock2D',) * 2),
      text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**text)),
      text_encoder_2=transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
          **text, projection_dim=32, hidden_act='gelu')),
      tokenizer=tok, tokenizer_2=tok2, unet=_torch_unet(SDXL_TINY),
      scheduler=diffusers.DDIMScheduler(**diffusion.SD15_SCHEDULER_CONFIG))
  folder = str(root / 'xl')
  pipe.save_pretrained(folder)
  return dict(pipe=pipe, folder=folder, root=root, ours=pipeline.load_pipeline(folder))


def _unet_inputs(batch=2, seed=0):
  rng = np.random.RandomState(seed)
  return dict(x=rng.randn(batch, 4, 8, 8).astype(np.float32), t=np.array([10, 700][:batch]),
              context=rng.randn(batch, 5, 64).astype(np.float32),
              text_embeds=rng.randn(batch, 32).astype(np.float32),
              time_ids=np.array([[64, 48, 0, 8, 16, 16], [16, 16, 4, 0, 32, 24]][:batch],
                                np.float32))


def _torch_unet_out(model, i):
  with torch.no_grad():
    return model(torch.tensor(i['x']), torch.tensor(i['t']), torch.tensor(i['context']),
                 added_cond_kwargs={'text_embeds': torch.tensor(i['text_embeds']),
                                    'time_ids': torch.tensor(i['time_ids'])}).sample.numpy()


@functools.partial(jax.jit, static_argnums=0)  # one compile per module and LoRA layout
def _apply_unet(module, params, lora, x, t, context, text_embeds, time_ids):
  return module.apply({'params': params}, x, t, context, lora=lora, text_embeds=text_embeds,
                      time_ids=time_ids)


def _our_unet_out(module, params, i, lora=None, **overrides):
  i = dict(i, **overrides)
  out = _apply_unet(module, params, lora, i['x'].transpose(0, 2, 3, 1), i['t'], i['context'],
                    i['text_embeds'], i['time_ids'])
  return np.asarray(out).transpose(0, 3, 1, 2)


def test_unet_matches_diffusers(xl):
  module, params, _ = convert.load_flax_model(os.path.join(xl['folder'], 'unet'),
                                              unet.from_config)
  assert module.pooled_text_dim == 32 and module.transformer_layers == (1, 1, 2)
  i = _unet_inputs()
  ref = _torch_unet_out(xl['pipe'].unet, i)
  err = _rel_err(_our_unet_out(module, params, i), ref)
  print(f'SDXL UNet fp32 max rel err {err:.2e}')
  assert err < 2e-5
  # Both added inputs matter, so the match above covers them.
  for name, value in (('time_ids', i['time_ids'][::-1]), ('text_embeds', i['text_embeds'] * 2)):
    assert _rel_err(_our_unet_out(module, params, i, **{name: value}), ref) > 1e-3, name


def test_full_size_sdxl_config_has_diffusers_param_shapes():
  """SDXL base's own config, at full size: every diffusers parameter (a meta-device model,
  no memory) has our param of the same shape, and nothing else exists (2.57B in all)."""
  module = unet.from_config(SDXL_BASE)
  ours = traverse_util.flatten_dict(jax.eval_shape(
      lambda: module.init(jax.random.key(0), *module.dummy_inputs()))['params'])
  with torch.device('meta'):
    theirs = diffusers.UNet2DConditionModel.from_config(SDXL_BASE).state_dict()
  expected = {}
  for key, tensor in theirs.items():
    *path, leaf = core.torch_key_to_flax_path(key)
    shape = tuple(tensor.shape)
    if leaf == 'weight':  # Linear/Conv -> kernel ([kh, kw,] in, out), norms -> scale
      leaf = 'kernel' if len(shape) > 1 else 'scale'
      shape = shape[2:] + shape[1::-1] if len(shape) > 1 else shape
    expected[tuple(path) + (leaf,)] = shape
  assert {p: tuple(s.shape) for p, s in ours.items()} == expected
  assert sum(np.prod(s) for s in expected.values()) == 2_567_463_684


def test_defaults_sdxl_unet_is_the_base_config():
  """defaults.SDXL_UNET (what the benchmarks and configs build) gives diffusers the
  same UNet config as SDXL base's whole unet/config.json."""
  def config(fields):
    with torch.device('meta'):
      model = diffusers.UNet2DConditionModel.from_config(fields)
    return json.loads(json.dumps({k: v for k, v in model.config.items()
                                  if not k.startswith('_')}))

  assert config(defaults.SDXL_UNET) == config(SDXL_BASE)


def test_text_towers_and_prompt_encoding_match(xl):
  pipe, ours = xl['pipe'], xl['ours']
  assert ours.kind == 'sdxl' and ours.force_zeros_for_empty_prompt
  assert ours.text.projection_dim is None and ours.text2.projection_dim == 32
  ids = pipeline.tokenize_prompts(ours.tokenizers, PROMPTS)
  assert (ids[1] == pipe.tokenizer_2.pad_token_id).any()  # '!' padding, not the end token
  with torch.no_grad():
    ref = pipe.text_encoder_2(torch.tensor(ids[1], dtype=torch.long), output_hidden_states=True)
    context, _, pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
  out = ours.text2.apply({'params': ours.text2_params}, ids[1])
  errors = {'text_embeds': _rel_err(np.asarray(out.text_embeds), ref.text_embeds.numpy()),
            'last_hidden_state': _rel_err(np.asarray(out.last_hidden_state),
                                          ref.last_hidden_state.numpy())}
  errors.update({f'hidden_states[{k}]': _rel_err(np.asarray(a), b.numpy())
                 for k, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states))})
  cond = jax.jit(lambda p, i: pipeline.encode_prompts(ours.text_towers, p, i))(
      ours.text_tower_params, ids)
  assert set(cond) == {'context', 'text_embeds'}
  errors['context'] = _rel_err(np.asarray(cond['context']), context.numpy())
  errors['pooled'] = _rel_err(np.asarray(cond['text_embeds']), pooled.numpy())
  print('SDXL text', errors)
  assert max(errors.values()) < 1e-5, errors


def test_guided_ddim_steps_match_the_pipeline(xl):
  """Two DDIM steps with classifier-free guidance on both branches (the empty negative
  prompt as zeros, both towers from token ids, pooled embeds and time ids) against
  StableDiffusionXLPipeline's own loop."""
  pipe, ours = xl['pipe'], xl['ours']
  noise = np.random.RandomState(1).randn(2, 4, 8, 8).astype(np.float32)
  with torch.no_grad():
    ref = pipe(PROMPTS, height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=5.0,
               latents=torch.tensor(noise), output_type='latent').images.numpy()

  def run(params, ids, x):
    cond = pipeline.encode_prompts(ours.text_towers, params['text'], ids)
    uncond = jax.tree.map(jnp.zeros_like, cond)  # force_zeros_for_empty_prompt
    both = jax.tree.map(lambda u, c: jnp.concatenate([u, c]), uncond, cond)
    size = pipeline.time_ids(ours.unet, (SIZE, SIZE))
    model = lambda x, t: ours.unet.apply({'params': params['unet']}, x, t, **both, **size)
    return diffusion.sample(model, ours.schedule, x, 2, 'ddim', guidance_scale=5.0)

  out = jax.jit(run)(dict(text=ours.text_tower_params, unet=ours.unet_params),
                     pipeline.tokenize_prompts(ours.tokenizers, PROMPTS),
                     jnp.asarray(noise.transpose(0, 2, 3, 1)))
  err = _rel_err(np.asarray(out).transpose(0, 3, 1, 2), ref)
  print(f'two guided DDIM steps max rel err {err:.2e}')
  assert _rel_err(noise, ref) > 0.1 and err < 1e-4


def test_time_ids_as_diffusers():
  module = unet.from_config(SDXL_TINY)
  assert pipeline.time_ids(unet.from_config(dict(SDXL_TINY, addition_embed_type=None,
                                                 addition_time_embed_dim=None,
                                                 projection_class_embeddings_input_dim=None)),
                           (64, 48)) == {}
  ids = pipeline.time_ids(module, (64, 48), crop_top_left=(3, 4), original_size=(80, 60))
  np.testing.assert_array_equal(ids['time_ids'], [80, 60, 3, 4, 64, 48])
  with pytest.raises(ValueError, match=r'\(height, width\) sizes'):
    pipeline.time_ids(module, (64,))


def test_save_pipeline_round_trip(xl, tmp_path):
  ours, root = xl['ours'], xl['root']
  folder = str(tmp_path / 'saved')
  pipeline.save_pipeline(folder, ours.unet_params, ours.unet_config, ours.text_params,
                         ours.text_config, str(root / 'tok'), ours.scheduler_config,
                         text2_params=ours.text2_params, text2_config=ours.text2_config,
                         tokenizer2_folder=str(root / 'tok2'))
  for cls, part in ((diffusers.UNet2DConditionModel, 'unet'),
                    (transformers.CLIPTextModelWithProjection, 'text_encoder_2')):
    _, info = cls.from_pretrained(os.path.join(folder, part), output_loading_info=True)
    assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), part
  back = pipeline.load_pipeline(folder)
  assert back.kind == 'sdxl' and back.tokenizer2.pad_token == '!'
  for a, b in ((back.unet_params, ours.unet_params), (back.text2_params, ours.text2_params)):
    jax.tree.map(np.testing.assert_array_equal, a, b)
  with pytest.raises(ValueError, match='needs text2_params, text2_config and tokenizer2'):
    pipeline.save_pipeline(str(tmp_path / 'half'), ours.unet_params, ours.unet_config,
                           ours.text_params, ours.text_config, str(root / 'tok'),
                           ours.scheduler_config, text2_params=ours.text2_params)


def _pipeline_lora(ours, seed=0):
  """A random LoRA on every kind of UNet Dense layer and on both text towers, with mixed
  ranks and scales."""
  rng = np.random.RandomState(seed)
  factors = lambda d_in, d_out, r, scale: {
      'down': rng.randn(r, d_in).astype(np.float32) * 0.3,
      'up': rng.randn(d_out, r).astype(np.float32) * 0.3, 'scale': np.float32(scale)}
  targets = lora_lib.find_targets(
      ours.unet_params, r'attn[12]/(to_[qkv]|to_out_0)$|ff/|proj_(in|out)$|time_emb_proj$|'
                        r'(time|add)_embedding/linear_[12]$')
  tree = {t.path: factors(t.d_in, t.d_out, 4 if 'attn2' in t.path else 2,
                          1.5 if t.path.endswith('to_k') else 0.7) for t in targets}
  unet_paths = set(tree)
  for prefix in ('', pipeline.TEXT2_PREFIX):
    for t in lora_lib.find_targets({'text_model': ours.text_params['text_model']},
                                   r'self_attn/(q|v|out)_proj$|mlp/fc1$'):
      tree[prefix + t.path] = factors(t.d_in, t.d_out, 2, 0.6)
  return tree, unet_paths


@pytest.mark.parametrize('fmt', ['diffusers', 'kohya'])
def test_lora_file_loads_with_load_lora_weights(xl, tmp_path, fmt):
  ours = xl['ours']
  tree, unet_paths = _pipeline_lora(ours)
  path = str(tmp_path / 'lora.safetensors')
  if fmt == 'diffusers':
    lora_files.save_diffusers_lora(tree, path)
  else:
    lora_files.save_kohya_lora(tree, path, unet_config=ours.unet_config)
  keys = load_file(path)
  prefixes = (('unet.', 'text_encoder.', 'text_encoder_2.') if fmt == 'diffusers' else
              ('lora_unet_input_blocks_', 'lora_unet_middle_block_1_',
               'lora_unet_output_blocks_', 'lora_unet_time_embed_', 'lora_unet_label_emb_0_',
               'lora_te1_', 'lora_te2_'))
  assert all(any(k.startswith(p) for k in keys) for p in prefixes), sorted(keys)[:5]
  pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(xl['folder'])
  pipe.load_lora_weights(path)
  # Every UNet layer of ours is a peft layer of diffusers' UNet now.
  assert sum(k.endswith('lora_A.default_0.weight') for k in pipe.unet.state_dict()) == \
      len(unet_paths)
  i = _unet_inputs()
  err = _rel_err(_our_unet_out(ours.unet, ours.unet_params, i, lora=tree),
                 _torch_unet_out(pipe.unet, i))
  ids = pipeline.tokenize_prompts(ours.tokenizers, PROMPTS)
  with torch.no_grad():
    context, _, pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
  encode = jax.jit(lambda p, i, tree: pipeline.encode_prompts(ours.text_towers, p, i, lora=tree))
  cond = encode(ours.text_tower_params, ids, tree)
  text_err = max(_rel_err(np.asarray(cond['context']), context.numpy()),
                 _rel_err(np.asarray(cond['text_embeds']), pooled.numpy()))
  print(f'SDXL {fmt} file: UNet max rel err {err:.2e}, text {text_err:.2e}')
  assert err < 1e-4 and text_err < 1e-4
  plain = encode(ours.text_tower_params, ids, None)
  assert _rel_err(np.asarray(plain['text_embeds']), pooled.numpy()) > 1e-2  # LoRA matters
  back = lora_files.load_lora_file(path, ours)
  assert set(back) == set(tree)
  for p, f in tree.items():
    np.testing.assert_allclose(back[p]['scale'] * back[p]['up'] @ back[p]['down'],
                               f['scale'] * f['up'] @ f['down'], rtol=1e-5, atol=1e-6)


def test_merged_unet_folder(xl, tmp_path):
  ours = xl['ours']
  tree, unet_paths = _pipeline_lora(ours, seed=1)
  unet_lora = {p: tree[p] for p in unet_paths}
  lora_files.save_merged_unet(ours.unet_params, ours.unet_config, unet_lora, str(tmp_path))
  model, info = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path),
                                                               output_loading_info=True)
  assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys'))
  i = _unet_inputs()
  err = _rel_err(_torch_unet_out(model.eval(), i),
                 _our_unet_out(ours.unet, ours.unet_params, i, lora=unet_lora))
  print(f'merged SDXL UNet max rel err {err:.2e}')
  assert err < 1e-4


def test_sd15_lora_on_sdxl_names_what_does_not_fit(xl, tmp_path):
  ours = xl['ours']
  f = lambda d_in, d_out: {'down': np.ones((2, d_in), np.float32),
                           'up': np.ones((d_out, 2), np.float32), 'scale': 1.0}
  # SD 1.5 has attention in down_blocks_0, and 768-wide text states.
  sd15 = {'down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q': f(32, 32),
          'down_blocks_1/attentions_0/transformer_blocks_0/attn2/to_k': f(768, 64),
          'mid_block/attentions_0/transformer_blocks_0/attn1/to_v': f(64, 64)}
  path = str(tmp_path / 'sd15.safetensors')
  lora_files.save_kohya_lora(sd15, path)
  assert lora_files.load_lora_file(path).keys() == sd15.keys()  # fine without a base model
  with pytest.raises(ValueError, match=r'(?s)2 of the 3 LoRA layers do not fit.*'
                     r'down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q: no such Dense'
                     r'.*attn2/to_k: LoRA 768 -> 64, the layer 64 -> 64'):
    lora_files.load_lora_file(path, ours)
  # SDXL's kohya names are LDM names: reading them needs the UNet's config.
  xl_path = str(tmp_path / 'xl.safetensors')
  lora_files.save_kohya_lora({p: sd15[p] for p in list(sd15)[2:]}, xl_path,
                             unet_config=ours.unet_config)
  assert list(load_file(xl_path))[0].startswith('lora_unet_middle_block_1_transformer_blocks_0')
  with pytest.raises(ValueError, match="LDM .SDXL. name; reading one needs the UNet's config"):
    lora_files.load_lora_file(xl_path)
  with pytest.raises(ValueError, match='second-text-tower layers is an SDXL one'):
    lora_files.save_kohya_lora({pipeline.TEXT2_PREFIX + 'text_model/encoder/layers_0/mlp/fc1':
                                f(32, 64)}, xl_path)


def _copy(xl, tmp_path, edit):
  folder = str(tmp_path / 'copy')
  shutil.copytree(xl['folder'], folder)
  edit(folder)
  return folder


def test_bad_folders_name_the_problem(xl, tmp_path):
  rm = lambda part: lambda f: shutil.rmtree(os.path.join(f, part))
  for part in ('text_encoder_2', 'tokenizer_2'):
    with pytest.raises(FileNotFoundError, match=rf"no {part}/ folder; its unet/config.json "
                       r"says addition_embed_type='text_time' \(SDXL\)"):
      pipeline.load_pipeline(_copy(xl, tmp_path / part, rm(part)))

  def not_xl(folder):
    path = os.path.join(folder, 'unet', 'config.json')
    config = json.load(open(path))
    json.dump(dict(config, addition_embed_type=None), open(path, 'w'))
  with pytest.raises(ValueError, match=r'has text_encoder_2/, tokenizer_2/ \(an SDXL part\) '
                     'but its UNet has no SDXL added conditioning'):
    pipeline.model_kind(_copy(xl, tmp_path / 'sd', not_xl))

  def plain_tower(folder):  # a text_encoder_2 without its projection
    path = os.path.join(folder, 'text_encoder_2', 'config.json')
    config = json.load(open(path))
    json.dump(dict(config, architectures=['CLIPTextModel']), open(path, 'w'))
    shutil.copy(os.path.join(folder, 'text_encoder', 'model.safetensors'),
                os.path.join(folder, 'text_encoder_2', 'model.safetensors'))
  with pytest.raises(ValueError, match=r'text_encoder_2 projects to None .*takes a pooled '
                     r'text embedding of 32'):
    pipeline.load_pipeline(_copy(xl, tmp_path / 'plain', plain_tower))


def test_unsupported_sdxl_variants_are_refused():
  for change, message in (
      (dict(addition_embed_type='text'), "addition_embed_type='text' is not supported"),
      (dict(transformer_layers_per_block=[[1, 1], [1, 2], [2, 2]]), 'only one int per block'),
      (dict(reverse_transformer_layers_per_block=[[2, 2, 2], [1, 1, 1], [1, 1, 1]]),
       'reverse_transformer_layers_per_block'),
      (dict(projection_class_embeddings_input_dim=48), 'above 6 x addition_time_embed_dim'),
      (dict(addition_embed_type=None), 'without addition_embed_type')):
    with pytest.raises(ValueError, match=message):
      unet.from_config(dict(SDXL_TINY, **change))
  module = unet.from_config(SDXL_TINY)
  x, t, context = module.dummy_inputs()[:3]
  with pytest.raises(ValueError, match=r'pass text_embeds \[B, pooled\] and time_ids'):
    jax.eval_shape(lambda: module.init(jax.random.key(0), x, t, context))
  with pytest.raises(ValueError, match=r'text_embeds \(16\) \+ 6 time ids x 8 = 64 inputs'):
    jax.eval_shape(lambda: module.init(jax.random.key(0), x, t, context, None,
                                       jnp.zeros((1, 16)), jnp.zeros((1, 6))))


def test_generate_is_the_pipeline_end_to_end(xl):
  """sample.generate on the SDXL folder (both towers, zeros for the empty negative prompt,
  time ids, DDIM, the VAE decoder) against StableDiffusionXLPipeline's decoded images,
  from the same initial noise (generate's: image i's from (seed, i))."""
  base = runs.from_pretrained(xl['folder'])
  assert base.config.data.resolution == SIZE  # sample_size x the VAE's factor
  ours = sample.generate(base, None, PROMPTS, num_steps=2, guidance=5.0, seed=3)
  noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(jax.random.key(3), i),
                                               (8, 8, 4)))(jnp.arange(2))
  with torch.no_grad():
    ref = xl['pipe'](PROMPTS, height=SIZE, width=SIZE, num_inference_steps=2,
                     guidance_scale=5.0, latents=torch.tensor(np.asarray(noise).transpose(
                         0, 3, 1, 2)), output_type='np').images
  err = np.abs((np.asarray(ours) + 1) / 2 - ref).max()
  print(f'generate vs StableDiffusionXLPipeline: max abs pixel err {err:.2e}')
  assert ref.std() > 0.01 and err < 1e-4


def test_hyperlora_trains_on_an_sdxl_folder(xl):
  """The hypernetwork objective is unchanged on SDXL: its per-sample LoRA reaches the
  UNet through both towers' conditioning and the time ids, and grads reach it."""
  config = defaults.get_config('hyperlora')
  config.model.pretrained = xl['folder']
  config.data.resolution = SIZE
  config.train.compute_dtype = 'float32'
  config.hypernet.encoder.channels = (8, 16)
  config.hypernet.gamma_init = 0.5
  objective = objectives.build(config, jax.random.key(0))
  assert set(objective.frozen) >= {'unet', 'text', 'text2', 'vae'}
  rng = np.random.RandomState(0)
  batch = objective.prepare({'context': rng.uniform(-1, 1, (2, SIZE, SIZE, 3)),
                             'target': rng.uniform(-1, 1, (2, SIZE, SIZE, 3)),
                             'prompt': np.array(PROMPTS)})
  assert len(batch['input_ids']) == 2  # one id array per tower
  loss, grads = loss_and_grads(objective, batch, 1)
  assert np.isfinite(loss)
  assert all(float(np.abs(g).sum()) > 0 for g in jax.tree.leaves(grads['gamma']))


@pytest.mark.slow
def test_bytedance_basis_config_trains_on_an_sdxl_folder(xl, tmp_path):
  """configs/sdxl_basis.py's stage 3 at ByteDance's sizes (resamplers 1024 wide, 4
  deep, 12 heads of 64, two queries per layer, K = 128 bases of ranks 8 / 4, 16 identity
  tokens from a 512-d embedding, CLIP's penultimate layer) on the tiny SDXL folder and a
  tiny CLIP tower: one step of the three-condition loss; grads reach the ID branch."""
  transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
      image_size=SIZE, patch_size=8, projection_dim=16)).save_pretrained(str(tmp_path / 'clip'))
  config = sdxl_basis.basis_config('id_embed')
  config.model.pretrained = xl['folder']
  config.hypernet.encoder.pretrained = str(tmp_path / 'clip')
  config.data.resolution = SIZE
  config.train.compute_dtype = 'float32'
  config.hypernet.gamma_init = 0.5
  # The paper's trigger is 15 characters of this tokenizer: over its 12 positions.
  with pytest.raises(ValueError, match="basis.trigger='fcsks fxhks fhyks' is 15 tokens"):
    objectives.build(config, jax.random.key(0))
  config.basis.trigger = 'S*'
  objective = objectives.build(config, jax.random.key(0))
  assert set(objective.frozen) >= {'unet', 'text', 'text2', 'vae'}
  rng = np.random.RandomState(0)
  batch = objective.prepare({
      'context': rng.uniform(-1, 1, (2, 2, SIZE, SIZE, 3)), 'id': np.arange(2),
      'set_mask': np.array([[True, True], [True, False]]),
      'region': np.tile(np.array([2.0, 2.0, 12.0, 12.0]), (2, 2, 1)),
      'id_embed': rng.normal(size=(2, 2, 512)), 'target': rng.uniform(-1, 1, (2, SIZE, SIZE, 3)),
      'prompt': np.array(PROMPTS)})
  assert len(batch['input_ids']) == 2  # one id array per tower, with the trigger
  loss, grads = loss_and_grads(objective, batch, 1)
  assert np.isfinite(loss)
  flat = traverse_util.flatten_dict(grads, sep='/')
  queries = [v for p, v in flat.items() if p.startswith('id_decoder/id_')]
  assert queries and float(np.abs(flat['gamma_id'])) > 0
  assert all(float(np.abs(v).sum()) > 0 for p, v in flat.items()
             if p.startswith('identity/projector'))


@pytest.mark.slow
def test_sdxl_lorarar_config_builds_and_trains_on_an_sdxl_folder(xl, tmp_path):
  """configs/sdxl_lorarar.py's merger on the tiny SDXL folder, over a two-subject zoo
  written as lora_bank runs write it: its loss is finite and reaches the merger."""
  from configs import sdxl_lorarar  # pylint: disable=import-outside-toplevel
  from hyperlora_jax.convert import target_weights  # pylint: disable=import-outside-toplevel
  from hyperlora_jax.models import hypernet  # pylint: disable=import-outside-toplevel
  from hyperlora_jax.objectives import base  # pylint: disable=import-outside-toplevel
  config = sdxl_lorarar.get_config()
  config.model.pretrained = xl['folder']
  config.data.resolution = SIZE
  config.train.compute_dtype = 'float32'
  config.bank.param.rank = 2
  config.merger.hidden = 8
  pipe, _ = base.load_base(config, jax.random.key(0))
  targets = base.find_targets(pipe.unet_params, pipe.text_tower_params, config.model.targets)
  module = lora_lib.parameterization(config.bank.param, targets)
  rng = np.random.RandomState(0)
  for side in ('content', 'style'):
    raw = [rng.randn(2, n, size).astype(np.float32) * 0.1
           for n, size in hypernet.raw_shapes(module, targets)]
    target_weights.write_shard(str(tmp_path / side), 0, [f'{side}0', f'{side}1'], raw,
                               lora_lib.raw_fields(config.bank.param), targets)
    target_weights.write_index(str(tmp_path / side))
    config.merger[side] = str(tmp_path / side)
  objective = objectives.build(config, jax.random.key(0))
  assert objective.spec.name == 'lorarar' and 'text2' in objective.frozen
  assert all(p.endswith(('to_q', 'to_out_0')) for p in objective.models.hypernet.paths)
  batch = objective.prepare({'target': rng.uniform(-1, 1, (2, SIZE, SIZE, 3)),
                             'prompt': np.array(PROMPTS)})
  loss, grads = loss_and_grads(objective, batch, 1)
  assert np.isfinite(loss) and loss > 0
  assert sum(float(np.abs(g).sum()) for g in jax.tree.leaves(grads)) > 0
