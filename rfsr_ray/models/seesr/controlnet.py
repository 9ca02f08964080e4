"""SeeSR's ControlNet: diffusers' ControlNetModel with SeeSR's image attention.

SeeSR (`models/controlnet.py`) passes `use_image_cross_attention` to the ControlNet's down blocks
and mid block, which then hold `image_attentions` exactly as the UNet's (see `unet.py`), and
`train_seesr.py` builds it with `ControlNetModel.from_unet(unet, use_image_cross_attention=True)`,
which copies the UNet's down and mid blocks, image attentions included.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.models.controlnets.controlnet import ControlNetOutput

from rfsr_ray.models.seesr.unet import (
    IMAGE_EMBED_DIM,
    add_image_attentions,
    image_attentions_of,
    image_embeddings,
    load_strict,
    with_seesr_signature,
)

CONTROLNET_FOLDER_HINT = (
    "pass the `controlnet/` folder of the released SeeSR model (diffusers format: config.json "
    'with "use_image_cross_attention": true, diffusion_pytorch_model.safetensors)'
)


class SeeSRControlNet(ControlNetModel):
    """diffusers' ControlNetModel plus SeeSR's image attention in its down and mid blocks.

    Config keys beyond diffusers': `use_image_cross_attention` (SeeSR's switch, true in its
    released `controlnet/config.json`) and `image_cross_attention_dim` (SeeSR's fixed 512).
    """

    @with_seesr_signature(ControlNetModel.__init__)
    def __init__(
        self,
        *,
        use_image_cross_attention: bool = False,
        image_cross_attention_dim: int = IMAGE_EMBED_DIM,
        **controlnet_kwargs: Any,
    ) -> None:
        super().__init__(**controlnet_kwargs)
        self.register_to_config(
            use_image_cross_attention=use_image_cross_attention,
            image_cross_attention_dim=image_cross_attention_dim,
        )
        if use_image_cross_attention:
            add_image_attentions([*self.down_blocks, self.mid_block], image_cross_attention_dim)

    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        controlnet_conditioning_channel_order: str = "rgb",
        conditioning_embedding_out_channels: tuple[int, ...] | None = (16, 32, 96, 256),
        load_weights_from_unet: bool = True,
        conditioning_channels: int = 3,
    ) -> SeeSRControlNet:
        """A ControlNet configured from `unet` (image attention as `unet` has it) and, with
        `load_weights_from_unet`, holding its conv_in, time embedding, down blocks and mid
        block, image attentions included: SeeSR's `ControlNetModel.from_unet(unet,
        use_image_cross_attention=True)` for a SeeSRUNet, diffusers' for a plain UNet."""
        image_config = {
            "use_image_cross_attention": unet.config.get("use_image_cross_attention", False),
            "image_cross_attention_dim": unet.config.get(
                "image_cross_attention_dim", IMAGE_EMBED_DIM
            ),
        }
        # diffusers' own UNet → ControlNet mapping and weight copy, run with a constructor that
        # adds the image keys (its strict block copy then carries the image attentions over).
        build = partial(cls, **image_config)
        return ControlNetModel.from_unet.__func__(
            build,
            unet,
            controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
            conditioning_embedding_out_channels=conditioning_embedding_out_channels,
            load_weights_from_unet=load_weights_from_unet,
            conditioning_channels=conditioning_channels,
        )

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        *args: Any,
        image_encoder_hidden_states: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> ControlNetOutput | tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """diffusers' ControlNet forward with SeeSR's image attention.

        sample: (B, 4, h, w) noisy latents; encoder_hidden_states: (B, 77, 1024);
        controlnet_cond: (B, 3, 8h, 8w) the LR image upsampled to HR size, in [0, 1];
        image_encoder_hidden_states: (B, N, image_cross_attention_dim) RAM/DAPE image
        embeddings ((B, 145, 512) for RAM Swin-L at 384 px), required with image attention.
        Other arguments as diffusers' (`conditioning_scale`, `guess_mode`, `return_dict`, …).
        """
        with image_embeddings(
            image_attentions_of([*self.down_blocks, self.mid_block]),
            image_encoder_hidden_states,
            sample.shape[0],
            self.image_dim(),
            type(self).__name__,
        ):
            return super().forward(
                sample, timestep, encoder_hidden_states, controlnet_cond, *args, **kwargs
            )

    def image_dim(self) -> int | None:
        """Width of the image tokens the model attends to; None without image attention."""
        on = self.config.use_image_cross_attention
        return self.config.image_cross_attention_dim if on else None


def load_seesr_controlnet(
    folder: str | Path, torch_dtype: torch.dtype | None = None
) -> SeeSRControlNet:
    """SeeSR's released `controlnet/` folder as a SeeSRControlNet; every parameter must be in
    the checkpoint with its shape, and nothing else (else WeightsError naming the keys)."""
    names = ("ControlNetModel", "SeeSRControlNet")
    return load_strict(SeeSRControlNet, folder, names, CONTROLNET_FOLDER_HINT, torch_dtype)
