"""Typed user-facing errors. Each message names the bad value and the fix."""

from __future__ import annotations


class RFSRError(Exception):
    """Base class of every error rfsr_ray raises for bad user input or state."""


class ConfigError(RFSRError):
    """A config file, override or value is invalid."""


class DataError(RFSRError):
    """Input data cannot produce a usable pair set (e.g. every image was skipped)."""


class WeightsError(RFSRError):
    """Model or metric weights are missing or unusable."""


class TrainingError(RFSRError):
    """Training cannot continue (e.g. too many consecutive non-finite steps)."""


class TrackingError(RFSRError):
    """The experiment tracker (MLflow) is unreachable or misconfigured."""
