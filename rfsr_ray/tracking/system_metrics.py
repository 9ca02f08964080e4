"""MLflow system metrics (CPU, memory, disk, network; GPU utilisation and memory when
`nvidia-ml-py` finds an NVIDIA GPU) from every training node.

MLflow's `SystemMetricsMonitor` samples only the machine it runs on, so a multi-node run starts
one monitor per node (on the node's local rank 0); each logs `system/<node_id>/<metric>` into the
same run.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from rfsr_ray.config import RFSRConfig
from rfsr_ray.tracking.mlflow_run import RunHandle


def system_metrics_enabled(cfg: RFSRConfig) -> bool:
    """`tracking.system_metrics`: on, off, or auto (= on for GPU runs, `train.use_gpu`); always
    off without tracking."""
    if not cfg.tracking.enabled:
        return False
    match cfg.tracking.system_metrics:
        case "on":
            return True
        case "off":
            return False
    return cfg.train.use_gpu


class SystemMetrics:
    """A running monitor for one node; `finish()` (or leaving the `with` block) stops it and
    flushes what it has sampled. Stops by itself when the run ends."""

    def __init__(self, monitor: Any) -> None:
        self.monitor = monitor

    def finish(self) -> None:
        self.monitor.finish()

    def __enter__(self) -> SystemMetrics:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.finish()


def start_system_metrics(
    handle: RunHandle, node_id: str, sampling_interval: float = 10.0
) -> SystemMetrics:
    """Sample this machine every `sampling_interval` seconds into the run as
    `system/<node_id>/<metric>` (e.g. `system/node_0/cpu_utilization_percentage`), stepping on
    from the run's last system step (a resumed run continues its curves)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        handle.run_id,
        sampling_interval=sampling_interval,
        resume_logging=True,
        node_id=node_id,
        tracking_uri=handle.tracking_uri,
    )
    monitor.start()
    return SystemMetrics(monitor)
