"""Ray Train's per-worker function, in a module that imports nothing heavy at import time.

Ray Train's TrainController unpickles the function it is given and its `train_loop_config`,
though it never trains. Handing it `loop.train_loop_per_worker` with the config and the
`LoopContext` made the controller import everything the loop imports (diffusers, peft,
transformers, bitsandbytes: about 10 s of CPU on a 2-core machine, on every run and every sweep
trial). So the driver puts the worker's arguments in the object store and passes this function
and the reference: the controller unpickles only the reference, and each worker fetches it.
"""

from __future__ import annotations

from typing import Any

import ray

PAYLOAD = "payload"


def worker_config(arguments: dict[str, Any]) -> dict[str, Any]:
    """`train_loop_config` for `run_worker`: `arguments` (the loop's config: `cfg`, `context`)
    behind one object reference. Call it on the driver, which owns the reference for the run."""
    return {PAYLOAD: ray.put(arguments)}


def run_worker(config: dict[str, Any]) -> None:
    """Every Ray Train worker runs this: fetch the arguments, then the training loop."""
    from rfsr_ray.train.loop import train_loop_per_worker

    train_loop_per_worker(ray.get(config[PAYLOAD]))
