"""Released architectures (random weights) through the real RFSR step and the real loop, on CPU.

Stage the weights first (benchmarks/real_stage.py), then:

    # in-process: one reference step after another, with a per-component memory table, the
    # wall time of each step part and peak RSS (a guard stops the process above --rss-limit)
    .venv/bin/python benchmarks/real_run.py memory --family sd_upscaler
    .venv/bin/python benchmarks/real_run.py memory --family controlnet_sr train.optimizer=adamw_8bit

    # the real entry point (pipelines/finetune.py on Ray): train, checkpoint, resume, export,
    # and reload the export in the plain diffusers pipeline; wall time and peak RSS per phase
    .venv/bin/python benchmarks/real_run.py run --family sd_upscaler model.finetune=lora \
        model.lora.enabled=true

Both take the family's reference config (configs/finetune/<family>_rfsr.yaml) and override only
sizes, local paths and the CPU placement (`SIZE_OVERRIDES`); extra `key=value` arguments follow.
Takes minutes to tens of minutes on 2 CPU cores; never part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import subprocess
import sys
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # latent_step's architecture configs
FOLDERS = {"sd_upscaler": "sd_x4_upscaler", "controlnet_sr": "sd2_base_controlnet"}
GIB = 2**30
REWARD_MODELS = ("CLIP-IQA (CLIP RN50)", "ImageReward (BLIP ViT-L + BERT)", "VGG19 to conv5_4")


def size_overrides(family: str, staged: Path, runs: Path, hr: int, steps: int) -> list[str]:
    """Only sizes, local paths and the CPU placement differ from the reference config."""
    return [
        f"model.pretrained={staged / FOLDERS[family]}",
        "data.sources=[builtin]",
        "data.val_source=builtin",
        "data.val_pairs=null",
        "data.val_size=1",
        f"data.patch_size={hr}",
        "data.batch_size=1",
        "data.crops_per_image=1",
        "data.num_cpus=1",
        f"train.steps={steps}",
        "train.checkpoint_every=2",
        "train.validate_every=1000",
        "train.log_every=1",
        "train.num_workers=1",
        "train.use_gpu=false",
        "train.cpus_per_worker=1",
        "train.mixed_precision='no'",  # quoted: YAML reads a bare no as false
        f"tracking.uri=sqlite:///{runs / 'mlflow.db'}",
        f"output.storage_path={runs}",
    ]


def staged_env(staged: Path) -> dict[str, str]:
    """The staged caches (and the CLIP stand-in shim) for this process and its children."""
    return {
        "HF_HOME": str(staged / "huggingface"),
        "TORCH_HOME": str(staged / "torch"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(
            [str(staged / "site"), str(REPO), os.environ.get("PYTHONPATH", "")]
        ),
    }


# ---------------------------------------------------------------------------------- memory
def rss() -> int:
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class RSSGuard:
    """Stops the process (exit 3) with the phase reached when RSS passes `limit` bytes: the
    machine is shared, and the kernel's OOM killer might pick someone else's process."""

    def __init__(self, limit: int) -> None:
        self.limit, self.phase, self.peak = limit, "start", 0
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while True:
            now = rss()
            self.peak = max(self.peak, now)
            if now > self.limit:
                print(f"\nRSS {now / GIB:.2f} GiB > limit {self.limit / GIB:.1f} GiB during "
                      f"'{self.phase}': stopped", flush=True)  # fmt: skip
                os._exit(3)
            time.sleep(0.05)


def tensor_bytes(tensors: Iterator[object], seen: set[int]) -> int:
    """Bytes of the distinct storages among `tensors` not yet in `seen`."""
    import torch

    total = 0
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor):
            continue
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def module_tensors(module: object) -> Iterator[object]:
    yield from module.parameters()
    yield from module.buffers()


def reward_modules(losses: object) -> dict[str, list[object]]:
    """Each loss module, including models kept outside the module tree (pyiqa's CLIP)."""
    found: dict[str, list[object]] = {}
    for term in losses.rewards:
        modules = [term]
        net = getattr(getattr(term.reward, "metric", None), "net", None)
        modules += list(getattr(net, "clip_model", []) or [])
        found[f"reward {term.cfg.name}"] = modules
    if losses.gram is not None:
        found["gram VGG19"] = [losses.gram]
    if losses.structure is not None:
        found["structure"] = [losses.structure]
    return found


def memory_table(state: object) -> list[tuple[str, int]]:
    """(what, bytes) of every tensor the training state holds, each storage counted once.

    Order matters for shared storages: trained weights first, so a component's row holds only
    what is not already counted above it."""
    model, seen = state.model, set()
    rows = []
    trained = model.trainable_parameters()
    rows.append(("trained parameters", tensor_bytes(iter(trained), seen)))
    rows.append(("gradients", tensor_bytes((p.grad for p in trained), seen)))
    frozen_grads = [p.grad for p in model.parameters() if not p.requires_grad]
    rows.append(("gradients of frozen parameters", tensor_bytes(iter(frozen_grads), seen)))
    optimizer_state = (v for s in state.optimizer.state.values() for v in s.values())
    rows.append((f"optimiser state ({type(state.optimizer).__name__})",
                 tensor_bytes(optimizer_state, seen)))  # fmt: skip
    rows.append(("EMA shadow", tensor_bytes(iter(state.ema.shadow_params), seen)))
    stored = getattr(state.ema, "temp_stored_params", None) or []
    rows.append(("EMA stored copy (validation/export)", tensor_bytes(iter(stored), seen)))
    rows.append(("Gram reference copy", tensor_bytes(module_tensors(model.reference), seen)))
    for name, module in model.components().items():
        rows.append((f"{name} (frozen part)", tensor_bytes(module_tensors(module), seen)))
    cache = getattr(model, "_prompt_cache", {})
    rows.append(("prompt-embedding cache", tensor_bytes(iter(cache.values()), seen)))
    if state.losses is not None:
        for name, modules in reward_modules(state.losses).items():
            rows.append((name, sum(tensor_bytes(module_tensors(m), seen) for m in modules)))
    return rows


# ---------------------------------------------------------------------------------- bytes
def component_parameters() -> dict[str, int]:
    """Parameter counts of the released architectures, built on the meta device (no memory)."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel
    from latent_step import SD2_UNET, UPSCALER_UNET, text_encoder, vae
    from pyiqa.archs.clip_model import CLIP
    from torchvision.models import vgg19

    from rfsr_ray.losses.imagereward import ImageRewardModel, text_config, vision_config
    from rfsr_ray.models.latent import attention_parameters

    def count(parameters: object) -> int:
        return sum(p.numel() for p in parameters)

    with torch.device("meta"):
        upscaler, sd2 = UNet2DConditionModel(**UPSCALER_UNET), UNet2DConditionModel(**SD2_UNET)
        counts = {
            "upscaler UNet": count(upscaler.parameters()),
            "upscaler UNet attention": count(attention_parameters(upscaler)),
            "upscaler VAE": count(vae(3, 0.08333).parameters()),
            "SD 2 UNet": count(sd2.parameters()),
            "SD 2 UNet attention": count(attention_parameters(sd2)),
            "ControlNet": count(ControlNetModel.from_unet(sd2).parameters()),
            "SD 2 VAE": count(vae(4, 0.18215).parameters()),
            "text encoder (OpenCLIP ViT-H text)": count(text_encoder().parameters()),
            "CLIP-IQA (CLIP RN50)": count(
                CLIP(1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12).parameters()
            ),
            "ImageReward (BLIP ViT-L + BERT)": count(
                ImageRewardModel(vision_config(), text_config()).parameters()
            ),
            # the Gram regulariser keeps VGG19's trunk up to conv5_4 only
            "VGG19 to conv5_4": count(vgg19(weights=None).features[:35].parameters()),
        }
    return counts


def accounted_bytes(family: str, counts: dict[str, int], options: dict[str, object]) -> list:
    """(row, bytes) of the inherent training state of a recipe, fp32 master weights."""
    if family == "sd_upscaler":
        trained_modules = {"upscaler UNet": counts["upscaler UNet"]}
        trained = counts["upscaler UNet"]
        frozen = {"upscaler VAE": counts["upscaler VAE"]}
    else:  # the reference: the whole ControlNet plus the UNet's attention blocks
        trained_modules = {"SD 2 UNet": counts["SD 2 UNet"], "ControlNet": counts["ControlNet"]}
        trained = counts["ControlNet"] + counts["SD 2 UNet attention"]
        frozen = {
            "SD 2 UNet (frozen part)": counts["SD 2 UNet"] - counts["SD 2 UNet attention"],
            "SD 2 VAE": counts["SD 2 VAE"],
        }
    optimizer_bytes = 2 * trained if options["optimizer"] != "adamw" else 8 * trained
    reference = 4 * (sum(trained_modules.values()) if options["whole_copy"] else trained)
    rows = [
        ("trained parameters", 4 * trained),
        ("gradients", 4 * trained),
        ("AdamW state", optimizer_bytes),
        ("EMA shadow", 4 * trained),
        (
            "Gram reference "
            + ("(whole modules)" if options["whole_copy"] else "(trained tensors)"),
            reference,
        ),
        *((name, 4 * value) for name, value in frozen.items()),
        (
            "text encoder",
            0 if options["free_text_encoder"] else 4 * counts["text encoder (OpenCLIP ViT-H text)"],
        ),
        *((name, 4 * counts[name]) for name in REWARD_MODELS),
    ]
    return rows


def run_account(args: argparse.Namespace) -> None:
    counts = component_parameters()
    print("| component | parameters (M) | fp32 GiB |\n|---|---:|---:|")
    for name, value in counts.items():
        print(f"| {name} | {value / 1e6:.1f} | {4 * value / GIB:.2f} |")
    settings = [
        ("before (whole-module Gram copy)", dict(whole_copy=True)),
        ("after: trained-tensor Gram copy", dict()),
        ("+ free_text_encoder", dict(free_text_encoder=True)),
        ("+ adamw_8bit", dict(free_text_encoder=True, optimizer="adamw_8bit")),
        (
            "+ ema_on_cpu (accelerator)",
            dict(free_text_encoder=True, optimizer="adamw_8bit", ema_on_cpu=True),
        ),
    ]
    base = dict(whole_copy=False, free_text_encoder=False, optimizer="adamw", ema_on_cpu=False)
    for family in FOLDERS:
        print(f"\n{family}: inherent bytes (GiB) of the reference trainable set\n")
        tables = [accounted_bytes(family, counts, base | option) for _, option in settings]
        print("| row | " + " | ".join(name for name, _ in settings) + " |")
        print("|---|" + "---:|" * len(settings))
        for index, _ in enumerate(tables[0]):
            cells = " | ".join(f"{table[index][1] / GIB:.2f}" for table in tables)
            print(f"| {tables[-1][index][0]} | {cells} |")
        totals = []
        for table, (_, option) in zip(tables, settings, strict=True):
            on_cpu = (base | option)["ema_on_cpu"]
            totals.append(sum(v for r, v in table if not (on_cpu and r == "EMA shadow")))
        print("| **total on the training device** | "
              + " | ".join(f"**{t / GIB:.2f}**" for t in totals) + " |")  # fmt: skip


# ---------------------------------------------------------------------------------- timing
class PartTimer:
    """Wall time per step part, collected by wrapping the functions that do each part."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started

    def wrap(self, owner: object, attribute: str, name: Callable[..., str] | str) -> None:
        original = getattr(owner, attribute)

        def timed(*args: object, **kwargs: object) -> object:
            label = name(*args, **kwargs) if callable(name) else name
            with self.part(label):
                return original(*args, **kwargs)

        setattr(owner, attribute, timed)

    def take(self) -> dict[str, float]:
        taken = dict(self.seconds)
        self.seconds.clear()
        return taken


def instrument(state: object, timer: PartTimer) -> None:
    """Time rollout, gradient / reference forward, decode, each loss term, backward, clipping,
    optimiser and EMA of the real `optimizer_step`."""
    import torch

    import rfsr_ray.train.step as step

    model = state.model
    timer.wrap(step, "latent_at_index", "rollout (no grad)")
    timer.wrap(model, "condition", "condition (prompts, LR)")

    def forward_name(*args: object, reference: bool = False, **kwargs: object) -> str:
        return "reference forward (no grad)" if reference else "gradient forward"

    timer.wrap(model, "predict_x0", forward_name)
    timer.wrap(model, "decode", lambda *a, **k: "decode" if torch.is_grad_enabled() else
               "reference decode (no grad)")  # fmt: skip
    if state.losses is not None:
        for term in state.losses.rewards:
            timer.wrap(term, "forward", f"reward {term.cfg.name}")
        if state.losses.gram is not None:
            timer.wrap(state.losses.gram, "forward", "gram")
        if state.losses.structure is not None:
            timer.wrap(state.losses.structure, "forward", "structure")
    timer.wrap(torch.Tensor, "backward", "backward")
    timer.wrap(torch.nn.utils, "clip_grad_norm_", "clip")
    timer.wrap(state.optimizer, "step", "optimiser")
    timer.wrap(state.ema, "step", "EMA")


def run_memory(args: argparse.Namespace) -> None:
    guard = RSSGuard(int(args.rss_limit * GIB))
    os.environ.update(staged_env(args.dir))
    sys.path.insert(0, str(args.dir / "site"))
    import sitecustomize  # noqa: F401  (the CLIP stand-in shim, as PYTHONPATH gives children)
    import torch

    from rfsr_ray.config import load_config
    from rfsr_ray.models import build_model
    from rfsr_ray.train.step import Batch, build_state, optimizer_step

    torch.set_num_threads(args.threads)
    # The timing wrappers replace optimizer.step, which the LR scheduler notices and warns about.
    warnings.filterwarnings("ignore", message="Seems like `optimizer.step()` has been overridden")
    config = REPO / "configs" / "finetune" / f"{args.family}_rfsr.yaml"
    overrides = size_overrides(args.family, args.dir, args.dir / "runs", args.hr, args.steps)
    cfg = load_config(config, [*overrides, *args.overrides])
    print(f"{args.family}: {' '.join(args.overrides) or 'reference config'}", flush=True)
    phase("imports", guard)
    started = time.perf_counter()
    model = build_model(cfg.model, cfg.data.scale).train()
    phase(f"model built ({time.perf_counter() - started:.0f} s)", guard)
    state = build_state(cfg, model, torch.device("cpu"))
    phase("losses, optimiser, EMA built", guard)
    if args.index is not None:  # e.g. 45: rewards and Gram active (their windows are 40-49)
        state.losses.windows.sample = lambda rng: args.index
    timer = PartTimer()
    instrument(state, timer)
    generator = torch.Generator().manual_seed(0)
    hr = torch.rand(1, 3, args.hr, args.hr, generator=generator)
    batch = Batch(torch.nn.functional.interpolate(hr, scale_factor=0.25, mode="area"), hr)
    for number in range(1, args.steps + 1):
        started = time.perf_counter()
        result = optimizer_step(state, [batch] * cfg.train.grad_accum, cfg)
        seconds = time.perf_counter() - started
        phase(f"after step {number} (indices {result.indices}, {seconds:.0f} s)", guard)
        print_parts(timer.take(), seconds)
        if number == 1:
            report_memory(cfg, state)
    print(f"\npeak RSS (ru_maxrss) {peak_rss() / GIB:.2f} GiB", flush=True)


def phase(name: str, guard: RSSGuard) -> None:
    guard.phase = f"after {name}"
    print(f"| {name} | RSS {rss() / GIB:.2f} GiB | peak {peak_rss() / GIB:.2f} GiB |", flush=True)


def print_parts(parts: dict[str, float], seconds: float) -> None:
    listed = ", ".join(f"{name} {value:.2f}" for name, value in sorted(parts.items()))
    print(f"    parts (s): {listed}; whole step {seconds:.2f}", flush=True)


def report_memory(cfg, state) -> None:
    print(f"\n{cfg.model.family}, model.finetune={cfg.model.finetune_mode}, "
          f"train.optimizer={cfg.train.optimizer}, ema_on_cpu={cfg.train.ema_on_cpu}, "
          f"free_text_encoder={cfg.model.memory.free_text_encoder}, "
          f"{cfg.data.patch_size}² HR, {cfg.schedule.num_inference_steps} sampler steps, "
          f"grad_accum {cfg.train.grad_accum}, fp32\n")  # fmt: skip
    rows = memory_table(state)
    print("| held by the training state after step 1 | GiB |\n|---|---:|")
    for name, value in rows:
        if value:
            print(f"| {name} | {value / GIB:.3f} |")
    accounted = sum(value for _, value in rows)
    print(f"| **sum of tensors** | **{accounted / GIB:.2f}** |")
    print(f"| RSS now − tensors (allocator, libraries, cached activations) | "
          f"{(rss() - accounted) / GIB:.2f} |")  # fmt: skip
    print(f"| peak RSS − tensors (step transients) | {(peak_rss() - accounted) / GIB:.2f} |\n",
          flush=True)  # fmt: skip


# ---------------------------------------------------------------------------------- real loop
def watch(command: list[str], env: dict[str, str], log: Path) -> tuple[int, float, int, int]:
    """Run `command`; (exit code, seconds, peak RSS of the largest process, peak RSS summed
    over the process tree: driver, Ray's daemons and the training worker)."""
    started = time.perf_counter()
    with log.open("w") as handle:
        process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
        root = psutil.Process(process.pid)
        largest = total = 0
        while process.poll() is None:
            sizes = []
            with contextlib.suppress(psutil.Error):
                for member in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        sizes.append(member.memory_info().rss)
            if sizes:
                largest, total = max(largest, max(sizes)), max(total, sum(sizes))
            time.sleep(0.5)
    return process.returncode, time.perf_counter() - started, largest, total


def check_export(family: str, model_dir: Path) -> str:
    """Reload the export in the plain diffusers pipeline and upscale a 16² LR image."""
    import numpy as np
    import torch
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    lr = Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8))
    if family == "sd_upscaler":
        from diffusers import StableDiffusionUpscalePipeline

        pipe = StableDiffusionUpscalePipeline.from_pretrained(model_dir)
        out = pipe(prompt="", image=lr, num_inference_steps=2, generator=generator,
                   output_type="np").images  # fmt: skip
    else:
        from diffusers import StableDiffusionControlNetPipeline

        pipe = StableDiffusionControlNetPipeline.from_pretrained(model_dir)
        control = lr.resize((64, 64), Image.BICUBIC)
        out = pipe(prompt="clean", image=control, height=64, width=64, num_inference_steps=2,
                   generator=generator, output_type="np").images  # fmt: skip
    finite = bool(np.isfinite(out).all())
    return (f"{type(pipe).__name__}.from_pretrained({model_dir}) → image {out.shape}, "
            f"finite={finite}, range [{out.min():.3f}, {out.max():.3f}]")  # fmt: skip


def run_loop(args: argparse.Namespace) -> None:
    runs = args.dir / "runs"
    env = {**os.environ, **staged_env(args.dir)}
    config = REPO / "configs" / "finetune" / f"{args.family}_rfsr.yaml"
    name = f"output.run_name={args.run_name or f'real_{args.family}'}"
    print("| phase | exit | wall s | peak RSS GiB, largest process | peak RSS GiB, process tree |")
    print("|---|---|---:|---:|---:|")
    results = {}
    for phase, steps in (("train + checkpoint", args.steps), ("resume", args.steps * 2)):
        overrides = size_overrides(args.family, args.dir, runs, args.hr, steps)
        command = [sys.executable, str(REPO / "pipelines" / "finetune.py"), "--config",
                   str(config), *overrides, *args.overrides, name]  # fmt: skip
        log = runs / f"{args.family}_{phase.split()[0]}.log"
        runs.mkdir(parents=True, exist_ok=True)
        code, seconds, largest, total = watch(command, env, log)
        results[phase] = code
        print(f"| {phase} ({steps} steps) | {code} | {seconds:.0f} | {largest / GIB:.2f} | "
              f"{total / GIB:.2f} |", flush=True)  # fmt: skip
        if code != 0:
            print(f"\nfailed; the log: {log}")
            return
    started = time.perf_counter()
    run_dir = runs / (args.run_name or f"real_{args.family}")
    message = check_export(args.family, run_dir / "model")
    print(f"| reload export in diffusers | 0 | {time.perf_counter() - started:.0f} | "
          f"{peak_rss() / GIB:.2f} | |\n\n{message}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["account", "memory", "run"])
    parser.add_argument("--family", choices=list(FOLDERS), required=True)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/rfsr_real"), help="staged folder")
    parser.add_argument("--hr", type=int, default=64, help="HR crop side; LR is a quarter")
    parser.add_argument("--steps", type=int, default=2, help="optimiser steps (run: then 2x)")
    parser.add_argument("--index", type=int, help="sampler index of every step (memory)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (memory)")
    parser.add_argument("--rss-limit", type=float, default=18.0, help="GiB (memory mode)")
    parser.add_argument("--run-name", help="output.run_name (run mode)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_intermixed_args()
    {"account": run_account, "memory": run_memory, "run": run_loop}[args.mode](args)


if __name__ == "__main__":
    main()
