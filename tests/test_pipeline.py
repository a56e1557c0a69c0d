"""A diffusers SD pipeline folder (tiny, random, saved by diffusers itself) drives the
same objectives as the real SD1.5 configs: loading, VAE latents, CLIP image encoder."""

import diffusers
import jax
import numpy as np
import pytest
import torch
import transformers

from configs import sd15_recontext
from hyperlora_jax import objectives
from hyperlora_jax.convert import clip_folders, pipeline
from hyperlora_jax.data import synthetic
from hyperlora_jax.models import clip, vae
from tests.test_sample import loss_and_grads

pytestmark = pytest.mark.xdist_group('pipeline')  # one worker builds its fixtures

TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=40)


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp('sd')
  torch.manual_seed(0)
  clip_folders.write_tokenizer(synthetic.vocabulary(), str(root / 'tok'), max_length=40)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(str(root / 'tok'))
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, **TEXT))
  sd = diffusers.StableDiffusionPipeline(
      unet=diffusers.UNet2DConditionModel(
          sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
          down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
          up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), cross_attention_dim=32,
          attention_head_dim=2, norm_num_groups=8),
      vae=diffusers.AutoencoderKL(block_out_channels=(16, 32), norm_num_groups=8,
                                  down_block_types=('DownEncoderBlock2D',) * 2,
                                  up_block_types=('UpDecoderBlock2D',) * 2, latent_channels=4),
      text_encoder=text, tokenizer=tokenizer,
      scheduler=diffusers.DDIMScheduler(beta_schedule='scaled_linear'),
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  sd.save_pretrained(str(root / 'sd'))
  transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
      image_size=32, patch_size=8, projection_dim=16)).save_pretrained(str(root / 'clip'))
  return str(root / 'sd'), str(root / 'clip'), sd


def test_load_pipeline_matches_diffusers_components(folders):
  sd_folder, _, sd = folders
  p = pipeline.load_pipeline(sd_folder)
  ids = clip.tokenize(p.tokenizer, ['a figure wearing S*'])
  np.testing.assert_array_equal(
      ids, sd.tokenizer(['a figure wearing S*'], padding='max_length', max_length=40,
                        return_tensors='np').input_ids)
  with torch.no_grad():
    ref = sd.text_encoder(torch.tensor(ids, dtype=torch.long)).last_hidden_state.numpy()
  ours = p.text.apply({'params': p.text_params}, ids).last_hidden_state
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
  assert p.schedule.prediction_type == 'epsilon' and p.vae is not None


def test_recontext_config_trains_on_a_pipeline_folder(folders):
  sd_folder, clip_folder, _ = folders
  stages = sd15_recontext.get_config('heads')
  stages.paths.update(pretrained=sd_folder, clip=clip_folder)
  # The paper's prompt schedule: the static prompt, then the merged prompts from there.
  assert stages.stage_order == ('static', 'merged')
  assert [stages.stages[n].data.prompt for n in stages.stage_order] == ['static', 'scene']
  assert stages.stages.merged.train.init_from == 'stage:static'
  config = stages.stages.merged.copy_and_resolve_references()
  assert config.model.pretrained == sd_folder
  config.hypernet.gamma_init = 0.1
  config.data.update(name='synthetic', resolution=32)
  config.train.compute_dtype = 'float32'
  objective = objectives.build(config, jax.random.key(0))
  # The CLIP tower's weights are the folder's, and they are trained.
  _, tower, _ = clip_folders.load_vision_model(clip_folder)
  np.testing.assert_array_equal(
      objective.trainable['encoder']['tower']['visual_projection']['kernel'],
      tower['visual_projection']['kernel'])
  examples = synthetic.generate(2, resolution=32)
  batch = objective.prepare({'context': examples['context'] / 127.5 - 1,
                             'target': examples['target'] / 127.5 - 1,
                             'prompt': np.array(examples['prompt_scene'])})
  _, grads = loss_and_grads(objective, batch, 1)
  norms = {k: float(sum(np.abs(x).sum() for x in jax.tree.leaves(g))) for k, g in grads.items()}
  assert all(n > 0 for n in norms.values()), norms
  # Latents come from the folder's VAE: the UNet diffuses 4 x 16 x 16 for 32 px images.
  latents = vae.encode_latents(objective.models.vae, objective.frozen['vae'], batch['target'])
  assert latents.shape == (2, 16, 16, 4)
