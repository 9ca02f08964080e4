"""An exported rfsr_ray model as an MLflow pyfunc model whose `predict` super-resolves images.

`mlflow.pyfunc.load_model("models:/<model_id>").predict(lr, params={"num_inference_steps": 8})`
takes uint8 LR images (N, h, w, 3) and returns uint8 SR images (N, h·scale, w·scale, 3). The
exported model folder travels inside the MLflow model as the artifact `export`; loading it needs
`rfsr_ray` installed (`pyfunc_entry.py` builds the model from this module).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch

from rfsr_ray.config import load_config
from rfsr_ray.images import to_tensor, to_uint8
from rfsr_ray.models import ISRDiffusionModel, load_model

EXPORT_ARTIFACT = "export"  # the key of the exported model folder in the pyfunc's artifacts
CONFIG_FILE = "config.yaml"  # the resolved run config saved beside an export
FALLBACK_STEPS = 20  # sampler steps of an export that carries no config.yaml
# LR sides are padded to this multiple (UNet down-sampling); the same rule as
# rfsr_ray.eval.inference.PAD_MULTIPLE, which this layer cannot import.
PAD_MULTIPLE = 16


def default_steps(export_dir: Path) -> int:
    """`schedule.num_inference_steps` of the export's saved config, else `FALLBACK_STEPS`."""
    saved = Path(export_dir) / CONFIG_FILE
    return load_config(saved).schedule.num_inference_steps if saved.is_file() else FALLBACK_STEPS


def super_resolve_batch(
    model: ISRDiffusionModel, lr_images: np.ndarray, num_inference_steps: int, seed: int
) -> np.ndarray:
    """uint8 (N, h, w, 3) → uint8 (N, h·scale, w·scale, 3): reflect-pad to the UNet's multiple,
    sample the whole batch with one seeded generator, crop back."""
    height, width = lr_images.shape[1:3]
    pad_h, pad_w = -height % PAD_MULTIPLE, -width % PAD_MULTIPLE
    mode = "reflect" if pad_h < height and pad_w < width else "edge"
    padded = np.pad(lr_images, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode=mode)
    device = getattr(model, "device", torch.device("cpu"))
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        sr_image = model.sample(to_tensor(padded, device), num_inference_steps, generator)
    return to_uint8(sr_image[..., : height * model.scale, : width * model.scale])


def _checked_images(model_input: Any) -> np.ndarray:
    images = np.asarray(model_input)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[-1] != 3:
        raise ValueError(
            f"predict takes uint8 RGB images (N, h, w, 3) or one (h, w, 3); got {images.dtype} "
            f"{images.shape}. Convert with np.asarray(pil_image.convert('RGB'))"
        )
    return images


class SuperResolutionModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of an exported model (built by `pyfunc_entry.py`, MLflow's models from
    code, so nothing is pickled)."""

    def load_context(self, context: Any) -> None:
        export_dir = Path(context.artifacts[EXPORT_ARTIFACT])
        self.steps = default_steps(export_dir)
        self.model = load_model(export_dir)
        if torch.cuda.is_available():
            self.model.to(torch.device("cuda"))

    # np.ndarray: a type hint MLflow accepts without deriving a schema from it (it warns on a
    # missing hint and on most others); the signature logged with the model is the schema.
    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        """LR uint8 (N, h, w, 3) → SR uint8 (N, h·scale, w·scale, 3); one (h, w, 3) image gives
        one (h·scale, w·scale, 3). params: `num_inference_steps` (default: the export's
        config), `seed` (default 0)."""
        params = params or {}
        images = _checked_images(model_input)
        batch = images[None] if images.ndim == 3 else images
        steps = int(params.get("num_inference_steps") or self.steps)
        sr_images = super_resolve_batch(self.model, batch, steps, int(params.get("seed") or 0))
        return sr_images[0] if images.ndim == 3 else sr_images
