"""Stage the released architectures with random weights, laid out as the real loaders expect.

    .venv/bin/python benchmarks/real_stage.py --dir /tmp/rfsr_real      # about 13 GB, a few minutes

What lands under DIR (never inside the repository):
    sd_x4_upscaler/        StableDiffusionUpscalePipeline.save_pretrained (473 M-parameter UNet,
                           3-block VAE, OpenCLIP ViT-H text tower), the released scheduler configs
    sd2_base_controlnet/   StableDiffusionControlNetPipeline.save_pretrained of SD 2 base plus a
                           ControlNet made with ControlNetModel.from_unet (its controlnet/ folder);
                           SD 2 base's released PNDM scheduler config
    torch/hub/clip/RN50.pt                   CLIP RN50 as pyiqa's CLIP-IQA loads it (TorchScript)
    torch/hub/checkpoints/vgg19-dcbb9e9d.pth torchvision VGG19 (the Gram regulariser)
    huggingface/hub/models--THUDM--ImageReward, models--bert-base-uncased
                           ImageReward.pt in the released key layout (BLIP ViT-L/16 + med BERT-base
                           + MLP) and a BERT tokenizer, as `huggingface-cli download` leaves them
    site/sitecustomize.py  the one stand-in shim (see `CLIP_SHIM`)

Speed and memory do not depend on weight values, so random weights measure the real thing.
The CLIP tokenizer is the real BPE vocabulary (49408 tokens, shipped with the `clip` package);
the BERT vocabulary is a stand-in with bert-base-uncased's size and special-token ids.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latent_step import SD2_UNET, UPSCALER_UNET, text_encoder, vae

# The released scheduler configs (stabilityai/stable-diffusion-x4-upscaler scheduler/ and
# low_res_scheduler/, stabilityai/stable-diffusion-2-base scheduler/), as written by hand here:
# no network access to copy them from.
UPSCALER_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
UPSCALER_LOW_RES_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "variance_type": "fixed_small",
}
SD2_BASE_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
HUB_COMMIT = "0" * 40  # snapshot name in the staged Hugging Face cache

# pyiqa's CLIP loader accepts a cached RN50.pt only when its SHA-256 equals OpenAI's file, which
# no random stand-in can match; it would then try to download. This shim (on PYTHONPATH, so Ray
# workers load it too) makes the loader take the staged file as it takes a verified real one.
CLIP_SHIM = '''"""Stand-in shim of benchmarks/real_stage.py: pyiqa's CLIP loader takes a
staged RN50.pt without OpenAI's checksum (a random stand-in cannot match it).
Never use with real weights."""
import importlib.abc
import importlib.util
import os
import sys


class _StagedClip(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "pyiqa.archs.clip_model":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            checked = module._download

            def staged(url, root):
                target = os.path.join(root, os.path.basename(url))
                return target if os.path.isfile(target) else checked(url, root)

            module._download = staged

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _StagedClip())
'''


def clip_tokenizer() -> object:
    """The real CLIP BPE tokenizer (SD 2 / the upscaler use it with pad token '!')."""
    import clip
    from clip.simple_tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    bpe = Path(clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.decompress(bpe.read_bytes()).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m.split()) for m in merges)]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path("/tmp") / "rfsr_clip_bpe"
    folder.mkdir(exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!", model_max_length=77
    )


def _write_scheduler(folder: Path, config: dict) -> None:
    (folder / "scheduler_config.json").write_text(json.dumps(config, indent=2))


def stage_upscaler(target: Path) -> None:
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(0)
    pipe = StableDiffusionUpscalePipeline(
        vae=vae(3, 0.08333),
        text_encoder=text_encoder(),
        tokenizer=clip_tokenizer(),
        unet=UNet2DConditionModel(**UPSCALER_UNET),
        low_res_scheduler=DDPMScheduler.from_config(UPSCALER_LOW_RES_SCHEDULER),
        scheduler=DDIMScheduler.from_config(UPSCALER_SCHEDULER),
        max_noise_level=350,
    )
    pipe.save_pretrained(target, safe_serialization=True)
    _write_scheduler(target / "scheduler", UPSCALER_SCHEDULER)
    _write_scheduler(target / "low_res_scheduler", UPSCALER_LOW_RES_SCHEDULER)


def stage_sd2_controlnet(target: Path) -> None:
    from diffusers import (
        ControlNetModel,
        PNDMScheduler,
        StableDiffusionControlNetPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD2_UNET)
    controlnet = ControlNetModel.from_unet(unet)
    # from_unet zeroes the output convolutions; a released ControlNet has trained ones, so give
    # them small random values (as the tiny family does) for a realistic residual path.
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.normal_(0.0, 0.05)
    pipe = StableDiffusionControlNetPipeline(
        vae=vae(4, 0.18215),
        text_encoder=text_encoder(),
        tokenizer=clip_tokenizer(),
        unet=unet,
        controlnet=controlnet,
        scheduler=PNDMScheduler.from_config(SD2_BASE_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(target, safe_serialization=True)
    _write_scheduler(target / "scheduler", SD2_BASE_SCHEDULER)


def stage_clip_rn50(torch_home: Path) -> None:
    """OpenAI CLIP RN50 (TorchScript, as released) where pyiqa's loader caches it."""
    from pyiqa.archs import clip_model

    torch.manual_seed(0)
    rn50 = clip_model.CLIP(1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12).eval()
    target = torch_home / "hub" / "clip" / "RN50.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    image, text = torch.rand(1, 3, 224, 224), torch.zeros(1, 77, dtype=torch.long)
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(rn50, (image, text), check_trace=False), target)


def stage_vgg19(torch_home: Path) -> None:
    from torchvision.models import vgg19

    torch.manual_seed(0)
    target = torch_home / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth"
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(vgg19(weights=None).state_dict(), target)


def _snapshot(hf_home: Path, repo: str) -> Path:
    cache = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    (cache / "refs").mkdir(parents=True, exist_ok=True)
    (cache / "refs" / "main").write_text(HUB_COMMIT)
    snapshot = cache / "snapshots" / HUB_COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def released_imagereward_layout(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """ImageRewardModel weights under the released checkpoint's key names."""
    from rfsr_ray.losses.imagereward import _VISION_RENAMES

    # Invert the loader's renames: BlipVisionModel names → BLIP ViT names.
    inverse = [
        ("embeddings.class_embedding", "cls_token"),
        ("embeddings.position_embedding", "pos_embed"),
        ("embeddings.patch_embedding.", "patch_embed.proj."),
        ("post_layernorm.", "norm."),
        ("layer_norm1.", "norm1."),
        ("layer_norm2.", "norm2."),
        ("self_attn.qkv.", "attn.qkv."),
        ("self_attn.projection.", "attn.proj."),
        ("encoder.layers.", "blocks."),
    ]
    assert len(_VISION_RENAMES) == 9  # kept in step with the loader's table
    state: dict[str, torch.Tensor] = {}
    for key, value in model.vision.state_dict().items():
        for ours, released in inverse:
            key = key.replace(ours, released)
        state[f"blip.visual_encoder.{key}"] = value
    state.update({f"blip.text_encoder.{k}": v for k, v in model.text.state_dict().items()})
    state.update({f"mlp.layers.{k}": v for k, v in model.head.state_dict().items()})
    return state


def bert_vocab() -> list[str]:
    """A 30522-entry stand-in with bert-base-uncased's special-token ids ([PAD] 0, [UNK] 100,
    [CLS] 101, [SEP] 102, [MASK] 103) and lower-case words from the CLIP vocabulary."""
    words = [f"[unused{i}]" for i in range(99)]
    vocab = ["[PAD]", *words, "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    seen = set(vocab)
    import clip

    bpe = Path(clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    for line in gzip.decompress(bpe.read_bytes()).decode("utf-8").split("\n")[1:]:
        word = line.replace(" ", "").removesuffix("</w>")
        if word.isalpha() and word.isascii() and word.islower() and word not in seen:
            vocab.append(word)
            seen.add(word)
        if len(vocab) == 30522:
            break
    return vocab


def stage_imagereward(hf_home: Path) -> None:
    from transformers import BertTokenizer

    from rfsr_ray.losses.imagereward import (
        CHECKPOINT,
        HUB_REPO,
        TOKENIZER_REPO,
        ImageRewardModel,
        text_config,
        vision_config,
    )

    torch.manual_seed(0)
    model = ImageRewardModel(vision_config(), text_config())
    torch.save(released_imagereward_layout(model), _snapshot(hf_home, HUB_REPO) / CHECKPOINT)
    tokenizer_dir = _snapshot(hf_home, TOKENIZER_REPO)
    (tokenizer_dir / "vocab.txt").write_text("\n".join(bert_vocab()) + "\n")
    BertTokenizer(str(tokenizer_dir / "vocab.txt")).save_pretrained(tokenizer_dir)


def stage(directory: Path, only: list[str]) -> None:
    steps = {
        "sd_x4_upscaler": lambda: stage_upscaler(directory / "sd_x4_upscaler"),
        "sd2_base_controlnet": lambda: stage_sd2_controlnet(directory / "sd2_base_controlnet"),
        "clip_rn50": lambda: stage_clip_rn50(directory / "torch"),
        "vgg19": lambda: stage_vgg19(directory / "torch"),
        "imagereward": lambda: stage_imagereward(directory / "huggingface"),
    }
    (directory / "site").mkdir(parents=True, exist_ok=True)
    (directory / "site" / "sitecustomize.py").write_text(CLIP_SHIM)
    for name, build in steps.items():
        if only and name not in only:
            continue
        started = time.perf_counter()
        build()
        print(f"staged {name} in {time.perf_counter() - started:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/rfsr_real"))
    parser.add_argument("--only", nargs="*", default=[], help="stage only these parts")
    args = parser.parse_args()
    stage(args.dir, args.only)
    print(f"\nrun with: HF_HOME={args.dir}/huggingface TORCH_HOME={args.dir}/torch "
          f"HF_HUB_OFFLINE=1 PYTHONPATH={args.dir}/site")  # fmt: skip


if __name__ == "__main__":
    main()
