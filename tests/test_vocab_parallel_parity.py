"""Parity with single-process eager training for vocab-parallel embedding and LM head (fp32, dropout 0,
Adam, 5 steps): vtp 2 alone, with tensor/sequence-parallel layers, and across a pipeline cut (tied GPT-2
weights on two stages). The default tier covers GPT-2 (tied weights), LLaMA and BERT on 2 ranks."""

from __future__ import annotations

import pytest

import test_sequence_parallel_parity as sp
from distributed import check_parity

MODELS = ("gpt2", "llama", "bert")
FAST = {2: [(m, "vtp2") for m in MODELS] + [("gpt2", "vtp2_tp2_sp")]}
FULL = {2: [(m, "vtp2_tp2_sp") for m in ("llama", "bert")],
        4: [(m, r) for m in MODELS for r in ("pp2_vtp2", "vtp4")]}
_RESULTS: dict = {}


def _results(world_size: int, fast: bool) -> dict:
    if (world_size, fast) not in _RESULTS:
        _RESULTS[(world_size, fast)] = sp.run_group(world_size, (FAST if fast else FULL)[world_size])
    return _RESULTS[(world_size, fast)]


def _params():
    out = []
    for fast, table in ((True, FAST), (False, FULL)):
        for world, cases in table.items():
            out += [pytest.param(world, fast, m, r, id=f"{m}-{r}", marks=() if fast else (pytest.mark.full,)) for m, r in cases]
    return out


@pytest.mark.parametrize("world_size,fast,model,recipe", _params())
def test_vocab_parallel_parity_with_eager(world_size, fast, model, recipe):
    check_parity(model, _results(world_size, fast)[f"{model}/{recipe}"])
