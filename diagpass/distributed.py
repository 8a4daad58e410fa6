"""Several ranks, one program: the pipeline of ``diagpass.compile(..., options={"pipeline": True})``.

Under ``torchrun --nproc-per-node P`` every rank holds the whole model and calls the compiled
module with the same input. The layers are split into ``P`` contiguous stages
(:class:`Stages`), one per rank of the default process group. Each rank runs the diagonal
schedule for its own layers' cells (:class:`~diagpass.program.pipeline.PipelineProgram`); what a
stage reads from an earlier one (the hidden states leaving its last layer) travels by
``torch.distributed`` point-to-point ``isend``/``irecv`` (NCCL on GPUs, gloo on CPUs), the
receive posted early and the send never waited on before the end of the run. The work before
the layers (embeddings, memory tokens, rotary tables) runs on every rank, the work after them
(the final norm, the LM head) on the last one. The values the single-process program hands to its
last module (outputs and final per-layer state) are then broadcast from the rank that owns them,
so every rank returns the same outputs and ends with every layer's final state in its module
attributes, as the single-process program leaves them.

This module holds what the user and the front end see: the stage split and its checks
(:func:`stages_for`, raising :class:`~diagpass.ConfigError`), the per-run statistics
(:class:`PipelineRunStats`), :func:`disable_multicast` (NVLink multicast stays off) and
:func:`single_process_twin` (the same compiled plan on one process, for checks). Logs go to
``logging.getLogger("diagpass.distributed")``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.distributed as dist

from diagpass.errors import ConfigError
from diagpass.program.runtime import RunStats

if TYPE_CHECKING:
    from diagpass.anylength import AnyLengthModel

log = logging.getLogger("diagpass.distributed")

__all__ = ["Stages", "PipelineRunStats", "stages_for", "disable_multicast", "single_process_twin", "MULTICAST_ENV"]

MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
"""Environment that keeps NVLink multicast (NVLS, symmetric-memory multimem) off."""


def disable_multicast() -> None:
    """Keep NVLink multicast off: ``os.environ.setdefault`` of :data:`MULTICAST_ENV`. Call it
    before ``init_process_group`` (the pipeline never uses multimem or symmetric memory)."""
    for key, value in MULTICAST_ENV.items():
        os.environ.setdefault(key, value)


@dataclass(frozen=True)
class Stages:
    """Contiguous layer ranges, one per rank: rank ``r`` owns layers ``bounds[r][0] ..
    bounds[r][1] - 1``. The first ``L % P`` ranks get one layer more than the others."""

    bounds: tuple[tuple[int, int], ...]
    """Per rank, ``(first layer, end)``."""
    rank: int
    """This process's rank."""
    backend: str = ""
    """The process group's backend (``gloo``, ``nccl``)."""

    @classmethod
    def split(cls, num_layers: int, world: int, rank: int, backend: str = "") -> Stages:
        """``num_layers`` layers over ``world`` ranks (``ConfigError`` when there are more ranks)."""
        if world > num_layers:
            raise ConfigError(
                f"diagpass pipeline: {world} ranks but the model has {num_layers} layers: every stage needs at least "
                f"one layer (run with --nproc-per-node {num_layers} or fewer)"
            )
        base, extra = divmod(num_layers, world)
        bounds, start = [], 0
        for r in range(world):
            end = start + base + (1 if r < extra else 0)
            bounds.append((start, end))
            start = end
        return cls(bounds=tuple(bounds), rank=rank, backend=backend)

    @property
    def world(self) -> int:
        return len(self.bounds)

    @property
    def num_layers(self) -> int:
        return self.bounds[-1][1]

    def layers(self, rank: int | None = None) -> range:
        """The layers of ``rank`` (this rank's by default)."""
        first, end = self.bounds[self.rank if rank is None else rank]
        return range(first, end)

    def of_layer(self, layer: int) -> int:
        """The rank that owns ``layer``."""
        return next(r for r, (first, end) in enumerate(self.bounds) if first <= layer < end)

    def of_phase(self, phase: int) -> int | None:
        """The rank that runs a unit's ``phase`` (``2l + 1``: the cell of layer ``l``; ``2k``: the
        nodes between layers ``k - 1`` and ``k``), or ``None`` for every rank (phase 0, the work
        before the layers). The work after the last layer (phase ``2L``) runs on the last rank."""
        if phase == 0:
            return None
        if phase >= 2 * self.num_layers:
            return self.world - 1
        return self.of_layer(phase // 2)

    def runs(self, phase: int) -> bool:
        """Whether this rank runs ``phase``."""
        owner = self.of_phase(phase)
        return owner is None or owner == self.rank

    def describe(self) -> str:
        """``2 stages: rank 0 layers 0-1, rank 1 layers 2-3``."""
        parts = [f"rank {r} layers {a}-{b - 1}" if b - a > 1 else f"rank {r} layer {a}" for r, (a, b) in enumerate(self.bounds)]
        return f"{self.world} stages: " + ", ".join(parts)

    def __str__(self) -> str:
        return f"pipelined over {self.describe()} (this is rank {self.rank}, {self.backend or 'no backend'})"


def stages_for(num_layers: int) -> Stages:
    """The stages of a model of ``num_layers`` layers over the default process group.

    Raises :class:`~diagpass.ConfigError` when torch.distributed is unavailable, the default
    process group is not initialised, or there are more ranks than layers.
    """
    check_process_group()
    world, rank = dist.get_world_size(), dist.get_rank()
    stages = Stages.split(num_layers, world, rank, backend=str(dist.get_backend()))
    log.info("diagpass pipeline: %s", stages)
    return stages


def check_process_group() -> None:
    """``ConfigError`` unless the default ``torch.distributed`` process group is initialised."""
    if not dist.is_available():
        raise ConfigError("diagpass option 'pipeline': this build of torch has no torch.distributed")
    if not dist.is_initialized():
        raise ConfigError(
            "diagpass option 'pipeline': the default torch.distributed process group is not initialised. Start the "
            "ranks with `torchrun --nproc-per-node P script.py` and call torch.distributed.init_process_group() "
            "(backend 'nccl' on GPUs, 'gloo' on CPUs) before diagpass.compile"
        )


@dataclass(kw_only=True)
class PipelineRunStats(RunStats):
    """One pipelined run, as this rank saw it (``fast.report.runs[-1].stats``)."""

    stages: str = ""
    """The split, e.g. ``2 stages: rank 0 layers 0-1, rank 1 layers 2-3``."""
    rank: int = 0
    layers: tuple[int, ...] = ()
    """The layers this rank ran."""
    cells: int = 0
    """Cells this rank ran."""
    sent: int = 0
    received: int = 0
    """Point-to-point transfers (boundary values) sent and received."""
    sent_bytes: int = 0
    received_bytes: int = 0
    broadcast_bytes: int = 0
    """Bytes of the final values broadcast (outputs and final state), sent or received."""
    metadata_exchanged: bool = False
    """This run exchanged the shapes of what travels (the first run at a length does)."""
    total_s: float = 0.0
    """Timed runs only (``program.timing = True``): the whole run on this rank."""
    compute_s: float = 0.0
    """Timed runs: chunks and batched steps, less the time they stalled on a receive."""
    recv_wait_s: float = 0.0
    """Timed runs: stalled on a boundary value not yet received."""
    broadcast_s: float = 0.0
    """Timed runs: the final broadcast of outputs and state."""

    @property
    def idle_s(self) -> float:
        """Timed runs: neither computing nor waiting on communication (host launch gaps)."""
        return max(0.0, self.total_s - self.compute_s - self.recv_wait_s - self.broadcast_s)

    def timing_line(self) -> str:
        """``rank 0 (layers 0-7): total 12.1 ms = compute 10.0 + communication 1.2 + idle 0.9``."""
        comm = self.recv_wait_s + self.broadcast_s
        layers = f"{self.layers[0]}-{self.layers[-1]}" if self.layers else "-"
        return (
            f"rank {self.rank} (layers {layers}): total {self.total_s * 1e3:.2f} ms = compute {self.compute_s * 1e3:.2f}"
            f" + communication {comm * 1e3:.2f} (recv wait {self.recv_wait_s * 1e3:.2f}, final broadcast "
            f"{self.broadcast_s * 1e3:.2f}) + idle {self.idle_s * 1e3:.2f}"
        )


def single_process_twin(fast: AnyLengthModel) -> AnyLengthModel:
    """The same compiled plan as ``fast`` (a pipelined :class:`~diagpass.AnyLengthModel`), run by
    the single-process :class:`~diagpass.DiagonalProgram` on this rank alone, with its own report.
    Traces and proves nothing again: it is what ``diagpass.compile`` without ``pipeline`` runs."""
    from diagpass.program.runtime import DiagonalProgram

    program = fast.program
    config = dataclasses.replace(program.config, pipeline=False)
    twin = copy.copy(fast)
    twin.__dict__ = dict(fast.__dict__)  # nn.Module keeps its state in __dict__: copy it, share the model
    twin.program = DiagonalProgram(program.plan, config=config, compiler=program.compiler, name="single-process twin")
    twin.diagbatch_config = config
    twin.report = dataclasses.replace(fast.report, runs=[], generations=[], pipeline=None)
    return twin

