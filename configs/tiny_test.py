"""The smallest complete run, for tests: tiny models, 32x32 synthetic data, CPU.

  python -m hyperlora_jax.main --config=configs/tiny_test.py --workdir=/tmp/tiny
  python -m hyperlora_jax.main --config=configs/tiny_test.py:unet_full --workdir=...
"""
from hyperlora_jax import defaults


def get_config(objective='hyperlora'):
  c = defaults.get_config(objective)
  c.model.unet = defaults.tiny_unet(channels=(16, 32), cross_attention_dim=32, heads=2)
  c.model.text = defaults.tiny_text(width=32, layers=1, heads=2)
  c.hypernet.encoder.channels = (16, 32)
  c.hypernet.decoder.hidden = 16
  c.data.num_train, c.data.num_test = 64, 16
  c.train.update(num_steps=4, batch_size=4, log_every=2, eval_every=0, checkpoint_every=2,
                 compute_dtype='float32')
  c.optim.update(lr=1e-3, warmup_steps=0)
  return c
