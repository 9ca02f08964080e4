"""Processes that never train keep model code out of their imports.

Every fit starts a dozen Ray processes: the Train controller, the dataset manager, the split
coordinator, Ray Data's pair tasks, and in a sweep each trial's actor (which runs the driver).
Each one imports what it unpickles. Measured here (2 cores), importing the driver with the models
took 11 s and the pair pipeline with torch 5 s; without them 4 s and 2 s. A module-level import of
diffusers, pyiqa or torch in one of these modules would bring that back on every run, so each is
imported in a fresh interpreter and what it pulled in is checked."""

from __future__ import annotations

import subprocess
import sys

import pytest

MODEL_CODE = ("diffusers", "pyiqa", "torchvision", "transformers", "peft")


# module → what it must not import
ABSENT = {
    # The driver (and every sweep trial): data, validation set, MLflow run, TorchTrainer.
    "rfsr_ray.train.driver": MODEL_CODE,
    # What the Train controller unpickles: the worker function and its hand-over types.
    "rfsr_ray.train.entry": ("torch", *MODEL_CODE),
    "rfsr_ray.train.context": ("torch", *MODEL_CODE),
    # What Ray Data's pair tasks, dataset manager and split coordinator unpickle.
    "rfsr_ray.data.pipeline": ("torch", *MODEL_CODE),
}


@pytest.mark.parametrize("module", list(ABSENT))
def test_modules_of_processes_that_do_not_train_import_no_model_code(module):
    absent = ABSENT[module]
    code = f"import sys, {module}; print(sorted(m for m in {absent!r} if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]", f"{module} imported {result.stdout}"
