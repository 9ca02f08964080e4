"""SeeSR's UNet: Stable Diffusion 2's UNet with an image cross-attention after each text one.

SeeSR (github.com/cswry/SeeSR, `models/unet_2d_blocks.py`) gives every `CrossAttnDownBlock2D`,
`UNetMidBlock2DCrossAttn` and `CrossAttnUpBlock2D` a second list of transformers,
`image_attentions`, one per text transformer in `attentions` and built like it except that its
cross-attention reads the RAM/DAPE image embeddings of the LR input (`image_encoder_hidden_states`,
(B, N, 512)) instead of the prompt. Each runs on its text transformer's output, before anything
else: resnet → attentions[i] → image_attentions[i] in the down and up blocks, attentions[i] →
image_attentions[i] → resnets[i + 1] in the mid block. A transformer adds its input back, so an
image attention whose `proj_out` is zero is the identity.

Here diffusers' own block and model forwards run unchanged and a forward hook on each text
transformer applies its image transformer, so ControlNet residuals, masks, attention processors,
LoRA adapters and gradient checkpointing all behave as in diffusers. The model's forward hands the
embeddings to the image transformers for the length of one call (`image_embeddings`).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import ModelMixin, UNet2DConditionModel
from diffusers.models import Transformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.unets.unet_2d_blocks import (
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    UNetMidBlock2DCrossAttn,
)
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from diffusers.utils import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFETENSORS_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)
from torch import nn

from rfsr_ray.errors import WeightsError

# SeeSR hard-codes `image_cross_attention_dim=512`: the width of RAM's `image_proj` output.
IMAGE_EMBED_DIM = 512
# The blocks SeeSR gives image attention (its `get_*_block` pass the switch to these only).
IMAGE_ATTENTION_BLOCKS = (CrossAttnDownBlock2D, UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D)
Model = TypeVar("Model", bound=ModelMixin)
UNET_FOLDER_HINT = (
    "pass the `unet/` folder of the released SeeSR model (diffusers format: config.json with "
    '"use_image_cross_attention": true, diffusion_pytorch_model.safetensors)'
)


class ImageAttention(Transformer2DModel):
    """SeeSR's image cross-attention transformer; it runs as a forward hook of a text one.

    `image_encoder_hidden_states` is set only while the owning model's forward runs.
    """

    image_encoder_hidden_states: torch.Tensor | None = None

    def follow(
        self,
        text_attention: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: tuple[torch.Tensor, ...] | Transformer2DModelOutput,
    ) -> tuple[torch.Tensor, ...] | Transformer2DModelOutput:
        """The text transformer's output (B, C, h, w) passed through this one, with the text
        call's masks and `cross_attention_kwargs`, as SeeSR's blocks call it."""
        if self.image_encoder_hidden_states is None:
            raise RuntimeError(
                "a SeeSR image attention ran outside SeeSRUNet/SeeSRControlNet.forward; call the "
                "model, not its blocks, and pass image_encoder_hidden_states to it"
            )
        hidden = output[0] if isinstance(output, tuple) else output.sample
        hidden = self(
            hidden,
            encoder_hidden_states=self.image_encoder_hidden_states,
            cross_attention_kwargs=kwargs.get("cross_attention_kwargs"),
            attention_mask=kwargs.get("attention_mask"),
            encoder_attention_mask=kwargs.get("encoder_attention_mask"),
            return_dict=False,
        )[0]
        return (hidden,) if isinstance(output, tuple) else Transformer2DModelOutput(sample=hidden)


def image_attention_for(text_attention: nn.Module, image_dim: int) -> ImageAttention:
    """A transformer configured as `text_attention` but attending to `image_dim`-wide tokens
    (SeeSR builds both from the same arguments but `cross_attention_dim`)."""
    if not isinstance(text_attention, Transformer2DModel):
        raise ValueError(
            f"SeeSR image attention needs Transformer2DModel text attentions, got "
            f"{type(text_attention).__name__}; set dual_cross_attention=false in the config"
        )
    config = {k: v for k, v in text_attention.config.items() if not k.startswith("_")}
    return ImageAttention(**{**config, "cross_attention_dim": image_dim})


def add_image_attentions(blocks: Iterable[nn.Module], image_dim: int) -> None:
    """Give each SeeSR cross-attention block `image_attentions` (keys
    `<block>.image_attentions.<i>.…`) and hook each after its text transformer."""
    for block in blocks:
        if not isinstance(block, IMAGE_ATTENTION_BLOCKS):
            continue
        block.image_attentions = nn.ModuleList(
            image_attention_for(attention, image_dim) for attention in block.attentions
        )
        for attention, image_attention in zip(
            block.attentions, block.image_attentions, strict=True
        ):
            attention.register_forward_hook(image_attention.follow, with_kwargs=True)


def image_attentions_of(blocks: Iterable[nn.Module | None]) -> list[ImageAttention]:
    """Every image attention transformer of `blocks`, in order."""
    return [a for block in blocks for a in getattr(block, "image_attentions", ())]


@contextmanager
def image_embeddings(
    attentions: list[ImageAttention],
    states: torch.Tensor | None,
    batch_size: int,
    image_dim: int | None,
    model_name: str,
) -> Iterator[None]:
    """Hand `states` (B, N, image_dim) to `attentions` for one forward call.

    `image_dim` is None for a model built without image attention, which takes no embeddings.
    """
    check_image_states(states, batch_size, image_dim, model_name)
    for attention in attentions:
        attention.image_encoder_hidden_states = states
    try:
        yield
    finally:
        for attention in attentions:
            attention.image_encoder_hidden_states = None


def check_image_states(
    states: torch.Tensor | None, batch_size: int, image_dim: int | None, model_name: str
) -> None:
    """Refuse embeddings a model cannot use: missing with image attention, given without it,
    or not (batch_size, N, image_dim)."""
    if image_dim is None:
        if states is not None:
            raise ValueError(
                f"{model_name} got image_encoder_hidden_states but has no image attention "
                "(use_image_cross_attention is false in its config); pass None, or load SeeSR's "
                "released folder"
            )
        return
    if states is None:
        raise ValueError(
            f"{model_name} has image attention: pass image_encoder_hidden_states, "
            f"(B, N, {image_dim}) RAM/DAPE image embeddings (`generate_image_embeds`)"
        )
    if states.ndim != 3 or states.shape[0] != batch_size or states.shape[-1] != image_dim:
        raise ValueError(
            f"{model_name}: image_encoder_hidden_states has shape {tuple(states.shape)}; "
            f"expected ({batch_size}, N, {image_dim}), one row per sample (under classifier-free "
            "guidance repeat it as the prompt embeddings are)"
        )


def with_seesr_signature(parent_init: Callable[..., None]) -> Callable:
    """Decorator: `__init__(self, *, <SeeSR keys>, **parent_kwargs)` shows the parent's
    parameters too, keyword-only, so diffusers' `from_config` (which reads the signature) passes
    every config key through."""

    def decorate(init: Callable[..., None]) -> Callable[..., None]:
        own = list(inspect.signature(init).parameters.values())
        inherited = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for p in list(inspect.signature(parent_init).parameters.values())[1:]
        ]
        extra = [p for p in own[1:] if p.kind is inspect.Parameter.KEYWORD_ONLY]
        init.__signature__ = inspect.Signature([own[0], *inherited, *extra])
        return init

    return decorate


class SeeSRUNet(UNet2DConditionModel):
    """diffusers' UNet2DConditionModel plus SeeSR's image attention.

    Config keys beyond diffusers': `use_image_cross_attention` (SeeSR's own switch, true in its
    released `unet/config.json`) and `image_cross_attention_dim` (SeeSR's fixed 512).
    """

    @with_seesr_signature(UNet2DConditionModel.__init__)
    def __init__(
        self,
        *,
        use_image_cross_attention: bool = False,
        image_cross_attention_dim: int = IMAGE_EMBED_DIM,
        **unet_kwargs: Any,
    ) -> None:
        super().__init__(**unet_kwargs)
        self.register_to_config(
            use_image_cross_attention=use_image_cross_attention,
            image_cross_attention_dim=image_cross_attention_dim,
        )
        if use_image_cross_attention:
            add_image_attentions(self.seesr_blocks(), image_cross_attention_dim)

    def seesr_blocks(self) -> list[nn.Module | None]:
        """The blocks that may hold image attention, in forward order."""
        return [*self.down_blocks, self.mid_block, *self.up_blocks]

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        *args: Any,
        image_encoder_hidden_states: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> UNet2DConditionOutput | tuple[torch.Tensor]:
        """diffusers' UNet forward with SeeSR's image attention.

        sample: (B, 4, h, w) noisy latents; encoder_hidden_states: (B, 77, 1024) prompt
        embeddings; image_encoder_hidden_states: (B, N, image_cross_attention_dim) RAM/DAPE
        image embeddings of the LR input ((B, 145, 512) for RAM Swin-L at 384 px), required
        when the config has `use_image_cross_attention`. Other arguments as diffusers'
        (`down_block_additional_residuals`, `mid_block_additional_residual`, `return_dict`, …).
        """
        with image_embeddings(
            image_attentions_of(self.seesr_blocks()),
            image_encoder_hidden_states,
            sample.shape[0],
            self.image_dim(),
            type(self).__name__,
        ):
            return super().forward(sample, timestep, encoder_hidden_states, *args, **kwargs)

    def image_dim(self) -> int | None:
        """Width of the image tokens the model attends to; None without image attention."""
        on = self.config.use_image_cross_attention
        return self.config.image_cross_attention_dim if on else None


def read_seesr_config(folder: Path, class_names: tuple[str, ...], hint: str) -> dict[str, Any]:
    """`folder`/config.json, checked to be one of `class_names` with image attention on."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise WeightsError(f"{folder} has no config.json; {hint}")
    config = json.loads(config_file.read_text())
    name = config.get("_class_name")
    if name not in class_names:
        raise WeightsError(
            f"{folder}/config.json describes a {name}, not a {class_names[0]}; {hint}"
        )
    if config.get("use_image_cross_attention") is not True:
        raise WeightsError(
            f"{folder}/config.json has no image attention (use_image_cross_attention is "
            f"{config.get('use_image_cross_attention')!r}, SeeSR's folders say true); {hint}"
        )
    return config


def checkpoint_shapes(folder: Path, hint: str) -> dict[str, tuple[int, ...]]:
    """{key: shape} of the diffusers weights in `folder`, read without loading the tensors."""
    from safetensors import safe_open

    single, index = folder / SAFETENSORS_WEIGHTS_NAME, folder / SAFE_WEIGHTS_INDEX_NAME
    if single.is_file() or index.is_file():
        files = [single] if single.is_file() else shard_files(index)
        shapes = {}
        for file in files:
            with safe_open(str(file), framework="pt") as weights:
                shapes |= {k: tuple(weights.get_slice(k).get_shape()) for k in weights.keys()}  # noqa: SIM118
        return shapes
    single, index = folder / WEIGHTS_NAME, folder / WEIGHTS_INDEX_NAME
    if not (single.is_file() or index.is_file()):
        raise WeightsError(
            f"{folder} holds no {SAFETENSORS_WEIGHTS_NAME} or {WEIGHTS_NAME}; {hint}"
        )
    shapes = {}
    for file in [single] if single.is_file() else shard_files(index):
        state = torch.load(file, map_location="meta", weights_only=True)
        shapes |= {k: tuple(v.shape) for k, v in state.items()}
    return shapes


def shard_files(index: Path) -> list[Path]:
    """The shard files a `*.index.json` names, in sorted order."""
    names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [index.parent / name for name in names]


def check_weights(folder: Path, expected: dict[str, torch.Tensor], hint: str) -> None:
    """Refuse a checkpoint that leaves a parameter of `expected` unset, holds a key it lacks,
    or holds one with another shape."""
    found = checkpoint_shapes(folder, hint)
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(k for k in found if k not in expected)
    wrong = sorted(k for k in found if k in expected and found[k] != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        raise WeightsError(
            f"{folder} does not match the model its config.json describes: "
            f"{len(missing)} parameter(s) missing (e.g. {missing[:3]}), {len(unexpected)} "
            f"unexpected key(s) (e.g. {unexpected[:3]}), {len(wrong)} with other shapes "
            f"(e.g. {wrong[:3]}); {hint}"
        )


def load_strict(
    model_class: type[Model],
    folder: str | Path,
    class_names: tuple[str, ...],
    hint: str,
    torch_dtype: torch.dtype | None,
) -> Model:
    """`model_class.from_pretrained(folder)` once config and weights are checked to match."""
    folder = Path(folder)
    config = read_seesr_config(folder, class_names, hint)
    with torch.device("meta"):
        expected = model_class.from_config(config).state_dict()
    check_weights(folder, expected, hint)
    return model_class.from_pretrained(folder, torch_dtype=torch_dtype)


def load_seesr_unet(folder: str | Path, torch_dtype: torch.dtype | None = None) -> SeeSRUNet:
    """SeeSR's released `unet/` folder as a SeeSRUNet; every parameter must be in the
    checkpoint with its shape, and nothing else (else WeightsError naming the keys)."""
    names = ("UNet2DConditionModel", "SeeSRUNet")
    return load_strict(SeeSRUNet, folder, names, UNET_FOLDER_HINT, torch_dtype)
