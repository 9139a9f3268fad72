"""Torch-native parallel training written by hand, the baselines our lowered programs are held against.

Each runner trains a Hugging Face LLaMA-style model (``nn.Linear`` projections, which torch's tensor
parallel styles expect) with Adam, on the global batch given to ``step`` (the same on every rank), and
returns the global mean loss on every rank (one scalar all-reduce, as our Trainer does):

- ``ddp``: ``DistributedDataParallel`` over all ranks, each on its slice of the batch;
- ``fsdp``: FSDP2 ``fully_shard`` on every decoder layer and on the root (embedding, norm, head);
- ``tp``: DTensor ``parallelize_module`` on every decoder layer (q/k/v and gate/up column-parallel,
  o and down row-parallel), embedding and head replicated, every rank on the whole batch;
- ``pp``: ``torch.distributed.pipelining`` with one stage per rank (hand-cut: the first stage holds the
  embedding, the last the norm, head and loss) under ``Schedule1F1B``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

STRATEGIES = ("ddp", "fsdp", "tp", "pp")


@dataclass(frozen=True)
class NativeConfig:
    """``strategy`` on ``world`` ranks; ``chunks`` micro-batches (pipeline only)."""

    strategy: str
    world: int
    chunks: int = 1
    lr: float = 1e-3


def _device_type(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"


def _slice(batch: dict[str, Any], index: int, parts: int) -> dict[str, Any]:
    def cut(value):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            size = value.shape[0] // parts
            return value[index * size : (index + 1) * size]
        return value

    return {k: cut(v) for k, v in batch.items()}


def _global_mean(loss: torch.Tensor | None, share: float, device: torch.device) -> float:
    total = torch.zeros((), device=device)
    if loss is not None:
        total += loss.detach() * share
    dist.all_reduce(total)
    return float(total)


class NativeRunner:
    """One rank's share of native training; ``step(batch)`` returns the global mean loss."""

    def __init__(self, model: nn.Module, config: NativeConfig, device: torch.device):
        self.config, self.device, self.rank = config, device, dist.get_rank()
        self.module = getattr(self, f"_build_{config.strategy}")(model.to(device))
        self.optimizer = torch.optim.Adam([p for p in self.module.parameters() if p.requires_grad], lr=config.lr)

    # -- data and tensor parallelism ------------------------------------------------------------------
    def _build_ddp(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)

    def _build_fsdp(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(_device_type(self.device), (self.config.world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def _build_tp(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = init_device_mesh(_device_type(self.device), (self.config.world,))
        layer_plan = {
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(),
        }
        for layer in model.model.layers:
            parallelize_module(layer, mesh, layer_plan)
        return model

    # -- pipeline ---------------------------------------------------------------------------------------
    def _build_pp(self, model: nn.Module) -> nn.Module:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B

        world, layers = self.config.world, len(model.model.layers)
        per_stage = layers // world
        start, end = self.rank * per_stage, (self.rank + 1) * per_stage if self.rank < world - 1 else layers
        stage_module = _LlamaStage(model, start, end, first=self.rank == 0, last=self.rank == world - 1).to(self.device)
        vocab = model.config.vocab_size
        loss_function = model.loss_function

        def loss_fn(logits, labels):
            return loss_function(logits=logits, labels=labels, vocab_size=vocab)

        self.pipeline_stage = PipelineStage(stage_module, self.rank, world, self.device)
        self.schedule = Schedule1F1B(self.pipeline_stage, self.config.chunks, loss_fn=loss_fn)
        return stage_module

    # -- one step -----------------------------------------------------------------------------------------
    def step(self, batch: dict[str, Any]) -> float:
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        strategy, world = self.config.strategy, self.config.world
        if strategy == "pp":
            losses: list[torch.Tensor] = []
            if self.rank == 0:
                self.schedule.step(batch["input_ids"])
            elif self.rank == world - 1:
                self.schedule.step(target=batch["labels"], losses=losses)
            else:
                self.schedule.step()
            loss, share = (torch.stack(losses).mean() if losses else None), 1.0
        else:
            mine = batch if strategy == "tp" else _slice(batch, self.rank, world)
            loss = self.module(**mine).loss
            loss.backward()
            share = 1.0 / world
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return _global_mean(loss, share, self.device)


class _LlamaStage(nn.Module):
    """Decoder layers ``start:end`` of a LLaMA model, with the embedding on the first stage and the final
    norm and LM head on the last; rotary embeddings and the causal mask recomputed on every stage."""

    def __init__(self, model: nn.Module, start: int, end: int, first: bool, last: bool):
        super().__init__()
        inner = model.model
        self.config = model.config
        self.embed_tokens = inner.embed_tokens if first else None
        self.layers = nn.ModuleList(inner.layers[start:end])
        self.rotary_emb = inner.rotary_emb
        self.norm = inner.norm if last else None
        self.lm_head = model.lm_head if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        hidden = self.embed_tokens(x) if self.embed_tokens is not None else x
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=None, past_key_values=None, position_ids=positions
        )
        rotary = self.rotary_emb(hidden, position_ids=positions)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions)
        if self.lm_head is not None:
            hidden = self.lm_head(self.norm(hidden))
        return hidden
