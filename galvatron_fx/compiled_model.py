"""CompiledModel: one rank's share of a compiled model — train, evaluate, read data, inspect, save, export.

``galvatron_fx.compile`` builds it; every method that communicates is called on every rank together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from galvatron_fx.data.sampler import GlobalOrder, StepBlocks
from galvatron_fx.runtime import checkpoint
from galvatron_fx.runtime.export import export_pretrained

from .cluster import Cluster
from .plan import Plan
from .program import Program
from .report import plan_table, why_this_plan


class CompiledModel:
    """One rank's share of the compiled model: train, evaluate, read data, inspect, save.

    ``train_step`` and ``eval_step`` take either the *global* batch (the same on every rank) or this rank's
    *local share* of it (``local_batch`` samples, the block at ``trainer.data_index``), which is what
    ``data_loader`` yields; any other size is refused before any collective. Keyword arguments the model was
    captured with that are not tensors (``use_cache=False``, say) may be left out of a batch."""

    def __init__(
        self,
        program: Program,
        plan: Plan,
        trainer,
        cost_model,
        cluster: Cluster,
        constants: dict,
        space=None,
        model_config=None,
    ):
        self.program, self.plan, self.trainer, self.cost_model = program, plan, trainer, cost_model
        self.cluster, self.constants = cluster, constants
        self.search_space = space  # where the plan was searched (rank 0 of a searched plan), for explain
        self.model_config = model_config  # the model's Hugging Face config, if it has one

    @property
    def local_batch(self) -> int:
        """Samples of this rank's share of each global batch."""
        return self.trainer.local_batch

    def _kwargs(self, batch) -> dict[str, Any]:
        if isinstance(batch, dict):
            return {**self.constants, **batch}
        names = self.program.placeholder_names
        return dict(zip(names, batch if isinstance(batch, (tuple, list)) else (batch,)))

    def train_step(self, batch) -> torch.Tensor:
        """One optimizer step on ``batch`` (a dict of kwargs or a tuple of args: the global batch, or this
        rank's share); returns the global batch's mean loss on every rank, a 0-dim tensor on the device
        (reading it waits for the step: see ``runtime.Trainer.step``)."""
        return self.trainer.step(self._kwargs(batch))

    def eval_step(self, batch) -> float:
        """The mean loss of ``batch`` (global, or this rank's share) with dropout off, updating nothing; on
        every rank."""
        return self.trainer.evaluate(self._kwargs(batch))

    def data_loader(
        self,
        dataset: "torch.utils.data.Dataset",
        *,
        seed: int = 0,
        shuffle: bool = True,
        start_step: int | None = None,
        stop_step: int | None = None,
        num_workers: int = 0,
        collate_fn: Callable | None = None,
    ) -> "torch.utils.data.DataLoader":
        """A ``DataLoader`` over a map-style ``dataset`` (one sample per index: a dict of tensors) that yields
        this rank's share of each global batch, from ``start_step`` (default: the trainer's step, so that it
        resumes where a loaded checkpoint left off) to ``stop_step`` (default: without end). The global order
        is a single process's (``galvatron_fx.data.sampler``), the same on every rank for a ``seed``."""
        order = GlobalOrder(len(dataset), self.plan.global_batch, seed, shuffle)
        start = self.trainer.steps_done if start_step is None else start_step
        blocks = StepBlocks(order, self.trainer.data_index, self.plan.devices_per_stage, start, stop_step)
        return torch.utils.data.DataLoader(
            dataset,
            batch_sampler=blocks,
            num_workers=num_workers,
            collate_fn=collate_fn,
            pin_memory=self.trainer.device.type == "cuda",
        )

    def save_checkpoint(self, directory: str | Path) -> Path:
        """Write parameters (under the model's own names), optimizer states, step and RNG state into
        ``directory``, sharded and atomically (``runtime.checkpoint``); on every rank."""
        return checkpoint.save(self.trainer, directory)

    def load_checkpoint(self, directory: str | Path) -> dict[str, Any]:
        """Continue from a checkpoint saved under any plan or world size; returns its manifest (``step``...).
        A half-written, corrupt or foreign checkpoint raises CheckpointError on every rank, before any
        collective. On every rank."""
        return checkpoint.load(self.trainer, directory)

    def export_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write the trained weights as a Hugging Face ``save_pretrained`` folder (safetensors under the model's
        own names, with its ``config.json`` when the model has one), which ``from_pretrained`` loads, from any
        plan (``runtime.export``); on every rank."""
        return export_pretrained(self.trainer, directory, config=self.model_config, dtype=dtype)

    def save_plan(self, path: str | Path) -> None:
        """Write the plan as JSON (Galvatron's keys plus ours)."""
        self.plan.save(path)

    def explain(self, why: bool = False) -> str:
        """The plan as a table, with the cost model's prediction; ``why``: also how it compares with the best
        uniform plan of its search space and with plain data parallelism under the memory budget."""
        table = plan_table(self.plan, self.cost_model)
        if not why:
            return table
        budget = self.plan.provenance.get("memory_budget_bytes") or self.cluster.default_budget_bytes
        return table + "\n" + why_this_plan(self.plan, self.cost_model, budget, self.search_space)

    def visualize(self, path: str | Path, formats: tuple[str, ...] = ("html", "onnx", "dot")) -> dict[str, Path]:
        """Write the annotated layer graph under this plan (HTML page, ONNX, DOT) into folder ``path``;
        returns the file of each format."""
        from galvatron_fx.viz import visualize

        return visualize(
            self.program,
            self.plan,
            path,
            cost_model=self.cost_model,
            formats=formats,
            memory_budget_bytes=self.plan.provenance.get("memory_budget_bytes"),
        )
