"""Flax models, one file per family; `init_variables` draws any of them."""
import jax


def init_variables(module, rng, *inputs):
  """jit(module.init)(rng, *inputs), with threefry lowered to one GPU kernel.

  XLA's own lowering of threefry unrolls its rounds for every param's draw: compiling
  them took 54 s of the GPU quickstart's UNet init on an H200, the kernel 10.4 s, with
  the same bits (benchmarks/init_benchmark.py, BENCHMARKS.md).
  Only the init: a training step's draws keep XLA's lowering, which its speed was
  measured with. Off a GPU the setting changes nothing.
  """
  before = jax.config.jax_threefry_gpu_kernel_lowering
  jax.config.update('jax_threefry_gpu_kernel_lowering', True)
  try:
    return jax.jit(module.init)(rng, *inputs)
  finally:
    jax.config.update('jax_threefry_gpu_kernel_lowering', before)
