"""What the driver hands every Ray Train worker besides the config: the run's context and the
held-out validation pairs (both picklable).

They live apart from the loop so that the driver, and every sweep trial that runs it, need not
import the loop's modules (models, losses, metrics: about 8 s of CPU per trial process on a
2-core machine) just to build them (tests/unit/test_import_weight.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from rfsr_ray.tracking.mlflow_run import RunHandle


@dataclass(frozen=True)
class ValidationSet:
    """lr: uint8 (N, h, w, 3); hr: uint8 (N, h·s, w·s, 3)."""

    lr: np.ndarray
    hr: np.ndarray

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        from rfsr_ray.images import to_tensor

        return to_tensor(self.lr, device), to_tensor(self.hr, device)


@dataclass(frozen=True)
class LoopContext:
    """What the driver hands every worker besides the config (must stay picklable)."""

    run_dir: str  # absolute; Ray's storage folder of the run: checkpoints, validation grids,
    # the exported model and tables
    run: RunHandle | None = None
    val_set: ValidationSet | None = None
    data_stats: Any = None  # ActorHandle[PipelineStats] of the training pipeline
    start_epoch: int = 0
    board: Any = None  # ActorHandle[ProgressBoard]: rank 0 posts progress for the driver's bar
    # Set on rank 0 when the worker starts (not by the driver): the last step `run` already holds
    # metrics for; metrics at that step or earlier are not logged again.
    logged_through: int = -1
