"""Parity with single-process eager training for vocab-parallel embedding and LM head (fp32, dropout 0,
Adam, 5 steps): vtp 2 alone, with tensor/sequence-parallel layers, and across a pipeline cut (tied GPT-2
weights on two stages). The default tier covers GPT-2 (tied weights), LLaMA and BERT on 2 ranks."""

from __future__ import annotations

import functools

import pytest
import test_sequence_parallel_parity as sp
from distributed import check_parity, shared_runs, tier_params, train_cases, train_eager

MODELS = ("gpt2", "llama", "bert")
# run by the sequence-parallel tests' 2-rank group; SGD on every model (classifiers shard their classes)
FAST = {2: [(m, "vtp2") for m in MODELS] + [(m, "vtp2+sgd") for m in ("gpt2", "llama", "bert", "t5", "vit", "swin")]}
FULL = {2: [(m, "vtp2_tp2_sp") for m in MODELS], 4: [(m, r) for m in MODELS for r in ("pp2_vtp2", "vtp4")]}
_full_results = shared_runs(
    lambda world_size, fast: FULL[world_size], functools.partial(train_cases, make_plan=sp.make_plan), timeout_s=1200
)


def _results(world_size: int, fast: bool) -> dict:
    return sp._results(world_size, True) if fast else _full_results(world_size, False)


@pytest.mark.parametrize("world_size,fast,model,recipe", tier_params(FAST, FULL))
def test_vocab_parallel_parity_with_eager(world_size, fast, model, recipe):
    check_parity(model, _results(world_size, fast)[f"{model}/{recipe}"], recipe)


# -- vocabularies not divisible by vtp: padded shards --------------------------------------------------------
ODD_VOCAB = {"gpt2": 255, "llama": 253}


def _odd_model(name: str):
    """``name`` with an odd vocabulary, fixed initial weights, and STEPS global batches of tokens."""
    import torch
    from distributed import GLOBAL_BATCH, SEQ, STEPS

    from galvatron_fx.models import _causal_batch, _transformers

    T = _transformers()
    torch.manual_seed(1234)
    if name == "gpt2":
        model = T.GPT2LMHeadModel(
            T.GPT2Config(
                n_layer=2,
                n_embd=64,
                n_head=4,
                vocab_size=ODD_VOCAB[name],
                n_positions=64,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
            )
        )
    else:
        model = T.LlamaForCausalLM(
            T.LlamaConfig(
                vocab_size=ODD_VOCAB[name],
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=128,
                max_position_embeddings=64,
            )
        )
    data = _causal_batch(model, GLOBAL_BATCH * STEPS, SEQ, torch.Generator().manual_seed(5))
    batches = [
        {k: v[s * GLOBAL_BATCH : (s + 1) * GLOBAL_BATCH] if hasattr(v, "dim") else v for k, v in data.items()}
        for s in range(STEPS)
    ]
    return model, batches


def _odd_worker(rank: int, world_size: int, cases) -> dict:
    import warnings

    from distributed import _adam, _config

    import galvatron_fx
    from galvatron_fx.runtime import Trainer

    warnings.simplefilter("ignore")
    out = {}
    for name, recipe in cases:
        model, batches = _odd_model(name)
        program = galvatron_fx.capture(model, example_kwargs=batches[0])
        trainer = Trainer(program, sp.make_plan(recipe, len(program.body)), config=_config(), optimizer=_adam)
        out[f"{name}/{recipe}"] = {
            "losses": [float(trainer.step(b)) for b in batches],
            "params": trainer.full_parameters(),
            "shapes": {n: tuple(p.shape) for n, p in trainer.stage.user_parameters().items()},
        }
    return out


ODD_CASES = [("gpt2", "vtp2"), ("llama", "vtp2_tp2_sp")]


def test_vocab_not_divisible_by_vtp_is_padded():
    from distributed import TOLERANCE

    from galvatron_fx.runtime import spawn

    per_rank = spawn(_odd_worker, 2, ODD_CASES, timeout_s=900)
    for name, recipe in ODD_CASES:
        model, batches = _odd_model(name)
        losses, reference = train_eager(model, batches)
        for result in (r[f"{name}/{recipe}"] for r in per_rank):
            assert max(abs(a - b) for a, b in zip(result["losses"], losses)) <= TOLERANCE, (
                name,
                result["losses"],
                losses,
            )
            head = "lm_head.weight"
            assert result["shapes"][head][0] == (ODD_VOCAB[name] + 1) // 2, result["shapes"][head]  # a padded half each
            for param_name, value in result["params"].items():
                assert value.shape == reference[param_name].shape, param_name
                assert (value - reference[param_name].detach()).abs().max().item() <= TOLERANCE, param_name
