"""Every config key and its default, in one place.

`get_config(objective)` is the complete config that the experiment files (configs/*.py)
start from and override; the code reads each key without a default of its own.
`fill(config)` adds the keys a config lacks: a run's config.json written before a key
existed, or a hand-written config, so a new key's default keeps old runs as they were.

config.objective   what a run trains: a name in `objectives.REGISTRY`
config.seed        parameter init and training randomness (0)

config.data       the input pipeline (`data.pipeline`)
  name            'synthetic' | 'paired' | 'single' | 'triples' (builders.py documents
                  the folder layouts)
  data_dir        where TFDS data is built ('' -> TFDS default, ~/tensorflow_datasets)
  source_dir      the user's folder (paired / single / triples)
  prompts_file    paired: prompts JSONL ('' -> source_dir/prompts.jsonl)
  static_prompt   '' -> the builder's ('a person wearing S*', 'a [V] face',
                  'a photo of S*'; synthetic: 'a figure wearing S*')
  on_bad_example  'error' | 'skip' (see builders.py)
  convert_modes   convert grayscale / RGBA / CMYK... to RGB (logged), else such
                  images are bad examples (True)
  resolution      R of the batches (and of the synthetic images; keep the two equal
                  there: the scorer reads exact pixels) (32)
  prompt          'scene' (the example's own prompt; synthetic: the scene without the
                  item) | 'static' | 'full' (synthetic only)
  context         what a batch's 'context' image is: 'context' (the example's context
                  image; single-image data: the image) | 'target' (its target image: a
                  subject's own photo is the context, as in HyperDreamBooth) ('context')
  seed            shuffle seed and synthetic data seed (0)
  num_train, num_test, holdout_seed, test_fraction   synthetic sizes and held-out
                  identities (synthetic.py) (1000, 200, 0, 0.2)
  item_frac       synthetic: the item's side in the target, fraction of the resolution
                  (0.34); part of the built data's name, so data of another value is
                  never reused
  pose            synthetic: draw each figure's offset and size from a range no prompt
                  names, and give each example its pose map ('condition') (False; True
                  is part of the built data's name)
  styles          synthetic: frame each target in one of `synthetic.STYLES` (its
                  'style' key; the content and style LoRAs of a zoo). Off (False) keeps
                  data as built before; on is part of the built data's name
  batch_size      global batch size, divided among hosts (create_dataset's batch_size
                  argument overrides it) (8)
  num_threads     reader threads (4); prefetch: batches read ahead (4; >= num_threads,
                  or threads idle)
  num_workers     worker processes (grain mp_prefetch), each decoding whole batches
                  with its own threads: 0 = none (threads in this process; decoding is
                  GIL-bound at ~1,000 images/s), -1 = one per CPU core up to 16. A GPU
                  needs them (0)
  augment         training contexts' variations (`data.augment` documents them): p (0.0:
                  off), scale ((0.35, 1.0)), background (0.5), jpeg (0.5), jpeg_quality
                  ((30, 95)), lowres (0.3), lowres_scale ((0.3, 0.8))
  set_size        N > 0: each example is a subject's set of N context images with their
                  identity regions and embeddings (`data.subjects`; synthetic: N renders
                  of the item; 'subjects' folders: N of the subject's files); 0: one
                  context image per example (0)
  set_random      training draws 1..N images of each set (the rest masked out); else
                  always N (True)
  set_occlude     synthetic sets: probability that a render has part of its item covered
                  by a random color, so one render may mislead where several agree (0.5)
  id_embed_dim    the size of the precomputed identity embeddings ('subjects' folders:
                  a .npy beside each image or embeddings.npz); another size is an error
                  naming the file (512, ArcFace's)

config.model
  pretrained      a diffusers folder (unet/, text_encoder/, tokenizer/, scheduler/,
                  vae/): the base model; '' builds ``unet``/``text`` from scratch;
                  None (the SD1.5 configs) must be set on the command line
  unet, text      diffusers / transformers config dicts for from-scratch models
  max_length      token sequence length for a from-scratch tokenizer (40)
  scheduler       keys over SD1.5's scheduler config for from-scratch models, e.g.
                  prediction_type ('epsilon' | 'v_prediction'); a pretrained folder
                  brings its own scheduler/ and this section is not read
  targets         LoRA targets over the UNet and the text tower(s) (`lora.TARGET_SETS`
                  names or regexes: 'cross_attn', 'self_attn', 'ff' of the UNet,
                  'text_attn', 'text_mlp' of the text towers) ('cross_attn')
  prompt_dropout  probability of training on the empty prompt, for guidance (0.1)
  min_snr_gamma   min-SNR loss weighting (None = off)
  controlnet      folder: a diffusers controlnet/ folder (or 'stage:<name>', a
                  controlnet stage's export) run frozen beside the UNet on each sample's
                  'condition' image, in training and sampling ('' = none); scale: the
                  residuals' conditioning_scale, the controlnet objective's own too (1.0)
  ip_adapter      weights: an IP-Adapter file (the layout diffusers' load_ip_adapter
                  takes) and image_encoder: its CLIP vision folder (or 'stage:<name>' for
                  both: an ip_adapter stage's export), run frozen on each sample's
                  'context' image ('' = none); scale: the image attention's weight, the
                  ip_adapter objective's own too (1.0)

config.lora       rank (4), alpha (4.0): the ``unet_lora`` objective's shared LoRA

config.basis      ByteDance HyperLoRA's recipe (`objectives.hyperlora_basis`)
  stage           'base' (stage 1: the Base-LoRA from contexts whose identity region is
                  hidden) | 'id_clip' (stage 2: the ID-LoRA from the image encoder, Base
                  frozen, the three conditions) | 'id_embed' (stage 3: the ID-LoRA also
                  from the identity encoder, the image-encoder branch frozen) | 'joint'
                  (one stage, end to end: everything, the plain loss) ('joint')
  trigger         the rare words that call the ID-LoRA ('': S* on synthetic data, else
                  the paper's 'fcsks fxhks fhyks'); added to prompts that lack it
  conditions      the mixing ratio of the three conditions in stages 2 and 3 (each
                  sample draws one): with the trigger ID + Base reconstruct the target;
                  without it ID alone matches the base model, ID + Base the Base-LoRA
                  ((0.5, 0.25, 0.25))
  encoders        'separate' (each branch its own image encoder, so a trained encoder
                  of one branch stays frozen with it) | 'shared' (one, e.g. a frozen CLIP
                  tower: it trains in stage 1 and 'joint' only) ('separate')
  region          how the Base branch hides each context's identity region: mode
                  ('blur' | 'fill': the border's color | 'none'), blur (the Gaussian's
                  sigma, fraction of the image side: 0.1)
  identity        the identity encoder: kind ('none' | 'precomputed': the data's
                  embedding per image | 'crop': a conv net over the region's crop),
                  tokens (4), width (0: the decoder's), crop_size (16), channels
                  ((32, 64)) ('crop' only)
  normalize       each coefficient vector to unit RMS after the set mean (True)
  trainable       a regex over hypernet param paths that overrides the stage's own
                  ('': the stage's, `hyperlora_basis.TRAINABLE`)

config.controlnet the ``controlnet`` objective's ControlNet: from_unet (True: its encoder
                  starts as the UNet's, zero convs at zero, as diffusers' from_unet;
                  False: Flax's initializers), conditioning_embedding_out_channels
                  ((16, 32, 96, 256), SD's 8x; one entry per halving plus one: (16,) for
                  a pixel-space UNet)

config.ip_adapter the ``ip_adapter`` objective's adapter: kind 'plus' (IP-Adapter Plus'
                  Resampler over the encoder's penultimate hidden states) | 'plain'
                  (ImageProjection of the image embedding); num_tokens (16); hidden,
                  heads, depth: the Resampler's (768, 12, 4; 64 per head, as diffusers);
                  image_encoder: a CLIP vision folder, frozen ('' = a random tower shaped
                  by vit, from the run's seed: a stand-in for tiny models); vit

config.hypernet   see `models.hypernet.build`
  encoder         kind 'conv' | 'vit' | 'clip'; channels (conv); vit: a CLIPVisionConfig
                  dict (ViT-L/14); pretrained: a CLIP vision folder for 'clip'; layer: the
                  tower's hidden states the tokens are (-1: the last; -2: ByteDance's);
                  trainable (True): False freezes the encoder; remat: what a trained
                  'vit'/'clip' encoder keeps per layer for the backward: 'none', 'full'
                  or a jax.checkpoint_policies name (default
                  'dots_with_no_batch_dims_saveable': the projections' outputs; norms,
                  softmax, activations and attention logits are recomputed, ~4% of a
                  ViT-L layer's forward FLOPs, for ~5x less activation memory); not
                  'none' also runs the layers as one lax.scan (`clip.CLIPEncoder`)
  decoder         kind 'heads' | 'transformer' | 'perceiver'; heads: hidden, pool
                  ('embedding': the pooled image embedding | 'attention': a learned
                  query per target over the tokens, `heads` attention heads); width,
                  depth, heads, rounds (transformer); perceiver: queries per target (1;
                  ByteDance: 2), block ('joint': Flamingo's | 'separate': ByteDance's),
                  head_dim (0: width // heads)
  param           kind 'plain' | 'lidb' | 'basis' | 'vera'; rank; a, b (lidb); seed
                  (lidb, vera aux matrices); num_id, num_base, use_id, use_base (basis);
                  mix ('mid': one coefficient per basis LoRA | 'factors': ByteDance's,
                  down and up each a combination of bases) and base_rank (0: rank) (basis)
  gamma_init      the one trainable scale of every delta starts here (0.0)
  loss            the hyperlora objective's loss, alpha * diffusion + beta * weight-space
                  (HyperDreamBooth eq. 2): alpha (1.0), beta (0.0: the diffusion loss
                  alone); the weight-space term is the mean squared difference of the
                  predicted raw numbers (plain or LiDB) from the pre-optimized ones of the
                  example's subject in ``targets``: a target-weights folder (a lora_bank
                  run's workdir; 'stage:<name>' in a stages config) ('')

config.bank       the lora_bank objective: one LoRA per subject, N subjects stacked and
                  fitted at once (`objectives.lora_bank`; run by main.py /
                  `preoptimize`, which writes a target-weights dataset)
  param           kind 'plain' | 'lidb', rank, a, b, seed: as hypernet.param, whose
                  raw numbers they are (lidb, rank 1, a 100, b 50, seed 0)
  subjects_per_step  N: subjects in every step, one image each (32); the split's
                  subjects are fitted N at a time, config.train.num_steps steps each, at
                  config.optim.lr (constant; AdamW without clipping, which would couple
                  the subjects), one safetensors shard per N
  group           what makes a subject (`data.pipeline.GROUPINGS`): 'identity' (the
                  example's; HyperDreamBooth), 'content' (an item's unstyled images: a
                  zoo's content LoRAs), 'style' (a style's images: its style LoRAs)
  split           the split whose subjects are fitted ('train'; a zoo's held-out
                  content LoRAs: 'test')
  lora_format     '' | 'diffusers' | 'kohya': also write every subject's LoRA as a
                  standard LoRA file, <workdir>/loras/<subject>.safetensors ('')

config.merger     the lorarar objective: LoRA.rar's merger (`objectives.lorarar`)
  content, style  folders of two lora_bank runs (bank.group 'content' / 'style'; a stages
                  config: 'stage:<name>'): the zoo whose pairs train the merger ('')
  layers          regex over LoRA paths: the merged layers; the others are summed
                  ('(to_q|to_out_0)$': LoRA.rar's query and output projections)
  hidden          the merger's hidden width per layer (128)
  similarity      the weight of ZipLoRA's mean |m_c m_s| in the loss (0.01)

config.train
  num_steps         optimizer updates to run (1000)
  batch_size        global examples per update, over all hosts (8); a multiple of
                    devices x grad_accum_steps and of the process count
  grad_accum_steps  split each batch into this many sequential micro-batches and sum
                    their gradients, to trade time for memory (1)
  log_every         console + TensorBoard scalars every N steps (50)
  eval_every        call the evaluation hook every N steps and at the end; 0 = only at
                    the end (1000)
  checkpoint_every  save every N steps, at the end and on SIGTERM (1000)
  keep_checkpoints  newest checkpoints kept (3)
  nan_policy        'stop': a non-finite loss or gradient raises FloatingPointError
                    naming the step; 'skip': that update is dropped and training goes
                    on; either way the state never takes non-finite values ('stop')
  remat             jax.checkpoint around the loss: 'none', 'full' or a
                    jax.checkpoint_policies name, e.g. 'dots_saveable' ('none');
                    per-block remat belongs to the models
  ema_decay         EMA of the trainable params (None = off); evaluation gets the EMA
                    params when it is on
  compute_dtype     activation dtype the objective builds its models with
                    ('bfloat16'); params stay float32 (master weights)
  init_from         a finished run's workdir (or 'stage:<name>') whose params start this
                    run, read only when it starts ('' = none): its trainable params,
                    which must be this run's exactly (e.g. a second stage that continues
                    the first with other prompts); or, for an objective that starts
                    itself (`Spec.starts_itself`: `hyperlora_basis`' stages, which train
                    different parts), every param of its that this run has, frozen too
  init_step         that run's step (-1: its newest; a stages config records the one
                    it started from)

config.optim      AdamW: lr (1e-4), b1 (0.9), b2 (0.999), eps (1e-8), weight_decay
                  (0.01, only on params with ndim >= 2: biases, norms and gamma are not
                  pulled to zero), warmup_steps (0, linear from 0), schedule ('cosine' to
                  0 at num_steps | 'constant'), grad_clip_norm (1.0; 0 = off)

config.mesh       data (-1), fsdp (1): mesh axis sizes, -1 = the remaining devices;
                  shard_min_size (2**18): params with at least this many elements are
                  split over 'fsdp'; rules (()): (path regex, axes) pairs that override
                  the size rule, see sharding.py

config.eval       the training loop's own check (`evaluate.evaluate_fn`, synthetic data):
                  num_examples (8; 0 = off), num_steps (8), guidance (3.0)
"""
import difflib

import ml_collections

from hyperlora_jax.data import synthetic



def tiny_unet(channels=(32, 64, 64), cross_attention_dim=64, heads=4) -> dict:
  """A pixel-space UNet for 3-channel images (the quickstart's base model).

  Attention only below the full resolution: at 32x32 pixels, self-attention over 1024
  tokens would cost more than the rest of the UNet on a CPU.
  """
  n = len(channels)
  return dict(
      in_channels=3, out_channels=3, block_out_channels=channels, layers_per_block=1,
      down_block_types=('DownBlock2D',) + ('CrossAttnDownBlock2D',) * (n - 1),
      up_block_types=('CrossAttnUpBlock2D',) * (n - 1) + ('UpBlock2D',),
      cross_attention_dim=cross_attention_dim, attention_head_dim=heads,
      norm_num_groups=min(8, channels[0]))


def tiny_text(width=64, layers=2, heads=4) -> dict:
  return dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
              num_attention_heads=heads, hidden_act='quick_gelu')


SD15_UNET = dict(
    in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2, down_block_types=('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',),
    up_block_types=('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3, cross_attention_dim=768,
    attention_head_dim=8, norm_num_groups=32)

# stabilityai/stable-diffusion-xl-base-1.0's UNet: every field its unet/config.json sets
# that differs from diffusers' defaults (tests/test_sdxl.py holds it against the whole file).
SDXL_UNET = dict(
    in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=('DownBlock2D',) + ('CrossAttnDownBlock2D',) * 2,
    up_block_types=('CrossAttnUpBlock2D',) * 2 + ('UpBlock2D',),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    use_linear_projection=True, cross_attention_dim=2048, addition_embed_type='text_time',
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32, sample_size=128, upcast_attention=None)

# CLIP ViT-L/14 vision tower shape (HyperDreamBooth uses a ViT-H; size by config).
VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
               num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768)


def get_config(objective: str = 'hyperlora') -> ml_collections.ConfigDict:
  """The complete config with every default (the module docstring documents them)."""
  c = ml_collections.ConfigDict()
  c.objective = objective
  c.seed = 0
  c.data = dict(name='synthetic', data_dir='', source_dir='', prompts_file='',
                static_prompt='', on_bad_example='error', convert_modes=True, resolution=32,
                prompt='scene', seed=0, num_train=1000, num_test=200, holdout_seed=0,
                test_fraction=0.2, item_frac=synthetic.ITEM_FRAC, context='context',
                pose=False, styles=False, batch_size=8, num_threads=4, prefetch=4,
                num_workers=0, set_size=0, set_random=True, set_occlude=0.5,
                id_embed_dim=512,
                augment=dict(p=0.0, scale=(0.35, 1.0), background=0.5, jpeg=0.5,
                             jpeg_quality=(30, 95), lowres=0.3, lowres_scale=(0.3, 0.8)))
  c.model = dict(pretrained='', unet=tiny_unet(), text=tiny_text(), max_length=40,
                 scheduler=dict(prediction_type='epsilon'), targets='cross_attn',
                 prompt_dropout=0.1, min_snr_gamma=ml_collections.config_dict.placeholder(float),
                 controlnet=dict(folder='', scale=1.0),
                 ip_adapter=dict(weights='', image_encoder='', scale=1.0))
  c.lora = dict(rank=4, alpha=4.0)
  c.basis = dict(stage='joint', trigger='', conditions=(0.5, 0.25, 0.25), encoders='separate',
                 region=dict(mode='blur', blur=0.1),
                 identity=dict(kind='none', tokens=4, width=0, crop_size=16, channels=(32, 64)),
                 normalize=True, trainable='')
  c.controlnet = dict(from_unet=True, conditioning_embedding_out_channels=(16, 32, 96, 256))
  c.ip_adapter = dict(kind='plus', num_tokens=16, hidden=768, heads=12, depth=4,
                      image_encoder='', vit=dict(VIT_L14))
  c.hypernet = dict(
      encoder=dict(kind='conv', channels=(32, 64, 128), pretrained='', trainable=True,
                   remat='dots_with_no_batch_dims_saveable', vit=dict(VIT_L14), layer=-1),
      decoder=dict(kind='heads', hidden=64, pool='embedding', width=128, depth=2, heads=4,
                   rounds=2, queries=1, block='joint', head_dim=0),
      param=dict(kind='plain', rank=2, a=100, b=50, seed=0, num_id=16, num_base=16,
                 use_id=True, use_base=True, mix='mid', base_rank=0),
      gamma_init=0.0, loss=dict(alpha=1.0, beta=0.0, targets=''))
  c.merger = dict(content='', style='', layers=r'(to_q|to_out_0)$', hidden=128,
                  similarity=0.01)
  c.bank = dict(param=dict(kind='lidb', rank=1, a=100, b=50, seed=0), subjects_per_step=32,
                group='identity', split='train', lora_format='')
  c.train = dict(num_steps=1000, batch_size=8, grad_accum_steps=1, log_every=50,
                 eval_every=1000, checkpoint_every=1000, keep_checkpoints=3,
                 nan_policy='stop', remat='none',
                 ema_decay=ml_collections.config_dict.placeholder(float),
                 compute_dtype='bfloat16', init_from='', init_step=-1)
  c.optim = dict(lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, warmup_steps=0,
                 schedule='cosine', grad_clip_norm=1.0)
  c.mesh = dict(data=-1, fsdp=1, shard_min_size=2**18, rules=())
  c.eval = dict(num_examples=8, num_steps=8, guidance=3.0)
  return c


# Keys that moved, old -> new: a run saved before the move restores with its value there.
RENAMED = {'model.init_from': 'train.init_from', 'model.init_step': 'train.init_step'}

# Sections that hold a model's own config (diffusers / transformers fields): any keys.
_FREE_FORM = ('unet', 'text', 'vit')


def check_keys(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming every key of `config` that `get_config` of its objective
  does not have (with the nearest known key), e.g. a sweep row's misspelled update:
  ConfigDict.update adds such a key silently, and training would ignore it."""
  unknown = []

  def walk(target, known, prefix):
    for key in target.keys():
      if key not in known:
        near = difflib.get_close_matches(key, list(known.keys()), n=1)
        unknown.append(f'{prefix}{key}' + (f' (did you mean {prefix}{near[0]}?)' if near else ''))
      elif isinstance(target[key], ml_collections.ConfigDict) and isinstance(
          known[key], ml_collections.ConfigDict) and key not in _FREE_FORM:
        walk(target[key], known[key], f'{prefix}{key}.')

  walk(config, get_config(config.get('objective', 'hyperlora')), '')
  if unknown:
    raise ValueError(f'Unknown config keys for objective {config.get("objective")!r}: '
                     + ', '.join(unknown) + ' (hyperlora_jax/defaults.py lists every key).')


def fill(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds every key of `get_config` that `config` lacks, at any depth; returns config.

  Keys the config has are kept, values and types alike; a section the config sets to
  something other than a dict (e.g. a model's own config dict) is not entered. A key
  of `RENAMED` (a saved run's) moves to its new place first.
  """
  with config.unlocked():
    for old, new in RENAMED.items():
      (old_section, old_key), (new_section, new_key) = (k.split('.') for k in (old, new))
      if old_key in (config.get(old_section) or {}):
        if new_section not in config:
          config[new_section] = ml_collections.ConfigDict()
        config[new_section][new_key] = config[old_section][old_key]
        del config[old_section][old_key]
  def merge(target, defaults):
    for key in defaults.keys():
      if key not in target:
        # The FieldReference, so the type of a None field survives (command-line
        # overrides of ema_decay parse as float).
        target[key] = defaults.get_ref(key)
      elif isinstance(defaults[key], ml_collections.ConfigDict) and isinstance(
          target[key], ml_collections.ConfigDict) and key not in _FREE_FORM:
        merge(target[key], defaults[key])

  with config.unlocked():
    merge(config, get_config(config.get('objective', 'hyperlora')))
  return config
