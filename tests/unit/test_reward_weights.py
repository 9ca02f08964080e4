"""Learned pyiqa rewards built through the real weight-resolution path, from stand-in weight
files (randomly initialised pyiqa architectures) laid out like the real caches: pyiqa's
`$TORCH_HOME/hub/pyiqa` and torchvision's `$TORCH_HOME/hub/checkpoints`."""

from __future__ import annotations

import time
import urllib.error
from pathlib import Path

import pytest
import torch

from rfsr_ray.config import RewardConfig, build_config
from rfsr_ray.errors import WeightsError
from rfsr_ray.losses.rewards import PyiqaReward, build_reward
from rfsr_ray.weights import WeightNeed, why_missing


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty TORCH_HOME that pyiqa and torchvision both use for this test."""
    from pyiqa.utils import download_util

    home = tmp_path / "torch"
    monkeypatch.setenv("TORCH_HOME", str(home))
    # pyiqa fixes its cache folder at import; point it at this TORCH_HOME as a fresh import would.
    monkeypatch.setattr(download_util, "DEFAULT_CACHE_DIR", str(home / "hub" / "pyiqa"))

    def air_gapped(url, *args, **kwargs):  # the same on machines that do have network
        raise urllib.error.URLError(f"air-gapped test node: {url}")

    monkeypatch.setattr(download_util, "download_url_to_file", air_gapped)
    monkeypatch.setattr(torch.hub, "download_url_to_file", air_gapped)
    return home


def stage_musiq(home: Path) -> None:
    from pyiqa.archs.musiq_arch import MUSIQ

    torch.manual_seed(0)
    target = home / "hub" / "pyiqa" / "musiq_koniq_ckpt-e95806b9.pth"
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(MUSIQ(pretrained=False).state_dict(), target)


def stage_lpips(home: Path) -> None:
    from pyiqa.archs.lpips_arch import LPIPS
    from torchvision.models import alexnet

    torch.manual_seed(0)
    backbone = home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    backbone.parent.mkdir(parents=True, exist_ok=True)
    torch.save(alexnet(weights=None).state_dict(), backbone)  # LPIPS's torchvision trunk
    linear = home / "hub" / "pyiqa" / "LPIPS_v0.1_alex-df73285e.pth"
    linear.parent.mkdir(parents=True, exist_ok=True)
    torch.save(LPIPS(pretrained=False, net="alex").state_dict(), linear)


def gradient(reward, sr, hr=None) -> torch.Tensor:
    sr = sr.clone().requires_grad_(True)
    reward(sr, hr=hr).sum().backward()
    return sr.grad


def test_no_reference_reward_from_staged_weights_has_gradients_and_normalises(torch_home):
    stage_musiq(torch_home)
    term = build_reward(RewardConfig(name="musiq", weight=1.0, form="linear"))
    assert term.reward.info.score_range == "~0, ~100" and not term.reward.info.needs_hr
    sr = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    grad = gradient(term.reward, sr)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    normalised = PyiqaReward("musiq", normalize=True)
    with torch.no_grad():
        assert torch.allclose(normalised(sr), term.reward(sr) / 100.0, atol=1e-5)
    assert normalised.info.score_range == "0, 1"


def test_full_reference_reward_is_negated_when_lower_is_better(torch_home):
    stage_lpips(torch_home)
    reward = PyiqaReward("lpips")
    assert reward.info.needs_hr and reward.info.score_range == "-1, 0"
    generator = torch.Generator().manual_seed(2)
    hr = torch.rand(2, 3, 64, 64, generator=generator)
    noisy = (hr + 0.3 * torch.randn(2, 3, 64, 64, generator=generator)).clamp(0, 1)
    with torch.no_grad():
        assert (reward(hr, hr=hr) > reward(noisy, hr=hr)).all()  # closer to HR: higher reward
        assert reward(hr, hr=hr).abs().max() < 1e-5
    grad = gradient(reward, noisy, hr)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_missing_weight_files_give_a_clear_error_and_are_listed(torch_home):
    with pytest.raises(WeightsError, match="'musiq' could not be built"):
        build_reward(RewardConfig(name="musiq"))
    cfg = build_config()
    need = WeightNeed("pyiqa", "musiq", "losses.reward.terms")
    assert "does not build offline" in why_missing(need, cfg)
    stage_musiq(torch_home)
    assert why_missing(need, cfg) is None


class RandomCropScore(torch.nn.Module):
    """Stand-in for a metric that crops at random (like MANIQA): the score depends on the draw,
    and it refuses images smaller than its crop."""

    lower_better = False
    metric_mode = "NR"
    score_range = "0, 1"

    def __init__(self, crop: int = 32) -> None:
        super().__init__()
        self.crop = crop
        self.sizes: list[tuple[int, int]] = []

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        self.sizes.append(tuple(image.shape[-2:]))
        if min(image.shape[-2:]) < self.crop:
            raise RuntimeError("input smaller than the crop")
        top = int(torch.randint(0, image.shape[-2] - self.crop + 1, ()))
        return image[..., top : top + self.crop, : self.crop].mean(dim=(1, 2, 3))


@pytest.fixture
def random_crop_metric(monkeypatch):
    import pyiqa

    made: list[RandomCropScore] = []

    def create_metric(name, **kwargs):
        made.append(RandomCropScore())
        return made[-1]

    monkeypatch.setattr(pyiqa, "create_metric", create_metric)
    monkeypatch.setattr(pyiqa, "list_models", lambda: ["random_crop"])
    return made


def test_stochastic_metrics_are_seeded_and_small_inputs_resized(random_crop_metric):
    image = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(4))
    first = PyiqaReward("random_crop", min_size=48, seed=7)
    second = PyiqaReward("random_crop", min_size=48, seed=7)
    other = PyiqaReward("random_crop", min_size=48, seed=8)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    draws = [first(image) for _ in range(3)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert all(torch.equal(a, second(image)) for a in draws)  # same seed, same sequence
    assert not all(torch.equal(a, other(image)) for a in draws)
    assert random_crop_metric[0].sizes == [(48, 48)] * 3  # 24 px upsampled to the minimum
    sr = image.clone().requires_grad_(True)
    first(sr).sum().backward()
    assert sr.grad is not None and sr.grad.abs().sum() > 0  # gradient passes the resize
    with pytest.raises(RuntimeError, match="smaller than the crop"):
        PyiqaReward("random_crop")(image)


def stage_clip_rn50(home: Path, monkeypatch) -> Path:
    """A random CLIP RN50 state dict where pyiqa's CLIP loader caches it ($TORCH_HOME/hub/clip).

    That cache is keyed by the SHA-256 of OpenAI's real file, which no stand-in can match, so the
    checksum step (`_download`) is the one part replaced: it hands back the staged file, as it
    does for a verified real one. Everything after it (pyiqa's loader, CLIP-IQA, our reward)
    runs as in production."""
    from pyiqa.archs import clip_model

    torch.manual_seed(0)
    rn50 = clip_model.CLIP(1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12)
    target = home / "hub" / "clip" / "RN50.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    # OpenAI ships TorchScript archives; pyiqa's loader reads the state dict back out of one.
    image, text = torch.rand(1, 3, 224, 224), torch.zeros(1, 77, dtype=torch.long)
    torch.jit.save(torch.jit.trace(rn50.eval(), (image, text), check_trace=False), target)

    def verified(url: str, root: str) -> str:
        assert Path(root) == target.parent, root  # the cache under TORCH_HOME, not elsewhere
        return str(Path(root) / Path(url).name)

    monkeypatch.setattr(clip_model, "_download", verified)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(home / "hub"))
    return target


def test_clip_reward_has_gradients_and_its_outside_tree_model_follows_the_input(
    torch_home, monkeypatch
):
    """CLIP-IQA keeps its CLIP model in a list (outside the module tree, so `.to()` on the
    metric never moves it); it must still run where the images are, in fp32, also when the
    step runs under bf16 autocast."""
    stage_clip_rn50(torch_home, monkeypatch)
    reward = PyiqaReward("clipiqa")
    assert reward.info.score_range == "0, 1" and not reward.info.needs_hr
    clip = reward.metric.net.clip_model[0]
    assert not any(p is q for p in clip.parameters() for q in reward.parameters())
    sr = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    grad = gradient(reward, sr)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        score = reward(sr)
    assert score.dtype == torch.float32 and torch.isfinite(score).all()
    parameter = next(clip.parameters())
    assert parameter.device == sr.device and parameter.dtype == torch.float32
    term = build_reward(RewardConfig(name="clipiqa", weight=1.0, form="hinge", margin=2.0))
    with torch.no_grad():  # hinge relu(2 − score) with score ∈ [0, 1]: the reference's loss
        loss, score = term(sr)
        assert torch.allclose(loss, (2.0 - score).mean(), atol=1e-5)
        assert torch.allclose(score, term.reward(sr), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_clip_reward_built_on_a_gpu_runs_its_clip_model_there(torch_home, monkeypatch):
    stage_clip_rn50(torch_home, monkeypatch)
    reward = PyiqaReward("clipiqa", device="cuda")
    sr = torch.rand(1, 3, 64, 64, device="cuda", requires_grad=True)
    reward(sr).sum().backward()
    assert next(reward.metric.net.clip_model[0].parameters()).is_cuda
    assert torch.isfinite(sr.grad).all()


def test_dists_reward_from_staged_vgg16_and_dists_weights(torch_home):
    """DISTS: torchvision's VGG16 trunk in $TORCH_HOME/hub/checkpoints plus pyiqa's own weights
    in $TORCH_HOME/hub/pyiqa; lower-is-better, so the reward is its negation."""
    from pyiqa.archs.dists_arch import DISTS
    from torchvision.models import vgg16

    torch.manual_seed(0)
    trunk = torch_home / "hub" / "checkpoints" / "vgg16-397923af.pth"
    trunk.parent.mkdir(parents=True, exist_ok=True)
    torch.save(vgg16(weights=None).state_dict(), trunk)
    own = torch_home / "hub" / "pyiqa" / "DISTS_weights-f5e65c96.pth"
    own.parent.mkdir(parents=True, exist_ok=True)
    torch.save(DISTS(pretrained=False).state_dict(), own)
    reward = PyiqaReward("dists")
    assert reward.info.needs_hr and reward.sign == -1.0
    hr = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    grad = gradient(reward, hr.flip(-1), hr)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with torch.no_grad():
        assert reward(hr, hr=hr) > reward(hr.flip(-1), hr=hr)  # identical beats distorted


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face hub cache (what $HF_HOME/hub is on a node) for this test."""
    from huggingface_hub import constants

    cache = tmp_path / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    # huggingface_hub fixes its cache folder at import, like pyiqa; a fresh import would see this.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def stage_topiq_nr(torch_home: Path, hf_cache: Path) -> None:
    """TOPIQ-NR: a timm ResNet-50 backbone in the Hugging Face cache (`timm/resnet50.a1_in1k`,
    laid out as `huggingface-cli download` leaves it) plus pyiqa's own CFANet weights."""
    import safetensors.torch
    import timm
    from pyiqa.archs.topiq_arch import CFANet

    torch.manual_seed(0)
    repo = hf_cache / "models--timm--resnet50.a1_in1k"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    backbone = timm.create_model("resnet50", pretrained=False)
    safetensors.torch.save_file(backbone.state_dict(), snapshot / "model.safetensors")
    net = CFANet(
        model_name="cfanet_nr_koniq_res50", use_ref=False, pretrained=False, backbone_pretrain=False
    )
    own = torch_home / "hub" / "pyiqa" / "cfanet_nr_koniq_res50-9a73138b.pth"
    own.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params": net.state_dict()}, own)


def test_timm_backed_reward_from_the_hugging_face_cache(torch_home, hf_cache, monkeypatch):
    """An air-gapped node as the README sets it up (HF_HUB_OFFLINE=1, staged caches)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cfg = build_config()
    need = WeightNeed("pyiqa", "topiq_nr", "losses.reward.terms")
    assert "does not build offline" in why_missing(need, cfg)
    stage_topiq_nr(torch_home, hf_cache)
    assert why_missing(need, cfg) is None
    reward = PyiqaReward("topiq_nr")
    assert not reward.info.needs_hr and reward.sign == 1.0
    sr = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    grad = gradient(reward, sr)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_unreachable_hub_reports_a_missing_timm_backbone_at_once(torch_home, hf_cache, monkeypatch):
    """Without HF_HUB_OFFLINE, huggingface_hub retries each candidate file with back-off (about
    a minute for TOPIQ-NR); an unreachable hub must instead send the build to the cache alone."""
    from huggingface_hub import constants

    from rfsr_ray import hub

    dead = "http://127.0.0.1:9"  # nothing listens there: refused at once, as a firewall would
    monkeypatch.setenv("HF_ENDPOINT", dead)
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    started = time.monotonic()
    with pytest.raises(WeightsError, match="'topiq_nr' could not be built"):
        PyiqaReward("topiq_nr")
    assert time.monotonic() - started < 30  # generous: a hang, not a speed, is what fails here
    assert constants.HF_HUB_OFFLINE is False  # the switch is undone after the build
    assert hub.hub_reachable() is False
