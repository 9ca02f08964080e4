"""SeeSR's DAPE tagger: RAM (Recognize Anything, Swin-L at 384 px) with SeeSR's LoRA over it.

For an LR image it gives (a) the tags above their per-tag thresholds, joined with ", " (SeeSR
puts them at the head of its prompt) and (b) the image embeddings its UNet and ControlNet image
cross-attention attend to: the Swin's final tokens plus their mean in front, projected to 512.

Built from timm's `SwinTransformer` and transformers' BERT attention parts; the released files
(`ram_swin_large_14m.pth`, then SeeSR's `DAPE.pth` over it) load by renaming their keys onto
these modules, and a load that leaves any parameter unset or finds a key it cannot place is
refused. Facts taken from github.com/cswry/SeeSR (ram/models/ram_lora.py, swin_transformer_lora.py,
bert_lora.py, utils.py; test_seesr.py; basicsr/models/dape_model.py):
- the image embeddings are `image_proj(swin(x))`, the Swin's output being its normed final
  tokens with their average pooled in front: (B, 1 + (384 / 32)^2, 512) = (B, 145, 512);
- tagging: 4585 learned label queries (512 wide, `relu(wordvec_proj(.))` to 768) pass two
  Query2Label layers (cross-attention to the image embeddings, no self-attention, then BERT's
  feed-forward), `fc` gives one logit per tag; a tag is kept when sigmoid(logit) exceeds its own
  threshold (ram_tag_list_threshold.txt; RAM's uniform 0.68 is overwritten by it);
- DAPE.pth holds LoRA factors only (`*.lora_A`, `*.lora_B`; loralib, rank 8, alpha 1): on every
  Swin `attn.qkv` (a `MergedLinear` adapting the q and v rows) and on the tagging layers'
  cross-attention query and key; SeeSR's `model.eval()` merges W += B @ A * alpha / r, which is
  what loading does here. RAM ties the tagging layers' weights to those of its text encoder's
  first layers (`tag_encoder`), whose LoRA then merge into the same weights: they are applied too;
- preprocessing (test_seesr.py): the LR image as a [0, 1] tensor, resized to 384 x 384
  (torchvision `Resize` on a tensor: bilinear, no antialiasing in SeeSR's torchvision 0.15),
  ImageNet mean / std. SeeSR's training data path resizes bicubically and clamps instead
  (`resize_mode="bicubic"`).

The tag list shipped beside this file (ram_tag_list.txt, ram_tag_list_threshold.txt) is copied
verbatim from SeeSR's ram/data/ at commit 8edecc71c4f3efa01cd26078f2e8dffd1ce80a6a, which took it
from RAM (github.com/xinyu1205/recognize-anything); both repositories are Apache-2.0 licensed,
which allows redistribution with this notice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from rfsr_ray.errors import ConfigError, WeightsError

RAM_FILE = "ram_swin_large_14m.pth"
DAPE_FILE = "DAPE.pth"
RAM_SOURCE = (
    "https://huggingface.co/spaces/xinyu1205/recognize-anything/blob/main/ram_swin_large_14m.pth"
)
DAPE_SOURCE = (
    "the SeeSR release folder (https://drive.google.com/drive/folders/"
    "12HXrRGEXUAnmHRaf0bIn-S8XSK4Ku0JO, linked from github.com/cswry/SeeSR's README)"
)
TAG_LIST = Path(__file__).with_name("ram_tag_list.txt")
THRESHOLDS = Path(__file__).with_name("ram_tag_list_threshold.txt")
DEFAULT_THRESHOLD = 0.68  # RAM's uniform threshold, used when a tag list comes without its own
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LORA_ALPHA = 1.0  # loralib's default; SeeSR passes none, so each LoRA scales by 1 / rank
QKV_LORA_GROUPS = (True, False, True)  # SeeSR's MergedLinear(enable_lora=[True, False, True])


@dataclass(frozen=True)
class TaggerConfig:
    """Sizes of the tagger; the defaults are the released RAM Swin-L at 384 px."""

    image_size: int = 384
    patch_size: int = 4
    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 12
    embed_width: int = 512  # image_proj's output and the label queries' width
    head_hidden: int = 768
    head_intermediate: int = 3072
    head_layers: int = 2
    head_heads: int = 4
    num_tags: int = 4585
    layer_norm_eps: float = 1e-12
    resize_mode: Literal["bilinear", "bicubic"] = "bilinear"

    def __post_init__(self) -> None:
        stride = self.patch_size * 2 ** (len(self.depths) - 1)
        if self.image_size % stride:
            raise ConfigError(
                f"tagger image_size={self.image_size} must be a multiple of {stride} "
                f"(patch_size x 2^(stages - 1)), e.g. {stride * max(1, self.image_size // stride)}"
            )
        if len(self.num_heads) != len(self.depths):
            raise ConfigError(
                f"tagger num_heads={self.num_heads} needs one entry per stage of "
                f"depths={self.depths}"
            )
        if self.head_hidden % self.head_heads:
            raise ConfigError(
                f"tagger head_hidden={self.head_hidden} must divide into "
                f"head_heads={self.head_heads}, e.g. head_heads=4 for 768"
            )
        if self.resize_mode not in ("bilinear", "bicubic"):
            raise ConfigError(
                f"tagger resize_mode={self.resize_mode!r} must be 'bilinear' (SeeSR inference) "
                "or 'bicubic' (SeeSR training)"
            )

    @property
    def num_features(self) -> int:
        """Width of the Swin's final tokens (1536 for Swin-L)."""
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    @property
    def num_tokens(self) -> int:
        """Image embedding tokens: the pooled token plus the final grid (145 at 384 px)."""
        return 1 + (self.image_size // (self.patch_size * 2 ** (len(self.depths) - 1))) ** 2


def released_config(**overrides: object) -> TaggerConfig:
    """RAM Swin-L at 384 px with its 4585-tag head, as SeeSR uses it."""
    return TaggerConfig(**overrides)


def tiny_config(**overrides: object) -> TaggerConfig:
    """A small tagger for tests: Swin at 32 px (two stages, a shifted block), 6 tags. The
    512-wide embeddings stay: RAM fixes that width in code, not in config."""
    sizes = {"image_size": 32, "embed_dim": 16, "depths": (2, 2), "num_heads": (2, 4),
             "window_size": 4, "head_hidden": 24, "head_intermediate": 48, "head_heads": 2,
             "num_tags": 6}  # fmt: skip
    return TaggerConfig(**(sizes | overrides))


@dataclass(frozen=True)
class TagList:
    """The tag vocabulary and each tag's sigmoid threshold, in the order of the label queries."""

    tags: tuple[str, ...]
    thresholds: tuple[float, ...]


def load_tag_list(tag_list_file: Path | None = None, threshold_file: Path | None = None) -> TagList:
    """RAM's 4585 tags and thresholds shipped with rfsr_ray, or a tag list file (one tag a line)
    with an optional threshold file (one float a line; else RAM's uniform 0.68)."""
    if tag_list_file is None:
        tag_list_file, threshold_file = TAG_LIST, threshold_file or THRESHOLDS
    tags = tuple(_read_lines(Path(tag_list_file), "tag list"))
    if threshold_file is None:
        return TagList(tags, (DEFAULT_THRESHOLD,) * len(tags))
    values = _read_lines(Path(threshold_file), "tag threshold")
    try:
        thresholds = tuple(float(value) for value in values)
    except ValueError as error:
        raise ConfigError(f"{threshold_file} must hold one float per line ({error})") from None
    if len(thresholds) != len(tags):
        raise ConfigError(
            f"{threshold_file} holds {len(thresholds)} thresholds for the {len(tags)} tags of "
            f"{tag_list_file}; give one per tag, in the same order"
        )
    return TagList(tags, thresholds)


def _read_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise ConfigError(f"{what} file {path} does not exist; pass an existing file")
    return path.read_text(encoding="utf-8").splitlines()


class TaggingLayer(nn.Module):
    """One Query2Label layer of RAM's tagging head: BERT cross-attention from the label queries to
    the image embeddings, then BERT's feed-forward; RAM deletes the self-attention."""

    def __init__(self, config: TaggerConfig) -> None:
        super().__init__()
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import (
            BertAttention,
            BertIntermediate,
            BertOutput,
        )

        bert = BertConfig(
            hidden_size=config.head_hidden,
            num_attention_heads=config.head_heads,
            intermediate_size=config.head_intermediate,
            layer_norm_eps=config.layer_norm_eps,
            hidden_act="gelu",
            add_cross_attention=True,
        )
        bert._attn_implementation = "eager"
        self.crossattention = BertAttention(bert, is_cross_attention=True)
        # transformers' BERT reads keys and values at its own width; RAM's are 512 wide.
        attention = self.crossattention.self
        attention.key = nn.Linear(config.embed_width, attention.all_head_size)
        attention.value = nn.Linear(config.embed_width, attention.all_head_size)
        self.intermediate = BertIntermediate(bert)
        self.output = BertOutput(bert)

    def forward(self, queries: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """queries: (B, K, head_hidden), image_embeds: (B, N, embed_width) -> (B, K, head_hidden)"""
        attended, _ = self.crossattention(queries, encoder_hidden_states=image_embeds)
        return self.output(self.intermediate(attended), attended)


@dataclass
class TagOutput:
    """captions: one ", "-joined tag string per image ("" when no tag passes);
    image_embeds: (B, N, C), N = 145 and C = 512 at the released size."""

    captions: list[str]
    image_embeds: torch.Tensor


class DAPETagger(nn.Module):
    """RAM's image encoder and tagging head (DAPE's LoRA merged into the weights on load)."""

    def __init__(self, config: TaggerConfig, tag_list: TagList) -> None:
        super().__init__()
        from timm.models.swin_transformer import SwinTransformer

        if len(tag_list.tags) != config.num_tags:
            raise ConfigError(
                f"the tag list has {len(tag_list.tags)} tags but the tagger config has "
                f"num_tags={config.num_tags}; use the tag list the weights were trained with"
            )
        self.config, self.tags = config, tag_list.tags
        self.visual_encoder = SwinTransformer(
            img_size=config.image_size,
            patch_size=config.patch_size,
            embed_dim=config.embed_dim,
            depths=config.depths,
            num_heads=config.num_heads,
            window_size=config.window_size,
            num_classes=0,
            global_pool="",
            drop_path_rate=0.0,
        )
        self.image_proj = nn.Linear(config.num_features, config.embed_width)
        self.label_embed = nn.Parameter(torch.zeros(config.num_tags, config.embed_width))
        self.wordvec_proj: nn.Module = (
            nn.Linear(config.embed_width, config.head_hidden)
            if config.head_hidden != config.embed_width
            else nn.Identity()
        )
        self.tagging_head = nn.ModuleList(TaggingLayer(config) for _ in range(config.head_layers))
        self.fc = nn.Linear(config.head_hidden, 1)
        self.register_buffer("thresholds", torch.tensor(tag_list.thresholds), persistent=False)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), False)

    def preprocess(self, lr_image: torch.Tensor) -> torch.Tensor:
        """lr_image: (B, 3, h, w) float in [0, 1] -> (B, 3, S, S) ImageNet-normalised, S = 384
        at the released size; differentiable."""
        if lr_image.ndim != 4 or lr_image.shape[1] != 3:
            raise ValueError(
                f"lr_image has shape {tuple(lr_image.shape)}; pass (B, 3, h, w) RGB in [0, 1]"
            )
        size = (self.config.image_size, self.config.image_size)
        image = lr_image.to(self.pixel_mean.dtype)
        if self.config.resize_mode == "bicubic":
            image = F.interpolate(image, size=size, mode="bicubic", align_corners=False)
            image = image.clamp(0.0, 1.0)
        else:
            image = F.interpolate(
                image, size=size, mode="bilinear", align_corners=False, antialias=False
            )
        return (image - self.pixel_mean) / self.pixel_std

    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: (B, 3, S, S) normalised -> (B, 1 + T, embed_width): the pooled token, then the
        T final Swin tokens in raster order, each projected by image_proj."""
        tokens = self.visual_encoder.forward_features(pixels.to(self.image_proj.weight.dtype))
        tokens = tokens.flatten(1, 2)  # (B, H', W', C) -> (B, T, C)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        return self.image_proj(tokens)

    def tag_logits(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """image_embeds: (B, N, embed_width) -> (B, num_tags) logits."""
        queries = F.relu(self.wordvec_proj(self.label_embed))
        queries = queries.unsqueeze(0).expand(image_embeds.shape[0], -1, -1)
        for layer in self.tagging_head:
            queries = layer(queries, image_embeds)
        return self.fc(queries).squeeze(-1)

    def forward(self, lr_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """lr_image: (B, 3, h, w) in [0, 1] -> (logits (B, num_tags), image_embeds (B, N, C))."""
        image_embeds = self.image_embeds(self.preprocess(lr_image))
        return self.tag_logits(image_embeds), image_embeds

    def captions(self, logits: torch.Tensor) -> list[str]:
        """logits: (B, num_tags) -> per image the tags with sigmoid(logit) > their threshold, in
        tag-list order, joined with ", " as SeeSR's `generate_tag` does."""
        chosen = torch.sigmoid(logits.float()) > self.thresholds.to(logits.device)
        return [", ".join(self.tags[i] for i in row.nonzero().flatten().tolist()) for row in chosen]

    @torch.no_grad()
    def tag(self, lr_image: torch.Tensor) -> TagOutput:
        """lr_image: (B, 3, h, w) float in [0, 1] -> TagOutput(B captions, (B, N, C) embeds)."""
        logits, image_embeds = self(lr_image)
        return TagOutput(self.captions(logits), image_embeds)


def build_dape_tagger(
    config: TaggerConfig | None = None, tag_list: TagList | None = None
) -> DAPETagger:
    """A randomly initialised tagger (default: released sizes and RAM's shipped tag list)."""
    return DAPETagger(config or released_config(), tag_list or load_tag_list())


# Released entries the tagging path never reads: RAM's text encoder and caption decoder.
UNUSED_PREFIXES = ("tag_encoder.", "text_decoder.")
# Index buffers the released Swin saves and timm rebuilds (RAM's own loader deletes them too).
DERIVED_SUFFIXES = (".relative_position_index", ".attn_mask")


def _zip_format(path: Path) -> bool:
    """Whether `path` is torch.save's zip format (the only one torch.load can memory-map)."""
    import zipfile

    return zipfile.is_zipfile(path)


def our_name(key: str) -> str | None:
    """A released RAM / DAPE key as this module's name (None: an entry the tagger drops).
    The released Swin keeps each stage's patch merging at its end, timm at the next stage's
    start; RAM's tagging head is a BertModel (`encoder.layer.i`), ours a ModuleList."""
    key = key.replace("vision_multi", "tagging_head")  # RAM's legacy name, renamed as RAM does
    if key.startswith(UNUSED_PREFIXES) or key.endswith(DERIVED_SUFFIXES):
        return None
    merge = re.match(r"visual_encoder\.layers\.(\d+)\.downsample\.(.+)$", key)
    if merge:
        return f"visual_encoder.layers.{int(merge[1]) + 1}.downsample.{merge[2]}"
    return re.sub(r"^tagging_head\.encoder\.layer\.(\d+)\.", r"tagging_head.\1.", key)


def tied_name(key: str, head_layers: int) -> str | None:
    """A `tag_encoder` LoRA weight that RAM ties to a tagging layer's, as that layer's name."""
    tied = re.match(
        r"tag_encoder\.encoder\.layer\.(\d+)\.(crossattention\.self\.\w+\.weight)$", key
    )
    if tied and int(tied[1]) < head_layers:
        return f"tagging_head.{tied[1]}.{tied[2]}"
    return None


def convert_released(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Non-LoRA released entries renamed onto DAPETagger (unused and derived ones dropped)."""
    converted = {}
    for key, value in state.items():
        name = our_name(key)
        if name is not None and "lora_" not in key:
            converted[name] = value
    return converted


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The update B @ A * alpha / r that loralib merges into `weight` (out, in). lora_a: (g r, in),
    lora_b: (g out / 3, r) for the Swin's qkv `MergedLinear`, whose g = 2 groups adapt the q and v
    thirds of the weight, else (out, r) for a `lora.Linear`. ValueError if the shapes disagree."""
    if lora_a.shape[1] != weight.shape[1]:
        raise ValueError(f"lora_A {tuple(lora_a.shape)} vs weight {tuple(weight.shape)}")
    if lora_b.shape[0] == weight.shape[0]:
        return lora_b @ lora_a * (LORA_ALPHA / lora_a.shape[0])
    enabled = [index for index, on in enumerate(QKV_LORA_GROUPS) if on]
    rows, rank = weight.shape[0] // len(QKV_LORA_GROUPS), lora_a.shape[0] // len(enabled)
    if lora_b.shape != (rows * len(enabled), rank) or lora_a.shape[0] != rank * len(enabled):
        raise ValueError(f"lora_B {tuple(lora_b.shape)} vs weight {tuple(weight.shape)}")
    delta = weight.new_zeros(weight.shape)
    for group, chunk in enumerate(enabled):
        b = lora_b[group * rows : (group + 1) * rows]
        a = lora_a[group * rank : (group + 1) * rank]
        delta[chunk * rows : (chunk + 1) * rows] = b @ a * (LORA_ALPHA / rank)
    return delta


def lora_pairs(state: dict[str, torch.Tensor], source: Path) -> dict[str, tuple[torch.Tensor, ...]]:
    """{released module: (lora_A, lora_B)} of a DAPE state; a factor without its partner is
    refused."""
    modules = {key.rsplit(".lora_", 1)[0] for key in state if ".lora_" in key}
    unpaired = sorted(m for m in modules if not {f"{m}.lora_A", f"{m}.lora_B"} <= state.keys())
    if unpaired:
        raise WeightsError(
            f"{source} has {len(unpaired)} LoRA module(s) without both lora_A and lora_B "
            f"(e.g. {unpaired[:3]}); use the released {DAPE_FILE} from {DAPE_SOURCE}"
        )
    return {m: (state[f"{m}.lora_A"], state[f"{m}.lora_B"]) for m in sorted(modules)}


def lora_sites(tagger: DAPETagger) -> list[str]:
    """Our weights DAPE adapts: every Swin qkv and the tagging layers' query and key."""
    pattern = r"(attn\.qkv|crossattention\.self\.(query|key))\.weight$"
    return [name for name, _ in tagger.named_parameters() if re.search(pattern, name)]


def read_checkpoint(path: Path | str, name: str, what: str, source: str) -> dict:
    """The state dict in `path`, unwrapped from RAM's {"model": ...} / BasicSR's {"params": ...}."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"{name} not found at {path}: it is {what}; download it from {source}")
    # Memory-mapped: RAM's file also holds parts the tagger drops (its caption decoder), and a
    # tagger actor should not hold all of it in memory while it loads.
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=_zip_format(path))
    for wrapper in ("model", "params", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} holds no state dict of tensors; use the released {name}")
    return state


def refuse_mismatch(
    weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: Path, name: str
) -> None:
    """Raise WeightsError unless `weights` sets exactly the tensors of `expected`, same shapes."""
    missing = sorted(k for k in expected if k not in weights)
    unexpected = sorted(k for k in weights if k not in expected)
    wrong = sorted(
        f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
        for k, v in weights.items()
        if k in expected and v.shape != expected[k].shape
    )
    if missing or unexpected or wrong:
        raise WeightsError(
            f"{source} does not fit the tagger: {len(missing)} parameter(s) missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected key(s) (e.g. {unexpected[:3]}), "
            f"{len(wrong)} with other shapes (e.g. {wrong[:3]}); use the released {name} "
            "with the tagger config it was trained at"
        )


def apply_dape(
    weights: dict[str, torch.Tensor],
    dape: dict[str, torch.Tensor],
    tagger: DAPETagger,
    source: Path,
) -> dict[str, torch.Tensor]:
    """RAM weights with DAPE.pth over them: its plain entries replace RAM's, its LoRA factors
    merge into the weights they adapt. Every LoRA site of the tagger must receive its factors."""
    expected = tagger.state_dict()
    plain = convert_released(dape)
    refuse_mismatch(weights | plain, expected, source, DAPE_FILE)
    merged = weights | plain
    placed, unplaceable = set(), []
    for module, (lora_a, lora_b) in lora_pairs(dape, source).items():
        key = f"{module}.weight"
        target = our_name(key) or tied_name(key, len(tagger.tagging_head))
        if target is None and module.startswith(UNUSED_PREFIXES):
            continue  # LoRA on RAM's text encoder / decoder, which tagging never runs
        try:
            merged[target] = merged[target] + lora_delta(lora_a, lora_b, merged[target])
        except (KeyError, ValueError):
            unplaceable.append(module)
            continue
        if not module.startswith(UNUSED_PREFIXES):
            placed.add(target)  # the tied tag_encoder factors add to, but do not stand for, these
    missing = [site for site in lora_sites(tagger) if site not in placed]
    if unplaceable or missing:
        raise WeightsError(
            f"{source} is not a DAPE LoRA file for this tagger: {len(unplaceable)} unexpected "
            f"LoRA module(s) (e.g. {unplaceable[:3]}), {len(missing)} adapted weight(s) without "
            f"LoRA factors (e.g. {missing[:3]}); use the released {DAPE_FILE} from {DAPE_SOURCE}"
        )
    return merged


def load_dape_tagger(
    ram_file: Path | str,
    dape_file: Path | str,
    tag_list_file: Path | None = None,
    threshold_file: Path | None = None,
    config: TaggerConfig | None = None,
    device: torch.device | str = "cpu",
) -> DAPETagger:
    """SeeSR's DAPE tagger: RAM's `ram_swin_large_14m.pth`, then `DAPE.pth` over it, frozen and
    in eval mode. The tag list defaults to RAM's, shipped with rfsr_ray."""
    ram_state = read_checkpoint(ram_file, RAM_FILE, "RAM's Swin-L tagging model", RAM_SOURCE)
    dape_state = read_checkpoint(
        dape_file, DAPE_FILE, "SeeSR's DAPE LoRA weights, applied over RAM", DAPE_SOURCE
    )
    tagger = build_dape_tagger(config, load_tag_list(tag_list_file, threshold_file))
    weights = convert_released(ram_state)
    refuse_mismatch(weights, tagger.state_dict(), Path(ram_file), RAM_FILE)
    weights = apply_dape(weights, dape_state, tagger, Path(dape_file))
    tagger.load_state_dict(weights, strict=True)
    return tagger.to(device).eval().requires_grad_(False)
