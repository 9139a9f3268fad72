"""Which samples each rank reads at each step: a global order, and each rank's block of it.

The global order is the one a single process would train in: epoch ``e`` visits the dataset in the
permutation drawn from ``(seed, e)`` (or in index order without shuffling), cut into global batches; the
samples left over at the end of an epoch, fewer than a global batch, are dropped, as Megatron-LM drops them.
Step ``s`` is a pure function of ``s``, so a run resumed at step ``s`` (the step its checkpoint saved) reads
exactly the samples an uninterrupted run would, mid-epoch included, with no loader state to save.

Under a plan each rank reads only its block: global batch ``s`` is split into ``devices_per_stage`` equal,
contiguous blocks and the rank at data-parallel index ``d`` reads block ``d`` — the block the trainer would
keep of the whole global batch (``runtime.Trainer.micro_batches``), so handing every rank its block or
every rank the whole batch trains identically.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from galvatron_fx.errors import ConfigError


@dataclass(frozen=True)
class GlobalOrder:
    """The single-process order of ``num_samples`` samples in global batches of ``global_batch``."""

    num_samples: int
    global_batch: int
    seed: int = 0
    shuffle: bool = True

    def __post_init__(self):
        if self.num_samples < self.global_batch:
            raise ConfigError(
                f"the dataset has {self.num_samples} samples, fewer than one global batch of {self.global_batch}",
                "use more data, a shorter sequence, or a smaller global batch",
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def _epoch(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)  # one stream per epoch
        return torch.randperm(self.num_samples, generator=generator)

    def batch(self, step: int) -> list[int]:
        """The sample indices of global batch ``step``, in order."""
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.global_batch
        return self._epoch(epoch)[start : start + self.global_batch].tolist()

    def block(self, step: int, index: int, blocks: int) -> list[int]:
        """Block ``index`` of ``blocks`` equal contiguous blocks of global batch ``step``."""
        if self.global_batch % blocks:
            raise ConfigError(
                f"a global batch of {self.global_batch} does not split into {blocks} equal blocks",
                "choose a global batch divisible by the devices of each pipeline stage",
            )
        size = self.global_batch // blocks
        return self.batch(step)[index * size : (index + 1) * size]


class StepBlocks(torch.utils.data.Sampler[list[int]]):
    """A batch sampler for ``torch.utils.data.DataLoader``: this rank's block of each global batch from step
    ``start_step`` to ``stop_step`` (exclusive; ``None``: without end)."""

    def __init__(self, order: GlobalOrder, index: int, blocks: int, start_step: int = 0, stop_step: int | None = None):
        self.order, self.index, self.blocks = order, index, blocks
        self.start_step, self.stop_step = start_step, stop_step

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while self.stop_step is None or step < self.stop_step:
            yield self.order.block(step, self.index, self.blocks)
            step += 1

    def __len__(self) -> int:
        if self.stop_step is None:
            raise TypeError("an endless StepBlocks has no length")
        return max(self.stop_step - self.start_step, 0)
