"""Readers for diffusers/transformers folders into our Flax pytrees (and back)."""
from hyperlora_jax.convert.core import (CheckpointError, flax_to_torch, load_flax_model,
                                        read_model_folder, read_safetensors, torch_to_flax)

__all__ = ['CheckpointError', 'flax_to_torch', 'load_flax_model', 'read_model_folder',
           'read_safetensors', 'torch_to_flax']
