"""The DAPE tagger as a Ray Data stage (`model.family: seesr`), and the placement plan it needs.

After degradation, an actor pool (`model.seesr.tagging`) runs SeeSR's DAPE tagger on every LR
patch and adds two columns: `caption` (the tags, SeeSR's prompt before the fixed text is
appended) and `image_embeds` ((145, 512) float32 for the released tagger), which the image
cross-attention of the UNet and ControlNet attends to. Each actor loads the tagger once.

Placement: training workers hold their resources for the whole run, and Ray Data cannot start a
tagger actor the cluster has no room for, so a plan where the workers take every GPU and the
actors want one waits forever. `check_placement` packs every demand (training workers, tagger
actors, one degradation task) onto the cluster's nodes, GPU by GPU, and refuses a plan that does
not fit, saying what to change. The recipe's plan (configs/finetune/seesr_rfsr.yaml, 8 GPUs):
each GPU holds one training worker (0.9 GPU) and one tagger actor (0.1 GPU).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.data
import torch
from ray.data import ActorPoolStrategy

from rfsr_ray.config import RFSRConfig
from rfsr_ray.config.schema import SeeSRConfig
from rfsr_ray.errors import ConfigError
from rfsr_ray.images import to_tensor

log = logging.getLogger("rfsr_ray.train")

TAG_COLUMNS = ("caption", "image_embeds")
_SLACK = 1e-6  # 0.9 + 0.1 GPU in floating point


class TaggerStage:
    """`map_batches` callable of one tagger actor: LR patches → tags and image embeddings."""

    def __init__(self, seesr: SeeSRConfig, use_gpu: bool, stats: Any = None) -> None:
        # Imported here: the driver builds the stage without loading diffusers or timm.
        from rfsr_ray.models.seesr.family import load_configured_tagger

        self.device = torch.device("cuda" if use_gpu else "cpu")
        if not use_gpu:  # one thread per reserved CPU, as Ray's tasks run
            torch.set_num_threads(max(1, int(seesr.tagging.cpus_per_actor)))
        self.tagger = load_configured_tagger(seesr, self.device)
        self.stats = stats  # the pipeline's PipelineStats: counts `tagged` pairs

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tagged = self.tagger.tag(to_tensor(batch["lr"], self.device))
        batch["caption"] = np.asarray(tagged.captions, dtype=object)
        batch["image_embeds"] = tagged.image_embeds.float().cpu().numpy()
        if self.stats is not None:
            ray.get(self.stats.add.remote({"tagged": len(tagged.captions)}))
        return batch


def add_tags(dataset: ray.data.Dataset, seesr: SeeSRConfig, stats: Any = None) -> ray.data.Dataset:
    """`dataset` (pairs with an `lr` column) with `caption` and `image_embeds` from DAPE;
    `stats` (a PipelineStats actor) counts the pairs tagged."""
    tagging = seesr.tagging
    return dataset.map_batches(
        TaggerStage,
        batch_size=tagging.batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=tagging.num_actors),
        num_cpus=tagging.cpus_per_actor,
        num_gpus=tagging.gpus_per_actor,
        fn_constructor_kwargs={
            "seesr": seesr,
            "use_gpu": tagging.gpus_per_actor > 0,
            "stats": stats,
        },
        # The tagger's host memory, a real need; it also keeps Ray Data from fusing degradation
        # into the tagger actors (it fuses maps whose resource requests are equal, as a CPU
        # tagger's and data.num_cpus are), so degradation keeps its own parallelism.
        memory=tagging.memory_gib * 2**30,
    )


@dataclass(frozen=True)
class Demand:
    """`count` copies of one resource request that must each fit on a single node."""

    what: str
    count: int
    cpus: float
    gpus: float


def demands(cfg: RFSRConfig) -> list[Demand]:
    """What a fine-tune of `cfg` holds while it trains: the training workers (none in Train's
    local mode, which runs in the driver), the tagger actors of a seesr model, and room for at
    least one degradation task, without which no pair reaches the workers."""
    train = cfg.train
    needs = []
    if train.num_workers > 0:
        gpus = train.gpus_per_worker if train.use_gpu else 0.0
        needs.append(Demand("training worker", train.num_workers, train.cpus_per_worker, gpus))
    if cfg.model.family == "seesr":
        tagging = cfg.model.seesr.tagging
        actors = tagging.num_actors
        needs.append(Demand("tagger actor", actors, tagging.cpus_per_actor, tagging.gpus_per_actor))
    needs.append(Demand("degradation task", 1, cfg.data.num_cpus, 0.0))
    return needs


@dataclass
class _Node:
    cpus: float
    gpus: list[float]  # what is free on each GPU of the node

    def gpu_slots(self, demand: Demand) -> list[int] | None:
        """The GPUs `demand` would take here (None: no room). A fraction lives on one GPU, the
        fullest it fits on; above one, Ray gives whole GPUs."""
        if demand.gpus <= 0:
            return []
        if demand.gpus > 1:
            free = [i for i, g in enumerate(self.gpus) if g >= 1 - _SLACK]
            return free[: int(demand.gpus)] if len(free) >= demand.gpus else None
        fitting = [i for i, g in enumerate(self.gpus) if g >= demand.gpus - _SLACK]
        return [min(fitting, key=lambda i: self.gpus[i])] if fitting else None

    def place(self, demand: Demand) -> bool:
        slots = self.gpu_slots(demand)
        if slots is None or demand.cpus > self.cpus + _SLACK:
            return False
        for i in slots:
            self.gpus[i] -= min(1.0, demand.gpus)
        self.cpus -= demand.cpus
        return True


def check_placement(cfg: RFSRConfig, nodes: Sequence[Mapping[str, float]]) -> None:
    """Refuse (ConfigError) a plan whose demands cannot all be placed at once on `nodes` (each
    node's total resources, e.g. {"CPU": 16, "GPU": 8}): one of its stages would wait forever
    for resources another holds. Training workers are placed first (their placement group
    starts first), then the rest, largest first."""
    free = [_Node(float(n.get("CPU", 0)), [1.0] * int(n.get("GPU", 0))) for n in nodes]
    ordered = sorted(demands(cfg), key=lambda d: (d.what != "training worker", -d.gpus, -d.cpus))
    for demand in ordered:
        for copy in range(demand.count):
            if not any(node.place(demand) for node in free):
                short_of_gpus = all(node.gpu_slots(demand) is None for node in free)
                raise ConfigError(_unplaceable(cfg, demand, copy, nodes, short_of_gpus))


def _unplaceable(
    cfg: RFSRConfig,
    demand: Demand,
    placed: int,
    nodes: Sequence[Mapping[str, float]],
    short_of_gpus: bool,
) -> str:
    cpus = sum(float(n.get("CPU", 0)) for n in nodes)
    gpus = sum(int(n.get("GPU", 0)) for n in nodes)
    plan = ", ".join(
        f"{d.count} {d.what}(s) × ({d.cpus:g} CPU, {d.gpus:g} GPU)" for d in demands(cfg)
    )
    message = (
        f"the cluster ({len(nodes)} node(s), {cpus:g} CPUs, {gpus} GPUs) has no "
        f"{'GPU' if short_of_gpus else 'CPU'} room for {demand.what} {placed + 1} of "
        f"{demand.count} ({demand.cpus:g} CPU, {demand.gpus:g} GPU) once the others are placed; "
        f"the plan is {plan}, and a stage left without resources waits forever. "
    )
    if short_of_gpus and demand.what == "tagger actor" and gpus == 0:
        return message + "The cluster has no GPU: tag on CPU (model.seesr.tagging.gpus_per_actor=0)"
    if short_of_gpus and demand.what == "tagger actor":
        return message + (
            "Share each GPU between a training worker and a tagger actor "
            "(train.gpus_per_worker: 0.9, model.seesr.tagging.gpus_per_actor: 0.1, "
            "model.seesr.tagging.num_actors at most the number of GPUs), or tag on CPU "
            "(model.seesr.tagging.gpus_per_actor: 0)"
        )
    if short_of_gpus:
        return message + "Lower train.num_workers or train.gpus_per_worker, or add GPU nodes"
    return message + (
        "Lower train.cpus_per_worker, model.seesr.tagging.num_actors / cpus_per_actor or "
        "data.num_cpus, or add nodes"
    )


def cluster_nodes() -> list[dict[str, float]]:
    """The total resources of each alive node of the connected Ray cluster."""
    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]
