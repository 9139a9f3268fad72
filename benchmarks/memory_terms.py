"""Memory terms of a Megatron-SP, checkpointed tp8 plan measured on this machine's CPU (docs/memory-7b.md).

Rank 0 of an 8-rank plan is lowered and trained for two steps under torch.distributed's fake process group
(collectives do nothing, shapes are exact), a small LLaMA from transformers: tp8 with Megatron-SP on every
layer, 2 micro-batches of 8 samples (1F1B), embedding and head with vocab TP 2 (DDP over 4). Live tensor
bytes are counted by a dispatch mode (every storage an op creates, until it is freed) and read at the
phases of the second step: the forward and backward of each micro-batch and the optimizer step. Per-layer
figures are differences between 2 and 4 layers. Beside them: Adam's step temporaries (single-tensor,
foreach, fused) and the same terms by our cost model (an analytic profile of the same capture) and by
Galvatron's formulas scaled to this configuration.

    .venv/bin/python -m benchmarks.memory_terms [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import warnings
import weakref

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

MiB = 2**20
HIDDEN, FFN, HEADS, VOCAB, SEQ, GLOBAL_BATCH, CHUNKS, TP, VTP = 512, 1376, 8, 4096, 256, 16, 2, 8, 2
# Galvatron's LLaMA-2-7B memory profile (MiB per sample at seq 2048, hidden 4096, vocab 32000, bf16)
GALVATRON_CKPT_PER_SAMPLE = 32.0  # layertype_0_sp checkpoint
GALVATRON_ONE_STAGE_VTP2 = 358.83984375  # other_memory_pp_off_sp activation[2]
GALVATRON_SPLIT_VTP2 = 83.90301513671875 + 343.3006591796875  # pp_on_first + pp_on_last activation[2]


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created by ops inside the mode that are still alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._sizes:
            return
        self._sizes[key] = storage.nbytes()
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in pytree.tree_leaves(out):
            if type(value) in (torch.Tensor, torch.nn.Parameter):
                self._track(value)
        return out


def optimizer_temporaries() -> dict[str, float]:
    """Peak bytes of Adam's step above its states, per parameter, for a list of 1M..4M-element fp32 weights."""
    out = {}
    for name, options in {
        "single-tensor": {"foreach": False},
        "foreach": {"foreach": True},
        "fused": {"fused": True},
    }.items():
        params = [torch.nn.Parameter(torch.randn(1024, 1024)) for _ in range(8)] + [
            torch.nn.Parameter(torch.randn(4096, 1024))
        ]
        optimizer = torch.optim.Adam(params, lr=1e-3, **options)
        meter = LiveBytes()
        with meter:
            for _ in range(2):
                for p in params:
                    p.grad = torch.randn_like(p)
                before = meter.peak = meter.live
                optimizer.step()
        out[name] = (meter.peak - before) / sum(p.numel() for p in params)
    return out


def _capture(layers: int):
    import transformers

    import galvatron_fx

    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=SEQ,
    )
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ))
    batch = {"input_ids": ids, "labels": ids, "use_cache": False}
    return galvatron_fx.capture(transformers.LlamaForCausalLM(config), example_kwargs=batch), batch


def _plan(layers: int, ckpt: bool):
    from galvatron_fx.plan import EmbeddingStrategy, LayerStrategy, Plan

    return Plan(
        world_size=8,
        layers=[LayerStrategy(tp=TP, dp=1, sp="megatron", ckpt=ckpt)] * layers,
        global_batch=GLOBAL_BATCH,
        chunks=CHUNKS,
        pipeline="1f1b",
        embedding=EmbeddingStrategy(vtp=VTP, dp_type="ddp"),
    )


def step_phases(program, batch, layers: int, precision: str, ckpt: bool) -> dict[str, float]:
    """Rank 0's live bytes by phase of its second step: activations kept after each forward, the transient of
    the second backward above its start, and of the optimizer step."""
    from galvatron_fx.runtime import TrainConfig, Trainer

    trainer = Trainer(program, _plan(layers, ckpt), config=TrainConfig(mixed_precision=precision))
    meter, phases = LiveBytes(), []

    def timed(owner, name: str, tag: str) -> None:
        call = getattr(owner, name)

        def wrapper(*args, **kwargs):
            before = meter.peak = meter.live
            out = call(*args, **kwargs)
            phases.append((tag, before, meter.peak, meter.live))
            return out

        setattr(owner, name, wrapper)

    timed(trainer.executor, "_forward", "F")
    timed(trainer.executor, "_backward", "B")
    timed(trainer.optimizer, "step", "opt")
    with meter:
        trainer.step(batch)
        phases.clear()
        trainer.step(batch)
    (_, f_before, _, f_after), (_, b_before, b_peak, _) = phases[2], phases[3]  # the second micro-batch
    _, o_before, o_peak, _ = phases[4]
    return {"kept": f_after - f_before, "backward_transient": b_peak - b_before, "optimizer_temp": o_peak - o_before}


def runtime_terms() -> dict[str, dict[str, float]]:
    """Per-layer and embedding+head figures of the tp8 plan, from 2 and 4 layers (fp32 and bf16)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from galvatron_fx.runtime import groups

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)
    measured: dict[tuple, dict[str, float]] = {}
    try:
        for layers in (2, 4):
            torch.manual_seed(0)
            program, batch = _capture(layers)
            for precision in ("fp32", "bf16"):
                for ckpt in (False, True):
                    measured[layers, precision, ckpt] = step_phases(program, batch, layers, precision, ckpt)
                    groups.clear_cache()
    finally:
        dist.destroy_process_group()
    out = {}
    for precision in ("fp32", "bf16"):
        plain = {n: measured[n, precision, False] for n in (2, 4)}
        ckpt = {n: measured[n, precision, True] for n in (2, 4)}
        layer_kept = (plain[4]["kept"] - plain[2]["kept"]) / 2
        layer_ckpt_kept = (ckpt[4]["kept"] - ckpt[2]["kept"]) / 2
        out[precision] = {
            "layer kept, not checkpointed": layer_kept,
            "layer kept, checkpointed": layer_ckpt_kept,
            "recompute transient (backward, checkpointed)": ckpt[4]["backward_transient"],
            "backward transient, not checkpointed": plain[4]["backward_transient"],
            "embedding+head kept": ckpt[2]["kept"] - 2 * layer_ckpt_kept,
            "optimizer step temporaries (CPU Adam)": ckpt[4]["optimizer_temp"],
        }
    return out


def model_terms() -> dict[str, dict[str, float]]:
    """The same terms by our cost model on an analytic profile of the 4-layer capture, and by Galvatron's
    formulas with its 7B figures scaled to this configuration."""
    from pathlib import Path

    from galvatron_fx.cost.galvatron_import import load_hardware
    from galvatron_fx.cost.model import CostModel
    from galvatron_fx.cost.model_profile import ModelProfile
    from galvatron_fx.plan import EmbeddingStrategy, LayerStrategy

    hardware = load_hardware(Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "galvatron-llama2-7b")
    program, _ = _capture(4)
    profile = ModelProfile.from_program(program, flops_per_s=1e12)
    micro = GLOBAL_BATCH // CHUNKS
    out = {}
    for precision in ("fp32", "bf16"):
        model = CostModel(profile, hardware, mixed_precision=precision)
        plain = model.layer_cost(profile.layer_types[0], LayerStrategy(tp=TP, sp="megatron"), micro)
        ckpt = model.layer_cost(profile.layer_types[0], LayerStrategy(tp=TP, sp="megatron", ckpt=True), micro)
        part = model.embedding_cost(EmbeddingStrategy(vtp=VTP), 8, micro, first_stage=True, last_stage=True)
        out[precision] = {
            "layer kept, not checkpointed": plain.activation_bytes,
            "layer kept, checkpointed": ckpt.activation_bytes,
            "recompute transient (backward, checkpointed)": ckpt.peak_extra_bytes,
            "embedding+head kept": part.activation_bytes,
        }
    tokens_per_sample_7b, local = 2048 * 4096, micro * SEQ * HIDDEN / TP  # hidden elements of one layer input
    logits = (micro // (8 // VTP)) * SEQ * (VOCAB // VTP)  # logit elements on one rank
    out["galvatron (7B figures scaled)"] = {
        "layer kept, checkpointed": GALVATRON_CKPT_PER_SAMPLE * MiB / tokens_per_sample_7b * local,
        "recompute transient (backward, checkpointed)": 0.0,
        "embedding+head kept": GALVATRON_ONE_STAGE_VTP2 * MiB / (2048 * 16000) * logits,
        "embedding+head kept (pp_on_first + pp_on_last)": GALVATRON_SPLIT_VTP2 * MiB / (2048 * 16000) * logits,
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    figures = {"optimizer temporaries, bytes per parameter": optimizer_temporaries()}
    for name, value in figures["optimizer temporaries, bytes per parameter"].items():
        print(f"Adam {name:14s} step temporaries: {value:.2f} bytes per parameter")
    figures["runtime (rank 0, MiB)"] = {k: {t: v / MiB for t, v in d.items()} for k, d in runtime_terms().items()}
    figures["formulas (MiB)"] = {k: {t: v / MiB for t, v in d.items()} for k, d in model_terms().items()}
    for title in ("runtime (rank 0, MiB)", "formulas (MiB)"):
        for source, terms in figures[title].items():
            for term, value in terms.items():
                print(f"{title:22s} {source:30s} {term:48s} {value:8.3f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=1)


if __name__ == "__main__":
    main()
