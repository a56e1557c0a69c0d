"""LoRA.rar (Shenaj et al. 2024) on SDXL (issue 23): a zoo of content and style LoRAs
(rank 64 over the UNet's attention, the paper's), then the merger on their pairs with
ZipLoRA's loss through the frozen SDXL base.

  # 1. the zoo: one LoRA per subject folder, one per style folder (LoRA files too)
  python -m hyperlora_jax.main --config=configs/sdxl_lorarar.py:content \\
    --config.model.pretrained=/data/sdxl --config.data.source_dir=/data/subjects \\
    --workdir=/runs/zoo_content
  python -m hyperlora_jax.main --config=configs/sdxl_lorarar.py:style \\
    --config.model.pretrained=/data/sdxl --config.data.source_dir=/data/styles \\
    --workdir=/runs/zoo_style
  # 2. the merger on their pairs
  python -m hyperlora_jax.main --config=configs/sdxl_lorarar.py \\
    --config.model.pretrained=/data/sdxl --config.data.source_dir=/data/subjects \\
    --config.merger.content=/runs/zoo_content --config.merger.style=/runs/zoo_style \\
    --workdir=/runs/lorarar
  # 3. any pair: python -m hyperlora_jax.merge --method=lorarar --merger=/runs/lorarar ...

Folders are data.name='triples' (<split>/<id>/target.*, prompt.txt: a subject's or a
style's images with its trigger prompt); a subject is a folder (bank.group='identity').
"""
from hyperlora_jax import defaults


def get_config(part='merger'):
  c = defaults.get_config('lorarar' if part == 'merger' else 'lora_bank')
  c.model.update(pretrained=None, max_length=77, targets='cross_attn,self_attn')
  c.data.update(name='triples', resolution=1024, prompt='scene', context='target')
  c.bank.param.update(kind='plain', rank=64)
  if part in ('content', 'style'):  # every subject (style) fitted with 500 steps
    c.bank.update(subjects_per_step=8, lora_format='kohya')
    c.train.update(num_steps=500, compute_dtype='bfloat16')
    c.optim.update(lr=1e-4, weight_decay=0.0)
    return c
  c.merger.update(layers=r'(to_q|to_out_0)$', hidden=128, similarity=0.01)
  c.eval.num_examples = 0
  c.train.update(num_steps=5000, batch_size=8, compute_dtype='bfloat16')
  c.optim.update(lr=1e-4, warmup_steps=100)
  return c
