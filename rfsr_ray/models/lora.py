"""LoRA adapters through peft (diffusers' `add_adapter`), with the frozen original for free.

With adapters disabled a LoRA model *is* the original model, so the Gram regulariser's frozen
reference needs no second copy in memory.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

from torch import nn

from rfsr_ray.config import LoRAConfig
from rfsr_ray.errors import ConfigError

ADAPTER = "rfsr"


def add_lora(module: nn.Module, cfg: LoRAConfig, where: str) -> None:
    """Freeze `module` and inject trainable LoRA adapters into `cfg.target_modules`."""
    from peft import LoraConfig

    module.requires_grad_(False)
    names = {name.rsplit(".", 1)[-1] for name, _ in module.named_modules()}
    full = {name for name, _ in module.named_modules()}
    unknown = [t for t in cfg.target_modules if t not in names and not any(
        n.endswith("." + t) or n == t for n in full)]  # fmt: skip
    if unknown:
        raise ConfigError(
            f"model.lora.target_modules {unknown} match no module of the {where}; use names "
            "such as to_q, to_k, to_v, to_out.0, proj_in, proj_out, ff.net.2, conv1"
        )
    config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha or cfg.rank,
        lora_dropout=cfg.dropout,
        init_lora_weights="gaussian",
        target_modules=list(cfg.target_modules),
    )
    module.add_adapter(config, adapter_name=ADAPTER)


def has_lora(module: nn.Module) -> bool:
    return bool(getattr(module, "_hf_peft_config_loaded", False))


@contextlib.contextmanager
def adapters_disabled(*modules: nn.Module | None) -> Iterator[None]:
    """Run the original (pre-LoRA) weights of every module that has adapters."""
    chosen = [m for m in modules if m is not None and has_lora(m)]
    for module in chosen:
        module.disable_adapters()
    try:
        yield
    finally:
        for module in chosen:
            module.enable_adapters()


def merged_copy(module: nn.Module) -> nn.Module:
    """A plain module with the adapters folded into its weights (a copy: the original keeps
    its adapters); a module without adapters is returned as is."""
    if not has_lora(module):
        return module
    plain = copy.deepcopy(module)
    plain.fuse_lora()
    plain.unload_lora()
    return plain


def lora_state_dict(module: nn.Module) -> dict:
    """The adapter weights in diffusers' naming (what `load_lora_weights` reads)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(module, adapter_name=ADAPTER)
    return convert_state_dict_to_diffusers(state)
