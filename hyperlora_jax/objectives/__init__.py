"""What a run trains: one registry of objectives, each a small module.

* ``hyperlora``: a hypernetwork predicts a per-sample LoRA from the context image.
* ``hyperlora_basis``: ByteDance HyperLoRA's ID/Base recipe in stages, from a set of
  context images per subject.
* ``unet_lora``: one shared plain LoRA on the UNet.
* ``unet_full``: the UNet and text tower themselves.
* ``lora_bank``: one LoRA per subject, many subjects stacked and fitted at once.
* ``controlnet``: a ControlNet on condition images (pose maps) beside the frozen UNet.
* ``ip_adapter``: IP-Adapter's image projection and to_k_ip/to_v_ip (tuning-free).
* ``lorarar``: LoRA.rar's merger of a content and a style LoRA, trained on a LoRA zoo.

`build(config, rng)` returns the config's `base.Objective`; `spec(name)` says what a run
of an objective is without building it. The training loop, sampling, evaluation, export
and stages use only these: none of them tests ``config.objective``. To add an objective,
write a module with a ``SPEC`` (see `base.Spec`, `base.diffusion_objective`) and list it
in ``REGISTRY``.
"""
from hyperlora_jax.objectives import (controlnet, hyperlora, hyperlora_basis, ip_adapter,
                                      lora_bank, lorarar, unet_full, unet_lora)
from hyperlora_jax.objectives.base import (  # noqa: F401  (what the tools use)
    LoRAPredictor, Models, Objective, Spec, encode_prompts, latent_factor, predictor,
    time_ids, tokenize)
from hyperlora_jax.objectives.conditioning import ADDONS, denoiser, tile  # noqa: F401

REGISTRY = {s.name: s for s in (hyperlora.SPEC, hyperlora_basis.SPEC, unet_lora.SPEC,
                                 unet_full.SPEC, lora_bank.SPEC, controlnet.SPEC,
                                 ip_adapter.SPEC, lorarar.SPEC)}


def spec(name: str) -> Spec:
  if name not in REGISTRY:
    raise ValueError(f'Unknown objective {name!r}; one of {sorted(REGISTRY)}.')
  return REGISTRY[name]


def build(config, rng) -> Objective:
  return spec(config.objective).build(config, rng)
