"""Models built on the meta device keep their buffers' values: LLaMA's rotary ``inv_freq``, BERT's
``position_ids`` and ``token_type_ids``, Swin's ``relative_position_index`` are computed in ``__init__`` and are
not all in a ``save_pretrained`` folder. Built under ``torch.device("meta")`` and loaded from that folder, each
model trains like the eager one (SGD, losses and parameters) under PP2, TP2, ZeRO-3 and vocab TP2; a buffer
nothing can give is a ConfigError naming it, and the same model built with real buffers trains."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from tiny_hf import tiny_hf_model

import galvatron_fx
from galvatron_fx.errors import ConfigError
from galvatron_fx.models import example_batch
from galvatron_fx.runtime import spawn

BATCH, SEQ, STEPS, LR, TOLERANCE = 4, 12, 3, 0.1, 1e-4
PLANS = {"pp2": dict(pp=2, chunks=2), "tp2": dict(tp=2), "zero3": dict(sdp=True), "vtp2": dict(vtp=2)}


def _eager(name: str, folder: str | None = None):
    cls, config = tiny_hf_model(name)
    torch.manual_seed(3)
    model = cls(config)
    if folder is not None:
        model.save_pretrained(folder)
    batches = [example_batch(name, model, BATCH, SEQ, seed=step) for step in range(STEPS)]
    return model, batches


def _train_eager(model, batches):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}


def _worker(rank: int, world_size: int, folder: str) -> dict:
    import warnings

    warnings.simplefilter("ignore")
    out = {}
    for name in ("llama", "bert", "swin"):
        _, batches = _eager(name, f"{folder}/{name}" if rank == 0 else None)
        dist.barrier()
        cls, config = tiny_hf_model(name)
        for plan_name, flags in PLANS.items():
            with torch.device("meta"):
                model = cls(config)
            compiled = galvatron_fx.compile(
                model,
                example_kwargs=batches[0],
                plan=galvatron_fx.uniform_plan(**flags),
                init=f"safetensors:{folder}/{name}",
                optimizer=lambda params: torch.optim.SGD(params, lr=LR),
            )
            buffers = {
                n: b.clone() for layer in compiled.trainer.stage.layers.values() for n, b in layer.named_buffers()
            }
            losses = [float(compiled.train_step(batch)) for batch in batches]
            params = compiled.trainer.full_parameters()
            out[f"{name}/{plan_name}"] = {
                "losses": losses,
                "params": params if compiled.trainer.stage.position.local == 0 else {},
                "buffers": buffers,
            }
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn(_worker, 2, str(tmp_path_factory.mktemp("pretrained")), timeout_s=900)


@pytest.mark.parametrize("name", ["llama", "bert", "swin"])
@pytest.mark.parametrize("plan", list(PLANS))
def test_meta_model_loaded_from_save_pretrained_trains_like_eager(results, name, plan):
    eager, batches = _eager(name)
    reference_buffers = dict(eager.named_buffers())
    losses, params = _train_eager(eager, batches)
    cases = [r[f"{name}/{plan}"] for r in results]
    for case in cases:
        for buffer_name, value in case["buffers"].items():  # the model's values, never uninitialised memory
            assert torch.equal(value, reference_buffers[buffer_name]), buffer_name
        assert max(abs(a - b) for a, b in zip(case["losses"], losses)) <= TOLERANCE, (case["losses"], losses)
    copies = [(n, v) for case in cases for n, v in case["params"].items()]
    assert copies
    worst = max(copies, key=lambda item: (item[1] - params[item[0]]).abs().max().item())
    assert (worst[1] - params[worst[0]]).abs().max().item() <= TOLERANCE, worst[0]


class _ScaledBlocks(nn.Module):
    """A model with a buffer computed in ``__init__`` that neither a checkpoint nor an initialisation restores."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8), persistent=False)

    def forward(self, x, y):
        for block in self.blocks:
            x = block(x) * self.scale
        return nn.functional.mse_loss(x, y)


def _buffer_worker(rank: int, world_size: int) -> dict:
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    with torch.device("meta"):
        meta = _ScaledBlocks()
    try:
        galvatron_fx.compile(meta, example_args=(x, x), plan=galvatron_fx.uniform_plan())
        refused = ""
    except ConfigError as error:
        refused = str(error)
    with galvatron_fx.empty_parameters():
        real_buffers = _ScaledBlocks()
    compiled = galvatron_fx.compile(real_buffers, example_args=(x, x), plan=galvatron_fx.uniform_plan())
    scales = [b for layer in compiled.trainer.stage.layers.values() for n, b in layer.named_buffers() if n == "scale"]
    return {"refused": refused, "scale": scales[0], "param_device": str(next(real_buffers.parameters()).device)}


def test_a_buffer_nothing_gives_is_refused_by_name_and_real_buffers_are_kept():
    for result in spawn(_buffer_worker, 2, timeout_s=300):
        assert "buffers ['scale']" in result["refused"] and "empty_parameters" in result["refused"]
        assert result["param_device"] == "meta"
        assert torch.equal(result["scale"], torch.linspace(0.5, 1.5, 8))
