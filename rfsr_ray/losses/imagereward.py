"""ImageReward (Xu et al. 2023), the paper's second reward, as a differentiable reward.

The published `image-reward` package pins timm 0.6.13 and fairscale, which conflict with pyiqa's
timm ≥ 0.8, so it cannot join our environment. Its scoring path is small: a BLIP ViT-L/16 image
encoder, a BERT text encoder with cross-attention to the image tokens (BLIP's "med" BERT), and an
MLP on the [CLS] feature, z-scored with the released model's mean and std. transformers ships
the same BLIP parts (`BlipVisionModel`, `BlipTextModel`), so we build those from config and load
the released checkpoint (`ImageReward.pt` from the hub repo `THUDM/ImageReward`) into them by
renaming its keys; a load that leaves any parameter unset is refused.

Preprocessing runs on tensors with gradient (no PIL round trip): bicubic resize of the shorter
side to 224 with antialiasing, centre crop, CLIP normalisation, as ImageReward's ReFL code does.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rfsr_ray import seeds
from rfsr_ray.errors import WeightsError
from rfsr_ray.losses.reward_protocol import RewardInfo

HUB_REPO = "THUDM/ImageReward"
CHECKPOINT = "ImageReward.pt"
TOKENIZER_REPO = "bert-base-uncased"
# Score normalisation shipped with the released model (ImageReward.py: self.mean / self.std).
RELEASED_MEAN, RELEASED_STD = 0.16717362830052426, 1.0333394966054072
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_PROMPT_TOKENS = 35  # the released model's tokenizer length


def vision_config(**sizes: int) -> object:
    """BLIP ViT-L/16 at 224 px (`sizes` shrink it for tests)."""
    from transformers import BlipVisionConfig

    shape = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
             "num_attention_heads": 16, "image_size": 224, "patch_size": 16} | sizes  # fmt: skip
    return BlipVisionConfig(**shape, layer_norm_eps=1e-6, hidden_act="gelu")


def text_config(encoder_hidden_size: int = 1024, **sizes: int) -> object:
    """BLIP's med BERT-base: cross-attention layers (`is_decoder` builds them; the forward runs
    bidirectionally), 30524 tokens (bert-base-uncased plus [DEC] and [ENC])."""
    from transformers import BlipTextConfig

    shape = {"vocab_size": 30524, "hidden_size": 768, "intermediate_size": 3072,
             "num_hidden_layers": 12, "num_attention_heads": 12} | sizes  # fmt: skip
    return BlipTextConfig(
        **shape,
        encoder_hidden_size=encoder_hidden_size,
        max_position_embeddings=512,
        layer_norm_eps=1e-12,
        hidden_act="gelu",
        is_decoder=True,
    )


def score_head(width: int) -> nn.Sequential:
    """ImageReward's MLP (no activations between the linear layers, as released)."""
    return nn.Sequential(
        nn.Linear(width, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )


class ImageRewardModel(nn.Module):
    def __init__(self, vision: object, text: object) -> None:
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision = BlipVisionModel(vision)
        self.text = BlipTextModel(text, add_pooling_layer=False)
        self.head = score_head(text.hidden_size)
        self.image_size = vision.image_size

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] → CLIP-normalised (B, 3, 224, 224), differentiably."""
        # Sizes and crop offsets computed as torchvision's Resize(224) + CenterCrop(224) do.
        height, width = image.shape[-2:]
        side = self.image_size
        if height <= width:
            size = (side, int(side * width / height))
        else:
            size = (int(side * height / width), side)
        image = F.interpolate(image, size=size, mode="bicubic", align_corners=False, antialias=True)
        top, left = (round((extent - side) / 2.0) for extent in size)
        image = image[..., top : top + side, left : left + side]
        mean = image.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = image.new_tensor(CLIP_STD).view(1, 3, 1, 1)
        return (image - mean) / std

    def forward(
        self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Raw (un-normalised) scores, (B,)."""
        image_embeds = self.vision(pixel_values=self.preprocess(image)).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image.device)
        text = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            is_decoder=False,
            use_cache=False,
        )
        return self.head(text.last_hidden_state[:, 0, :].float()).squeeze(-1)


# Released BLIP ViT names → transformers' BlipVisionModel names.
_VISION_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]


def _rename(key: str, rules: list[tuple[str, str]]) -> str | None:
    for pattern, replacement in rules:
        if re.search(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def convert_released(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The released checkpoint's keys (`blip.visual_encoder.*`, `blip.text_encoder.*`,
    `mlp.layers.*`) renamed onto `ImageRewardModel`; BLIP's other heads are dropped."""
    converted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            name = _rename(key.removeprefix("blip.visual_encoder."), _VISION_RENAMES)
            if name is not None:
                converted[f"vision.{name}"] = value
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            converted[f"text.{key.removeprefix('blip.text_encoder.')}"] = value
        elif key.startswith("mlp.layers."):
            converted[f"head.{key.removeprefix('mlp.layers.')}"] = value
    return converted


HEAD_DIM = 64  # attention head width of BLIP's ViT and of BERT-base


def configs_from(state: dict[str, torch.Tensor]) -> tuple[object, object]:
    """Vision and text configs read off a converted checkpoint's shapes (ViT-L/16 and BERT-base
    for the released model; smaller stand-ins work the same way)."""

    def count(prefix: str) -> int:
        return 1 + max(int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix))

    width = state["vision.embeddings.position_embedding"].shape[-1]
    patch = state["vision.embeddings.patch_embedding.weight"].shape[-1]
    positions = state["vision.embeddings.position_embedding"].shape[1] - 1
    vision = vision_config(
        hidden_size=width,
        intermediate_size=state["vision.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=count("vision.encoder.layers."),
        num_attention_heads=max(1, width // HEAD_DIM),
        patch_size=patch,
        image_size=round(positions**0.5) * patch,
    )
    words = state["text.embeddings.word_embeddings.weight"]
    text = text_config(
        encoder_hidden_size=state["text.encoder.layer.0.crossattention.self.key.weight"].shape[1],
        vocab_size=words.shape[0],
        hidden_size=words.shape[1],
        intermediate_size=state["text.encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_hidden_layers=count("text.encoder.layer."),
        num_attention_heads=max(1, words.shape[1] // HEAD_DIM),
    )
    return vision, text


def load_released(checkpoint: Path) -> ImageRewardModel:
    """`ImageReward.pt` as an ImageRewardModel; every parameter must be set, shapes matching."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    converted = convert_released(state)
    try:
        model = ImageRewardModel(*configs_from(converted))
    except (KeyError, ValueError) as error:
        raise WeightsError(
            f"{checkpoint} is not an ImageReward checkpoint ({type(error).__name__}: {error}); "
            f"use the released {CHECKPOINT} from {HUB_REPO}"
        ) from None
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in converted and "position_ids" not in k)
    wrong = sorted(
        k for k, v in converted.items() if k in expected and v.shape != expected[k].shape
    )
    if missing or wrong:
        raise WeightsError(
            f"{checkpoint} is not an ImageReward checkpoint this code can load: "
            f"{len(missing)} parameter(s) missing (e.g. {missing[:3]}), {len(wrong)} with other "
            f"shapes (e.g. {wrong[:3]}); use the released {CHECKPOINT} from {HUB_REPO}"
        )
    model.load_state_dict({k: v for k, v in converted.items() if k in expected}, strict=False)
    return model


class ImageReward(nn.Module):
    """(sr, prompt) → ImageReward score, z-scored as released (higher is better)."""

    def __init__(
        self,
        model: ImageRewardModel,
        tokenizer: object,
        prompt: str = "",
        drop_prob: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.tokenizer, self.prompt, self.drop_prob = tokenizer, prompt, drop_prob
        self.seed, self.calls = seed, 0
        self.info = RewardInfo("imagereward", False, True, None)

    def prompts_for(self, batch_size: int, prompt: list[str] | None) -> list[str]:
        """Per-sample prompts (else the configured one), each emptied with `drop_prob`, from
        the reward's own seeded stream."""
        texts = list(prompt) if prompt is not None else [self.prompt] * batch_size
        if self.drop_prob > 0:
            generator = seeds.torch_generator(self.seed, "reward.imagereward", self.calls)
            draws = torch.rand(batch_size, generator=generator).tolist()
            texts = ["" if d < self.drop_prob else t for d, t in zip(draws, texts, strict=True)]
        self.calls += 1
        return texts

    def forward(
        self,
        sr: torch.Tensor,
        hr: torch.Tensor | None = None,
        lr: torch.Tensor | None = None,
        prompt: list[str] | None = None,
    ) -> torch.Tensor:
        tokens = self.tokenizer(
            self.prompts_for(sr.shape[0], prompt),
            padding="max_length",
            truncation=True,
            max_length=MAX_PROMPT_TOKENS,
            return_tensors="pt",
        )
        device = sr.device
        raw = self.model(sr.float(), tokens.input_ids.to(device), tokens.attention_mask.to(device))
        return (raw - RELEASED_MEAN) / RELEASED_STD


def load_tokenizer(folder: Path) -> object:
    """bert-base-uncased with BLIP's two extra tokens ([DEC] as BOS, [ENC])."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def checkpoint_file(weights: str | None) -> Path:
    """`weights` (a file, or a folder / hub id holding ImageReward.pt), default the hub repo."""
    from rfsr_ray.hub import resolve

    source = weights or HUB_REPO
    if Path(source).expanduser().is_file():
        return Path(source).expanduser()
    folder = resolve(source, None, "losses.reward.terms[imagereward].weights")
    path = folder / CHECKPOINT
    if not path.is_file():
        raise WeightsError(f"{folder} holds no {CHECKPOINT}; download it from {HUB_REPO}")
    return path


def build_imagereward(
    weights: str | None,
    tokenizer: str | None,
    prompt: str,
    drop_prob: float,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> ImageReward:
    """The released ImageReward from `weights` (default the hub repo) and its tokenizer."""
    from rfsr_ray.hub import resolve

    checkpoint = checkpoint_file(weights)
    tokenizer_dir = resolve(
        tokenizer or TOKENIZER_REPO, None, "losses.reward.terms[imagereward].tokenizer"
    )
    model = load_released(checkpoint)
    reward = ImageReward(model, load_tokenizer(tokenizer_dir), prompt, drop_prob, seed)
    return reward.to(device)
