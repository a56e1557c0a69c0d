r"""XLA's memory plan of the benchmark's training steps, on any machine, without a GPU.

Builds the same jitted steps as `gpu_benchmark.JaxBench` (``lora``: the shared-LoRA
step; ``hyper``: the HyperLoRA step; ``hypernet``: the hypernetwork alone, its loss the
sum of squares of the predicted LoRA; ``cross`` / ``cross_per_sample``: a shared / a
per-sample LoRA on the cross-attention projections trained directly), lowers them with
ShapeDtypeStructs (no params are allocated), compiles them for the local backend and prints
``compiled.memory_analysis()``: arguments, outputs, aliased (donated) bytes and
temporaries. Usage (issue 8; see BENCHMARKS.md):

  XLA_FLAGS='--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true' \
  JAX_PLATFORMS=cpu python benchmarks/memory_plan.py --steps=lora,hyper --batch=32
  ... --steps=hyper --set=hypernet.encoder.remat=none     # the encoder as before issue 8

The two XLA flags only make the CPU compiles faster (LLVM); the plan is the same.

A CPU plan is not a GPU plan: XLA's CPU backend upcasts bf16 dots to f32 and fuses less,
so absolute numbers run ~2.7x the H100's for the UNet; compare steps and settings with
each other. ``--attention=cudnn_like`` (default) gives the attentions that the UNet hands
to cuDNN on a GPU a stand-in with cuDNN's footprint (residuals q, k, v, out and the
log-sum-exp; forward and backward over 64-query chunks), so that XLA's [B, heads, L, L]
logits, which a GPU run never writes, do not swamp the plan; ``xla`` keeps XLA's.
"""
import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_benchmark as gb  # pylint: disable=g-import-not-at-top,wrong-import-position

from hyperlora_jax import lora as lora_lib  # pylint: disable=g-import-not-at-top,wrong-import-order
from hyperlora_jax import train
from hyperlora_jax.models import clip, hypernet
from hyperlora_jax.models import unet as unet_lib

GIB = 2 ** 30
_CHUNK = 64  # queries per step of the cuDNN stand-in


# ---------------------------------------------------------------- cuDNN-like attention
def _chunks(x):  # [B, T, N, H] -> [T / C, B, C, N, H]
  b, t, n, h = x.shape
  return x.reshape(b, t // _CHUNK, _CHUNK, n, h).swapaxes(0, 1)


def _unchunk(x):
  return x.swapaxes(0, 1).reshape((x.shape[1], -1) + x.shape[3:])


def _flash_forward(q, k, v):
  scale = q.shape[-1] ** -0.5

  def body(_, qi):
    s = jnp.einsum('bqnh,bknh->bnqk', qi, k, preferred_element_type=jnp.float32) * scale
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.exp(s - lse[..., None]).astype(v.dtype)
    return None, (jnp.einsum('bnqk,bknh->bqnh', p, v), lse)

  _, (out, lse) = jax.lax.scan(body, None, _chunks(q))
  return _unchunk(out), lse  # lse: [T / C, B, N, C]


@jax.custom_vjp
def flash_attention(q, k, v):
  """softmax(q k^T / sqrt(h)) v, [B, T, N, H], with cuDNN's residuals."""
  return _flash_forward(q, k, v)[0]


def _flash_fwd(q, k, v):
  out, lse = _flash_forward(q, k, v)
  return out, (q, k, v, out, lse)


def _flash_bwd(res, d_out):
  q, k, v, out, lse = res
  scale = q.shape[-1] ** -0.5
  delta = jnp.einsum('bqnh,bqnh->bnq', d_out.astype(jnp.float32), out.astype(jnp.float32))
  delta = delta.reshape(delta.shape[:2] + (-1, _CHUNK)).transpose(2, 0, 1, 3)

  def body(carry, xs):
    dk, dv = carry
    qi, doi, lsei, di = xs
    s = jnp.einsum('bqnh,bknh->bnqk', qi, k, preferred_element_type=jnp.float32) * scale
    p = jnp.exp(s - lsei[..., None])
    dv = dv + jnp.einsum('bnqk,bqnh->bknh', p.astype(doi.dtype), doi,
                         preferred_element_type=jnp.float32)
    dp = jnp.einsum('bqnh,bknh->bnqk', doi, v, preferred_element_type=jnp.float32)
    ds = (p * (dp - di[..., None]) * scale).astype(q.dtype)
    dk = dk + jnp.einsum('bnqk,bqnh->bknh', ds, qi, preferred_element_type=jnp.float32)
    return (dk, dv), jnp.einsum('bnqk,bknh->bqnh', ds, k)

  zeros = jnp.zeros(k.shape, jnp.float32)
  (dk, dv), dq = jax.lax.scan(body, (zeros, zeros), (_chunks(q), _chunks(d_out), lse, delta))
  return _unchunk(dq), dk.astype(k.dtype), dv.astype(v.dtype)


flash_attention.defvjp(_flash_fwd, _flash_bwd)


def use_cudnn_like_attention():
  """Where the UNet would pick cuDNN on a GPU (`unet.attention_implementation`'s rule
  without the backend test), it gets `flash_attention` instead of XLA's."""
  original_rule = unet_lib.attention_implementation
  original = jax.nn.dot_product_attention

  def rule(dtype, head_dim, q_len, kv_len):
    fused = (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0
             and head_dim <= 128 and q_len % 64 == 0 and kv_len % 64 == 0)
    return 'cudnn_like' if fused else original_rule(dtype, head_dim, q_len, kv_len)

  def attention(query, key, value, *args, implementation=None, **kwargs):
    if implementation == 'cudnn_like':
      if args or kwargs:
        raise NotImplementedError('the cuDNN stand-in takes no mask or bias')
      return flash_attention(query, key, value)
    if implementation is not None:
      kwargs['implementation'] = implementation
    return original(query, key, value, *args, **kwargs)

  unet_lib.attention_implementation = rule
  jax.nn.dot_product_attention = attention


# ---------------------------------------------------------------- the steps
def _bench(args) -> gb.JaxBench:
  """A JaxBench whose UNet params are ShapeDtypeStructs (its __init__ allocates them)."""
  bench = gb.JaxBench.__new__(gb.JaxBench)
  bench.args, bench.shapes = args, gb._shapes(args)  # pylint: disable=protected-access
  bench.dtype = jnp.dtype(args.dtype)
  bench.module = unet_lib.from_config(bench.shapes.unet, dtype=bench.dtype)
  bench.schedule = gb.diffusion.load_schedule()
  shapes = jax.eval_shape(lambda: bench.module.init(
      jax.random.key(0), *bench.module.dummy_inputs())['params'])
  dtype = jnp.dtype(args.unet_param_dtype)
  bench.unet_params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), shapes)
  c = bench.config = gb.defaults.get_config('hyperlora')
  c.train.remat = args.remat
  c.lora.update(rank=args.rank, alpha=float(args.rank))
  c.hypernet.encoder.update(kind='vit', vit=dict(bench.shapes.vit))
  c.hypernet.decoder.update(kind='transformer', **bench.shapes.decoder)
  c.hypernet.param.update(kind='plain', rank=args.rank)
  for item in args.set:
    key, value = item.split('=', 1)
    *parents, leaf = key.split('.')
    node = c
    for p in parents:
      node = node[p]
    old = node[leaf]
    node[leaf] = (value == 'True') if isinstance(old, bool) else type(old)(value)
  bench.hyper_flops = None
  return bench


def _batch(bench, n: int, images: bool) -> dict:
  s = bench.shapes
  batch = {
      'latents': jax.ShapeDtypeStruct((n, s.latent, s.latent, s.unet['in_channels']),
                                      jnp.float32),
      'text': jax.ShapeDtypeStruct((n, s.text_len, s.text_dim), bench.dtype)}
  if images:
    size = s.vit['image_size']
    batch['images'] = jax.ShapeDtypeStruct((n, size, size, 3), jnp.float32)
  return batch


def lower(bench, step: str, n: int):
  """The jitted train step of ``step``, lowered at batch n."""
  c = bench.config
  if step == 'lora':  # as JaxBench.lora_train
    targets = lora_lib.find_targets(bench.unet_params, 'self_attn,cross_attn')
    trainable = jax.eval_shape(
        lambda: lora_lib.init_plain(jax.random.key(1), targets, bench.args.rank))
    scale = c.lora.alpha / c.lora.rank

    def loss_fn(trainable, frozen, batch, rng):
      tree = {path: dict(f, scale=scale) for path, f in trainable.items()}
      return bench._eps_loss(frozen['unet'], tree, batch, rng), {}  # pylint: disable=protected-access
  elif step in ('cross', 'cross_per_sample'):
    # Plain LoRA factors on the cross-attention projections as the trainables, shared or
    # one per sample ([n, r, d_in], [n, d_out, r]): the UNet's side of the HyperLoRA step.
    targets = lora_lib.find_targets(bench.unet_params, 'cross_attn')
    lead = (n,) if step == 'cross_per_sample' else ()
    trainable = {t.path: {
        'down': jax.ShapeDtypeStruct(lead + (bench.args.rank, t.d_in), jnp.float32),
        'up': jax.ShapeDtypeStruct(lead + (t.d_out, bench.args.rank), jnp.float32)}
                 for t in targets}

    def loss_fn(trainable, frozen, batch, rng):
      tree = {path: dict(f, scale=1.0) for path, f in trainable.items()}
      return bench._eps_loss(frozen['unet'], tree, batch, rng), {}  # pylint: disable=protected-access
  else:  # as JaxBench.hyper_train, with JaxBench._hypernet's bf16 tower
    targets = lora_lib.find_targets(bench.unet_params, 'cross_attn')
    tower = clip.vision_from_config(bench.shapes.vit, dtype=bench.dtype)
    net = hypernet.build(c.hypernet, targets, tower)
    size = bench.shapes.vit['image_size']
    trainable = jax.eval_shape(net.init, jax.random.key(2), jnp.zeros((1, size, size, 3)))
    trainable = trainable['params']

    def loss_fn(trainable, frozen, batch, rng):
      tree = net.apply({'params': trainable}, batch['images'])
      if step == 'hypernet':
        return sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                   for x in jax.tree.leaves(tree)), {}
      return bench._eps_loss(frozen['unet'], tree, batch, rng), {}  # pylint: disable=protected-access
  tx, lr = train.make_optimizer(c.optim, c.train.num_steps)
  train_step = jax.jit(train.make_train_step(loss_fn, tx, lr, c, mesh=None),
                       donate_argnums=(0,))
  state = jax.eval_shape(functools.partial(train.init_state, tx=tx, ema=False), trainable)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
  return train_step.lower(state, {'unet': bench.unet_params},
                          _batch(bench, n, step in ('hyper', 'hypernet')), rng)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--steps', default='lora,hyper',
                 help='comma list: lora, hyper, hypernet, cross, cross_per_sample')
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--attention', default='cudnn_like', choices=('cudnn_like', 'xla'))
  p.add_argument('--set', action='append', default=[],
                 help='config override key=value, e.g. hypernet.encoder.remat=none')
  p.add_argument('--tiny', action='store_true', help="gpu_benchmark's tiny shapes")
  args = p.parse_args(argv)
  bench_args = gb.parse_args(['--tiny'] if args.tiny else [])
  bench_args.set = args.set
  if args.attention == 'cudnn_like':
    use_cudnn_like_attention()
  bench = _bench(bench_args)
  results = []
  for step in [s.strip() for s in args.steps.split(',') if s.strip()]:
    start = time.perf_counter()
    lowered = lower(bench, step, args.batch)
    traced = time.perf_counter() - start
    compiled = lowered.compile()
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)
    line = (f'{step} batch {args.batch} {" ".join(args.set)}: argument '
            f'{m.argument_size_in_bytes / GIB:.3f} GiB, output '
            f'{m.output_size_in_bytes / GIB:.3f}, alias {m.alias_size_in_bytes / GIB:.3f}, '
            f'temp {m.temp_size_in_bytes / GIB:.3f}, total {total / GIB:.3f} GiB; trace+lower '
            f'{traced:.0f} s, compile {time.perf_counter() - start - traced:.0f} s')
    print(line, flush=True)
    results.append((step, m))
  print(f'({jax.devices()[0].platform}, attention={args.attention}, '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r})')
  return results


if __name__ == '__main__':
  main()
