"""How a family runs its trained forward passes through wrappers (DDP) it does not own.

Training wraps the trainable modules for data parallelism; everything else (parameters,
checkpoints, LoRA adapters, exports, the frozen reference) must keep seeing the plain modules.
So the wrappers sit beside the modules instead of replacing them: a family's attributes (`unet`,
`controlnet`) stay the plain modules, and only the trained forward pass asks `forward_module`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from torch import nn


class TrainableWrappers:
    """Mixin implementing `ISRDiffusionModel.wrap_trainable` / `unwrap_trainable` for a family
    whose `trainable_modules()` names are its attribute names."""

    # The wrappers are a plain dict, never registered submodules, so `state_dict()`, `.to()` and
    # `.modules()` see each module once, under its own name.
    _wrappers: Mapping[str, nn.Module] = MappingProxyType({})

    def trainable_modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def wrap_trainable(self, wrap: Callable[[nn.Module], nn.Module]) -> dict[str, nn.Module]:
        """Run the trained forward pass of each trainable module through `wrap(module)`;
        returns the wrappers by module name."""
        self._wrappers = {name: wrap(module) for name, module in self.trainable_modules().items()}
        return dict(self._wrappers)

    def unwrap_trainable(self) -> None:
        """Forward passes run on the plain modules again."""
        self._wrappers = MappingProxyType({})

    def forward_module(self, name: str) -> nn.Module | None:
        """What the trained forward pass calls for the module attribute `name`: its wrapper
        after `wrap_trainable`, else the module itself (None where the family has none)."""
        wrapper = self._wrappers.get(name)
        return wrapper if wrapper is not None else getattr(self, name)
