"""compile() end to end on 4 gloo processes: searched, global-flags and per-layer plans, a loss function
given apart from the model, evaluation — each compared with single-process eager training."""

import functools
import json
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from distributed import ADAM_EPS, LR, TOLERANCE

import galvatron_fx
from galvatron_fx import Cluster, LayerStrategy, Plan, cli, runtime, uniform_plan
from galvatron_fx.models import build_model, example_batch

WORLD = 4
GLOBAL_BATCH = 8
SEQ = 16
STEPS = 10


def _adam(params):
    return torch.optim.Adam(params, lr=LR, eps=ADAM_EPS)


def _model_and_data(name: str):
    """The model with fixed initial weights and a dataset of two global batches (the same everywhere)."""
    torch.manual_seed(1234)
    model, _ = build_model(name, batch=GLOBAL_BATCH, seq=SEQ)
    return model, [example_batch(name, model, GLOBAL_BATCH, SEQ, seed=i) for i in range(2)]


def _cluster() -> Cluster:
    return Cluster.preset("A100-80GB", nodes=1, devices_per_node=WORLD)


def _next_token_loss(logits, batch):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch["idx"][:, 1:].reshape(-1))


def _train(compiled, data, steps=STEPS):
    return [float(compiled.train_step(data[step % len(data)])) for step in range(steps)]


def _galvatron_strategy_file(folder: Path) -> Path:
    """Galvatron's strategy file for GPT-2 on 4 devices: 2 pipeline stages of 2 ZeRO-3 replicas (its
    ``default_dp_type``, with no layer marked), PipeDream-flush (1F1B), checkpointing on every other layer."""
    path = folder / "galvatron_strategy.json"
    path.write_text(
        json.dumps(
            {
                "pp_deg": 2,
                "tp_sizes_enc": "1,1,1,1",
                "tp_consecutive_flags": "1,1,1,1",
                "dp_types_enc": "0,0,0,0",
                "checkpoint": "0,1,0,1",
                "global_bsz": GLOBAL_BATCH,
                "chunks": 2,
                "pp_division": "2,2",
                "pipeline_type": "pipedream_flush",
                "default_dp_type": "zero3",
                "vtp": 1,
                "vsp": 0,
                "embed_sdp": 0,
            }
        )
    )
    return path


def compile_worker(rank: int, world_size: int, cli_plan_path: str) -> dict:
    results = {}
    for name in ("gpt2", "t5"):
        model, data = _model_and_data(name)
        compiled = galvatron_fx.compile(model, _cluster(), example_kwargs=data[0], optimizer=_adam)
        results[name] = {"plan": [s.short() for s in compiled.plan.layers], "losses": _train(compiled, data)}

    model, data = _model_and_data("gpt2")
    compiled = galvatron_fx.compile(
        model, _cluster(), example_kwargs=data[0], optimizer=_adam, plan=uniform_plan(pp=2, chunks=2, ckpt=True)
    )
    results["uniform"] = {"eval": compiled.eval_step(data[0]), "losses": _train(compiled, data, 3)}

    model, data = _model_and_data("gpt2")
    layers = (
        LayerStrategy(dp=4, dp_type="zero3"),
        LayerStrategy(dp=4, ckpt=True),
        LayerStrategy(dp=4, dp_type="zero2"),
        LayerStrategy(dp=4),
    )
    per_layer = Plan(world_size=WORLD, layers=layers, chunks=2, global_batch=GLOBAL_BATCH)
    compiled = galvatron_fx.compile(model, _cluster(), example_kwargs=data[0], optimizer=_adam, plan=per_layer)
    results["per_layer"] = {"losses": _train(compiled, data, 3)}

    model, data = _model_and_data("gpt2")
    compiled = galvatron_fx.compile(model, _cluster(), example_kwargs=data[0], optimizer=_adam, plan=cli_plan_path)
    results["cli_plan"] = {"pp": compiled.plan.pp, "losses": _train(compiled, data, 3)}

    model, data = _model_and_data("gpt2")
    path = _galvatron_strategy_file(Path(cli_plan_path).parent)
    compiled = galvatron_fx.compile(model, _cluster(), example_kwargs=data[0], optimizer=_adam, plan=str(path))
    plan = compiled.plan
    results["galvatron_file"] = {
        "layout": (plan.pp, plan.pipeline, plan.chunks, [layer.short() for layer in plan.layers]),
        "losses": _train(compiled, data, 3),
    }

    model, data = _model_and_data("nanogpt")
    data = [{"idx": batch["idx"]} for batch in data]
    compiled = galvatron_fx.compile(
        model,
        _cluster(),
        example_kwargs=data[0],
        optimizer=_adam,
        loss_fn=_next_token_loss,
        plan=uniform_plan(pp=2, chunks=2),
    )
    results["loss_fn"] = {"losses": _train(compiled, data, 3)}
    return results


@functools.lru_cache(maxsize=None)
def _eager(name: str, steps: int, loss_fn=None) -> list[float]:
    model, data = _model_and_data(name)
    optimizer = _adam(model.parameters())
    losses = []
    for step in range(steps):
        batch = data[step % len(data)]
        if loss_fn is None:
            loss = model(**batch).loss
        else:
            loss = loss_fn(model(idx=batch["idx"]), batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@functools.lru_cache(maxsize=None)
def _distributed():
    plan_path = Path(tempfile.mkdtemp()) / "plan.json"
    status = cli.main(
        [
            "search",
            "gpt2",
            "--size",
            "small",
            "--cluster",
            f"A100-80GB:1x{WORLD}",
            "--batch",
            str(GLOBAL_BATCH),
            "--seq",
            str(SEQ),
            "--mixed-precision",
            "fp32",  # as the workers train: compile takes a plan's precision and refuses another
            "--out",
            str(plan_path),
            "--quiet",
        ]
    )
    assert status == 0 and plan_path.exists()
    return runtime.spawn(compile_worker, WORLD, str(plan_path), timeout_s=1200)


def _assert_close(losses, reference):
    assert len(losses) == len(reference)
    assert max(abs(a - b) for a, b in zip(losses, reference)) <= TOLERANCE, (losses, reference)


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_searched_plan_trains_like_eager(name):
    results = _distributed()
    for rank_results in results:
        _assert_close(rank_results[name]["losses"], _eager(name, STEPS))
    losses = results[0][name]["losses"]
    assert losses[-1] < losses[0] - 0.05, losses


def test_global_flags_plan_and_eval_step():
    results = _distributed()
    model, data = _model_and_data("gpt2")
    with torch.no_grad():
        assert abs(results[0]["uniform"]["eval"] - model(**data[0]).loss.item()) <= TOLERANCE
    _assert_close(results[0]["uniform"]["losses"], _eager("gpt2", 3))


def test_plan_dumped_by_the_search_command():
    result = _distributed()[0]["cli_plan"]
    _assert_close(result["losses"], _eager("gpt2", 3))


def test_galvatron_strategy_file_with_zero3_default_and_pipedream_flush_trains_like_eager():
    result = _distributed()[0]["galvatron_file"]
    assert result["layout"] == (2, "1f1b", 2, ["dp2-zero3", "dp2-zero3 ckpt", "dp2-zero3", "dp2-zero3 ckpt"])
    _assert_close(result["losses"], _eager("gpt2", 3))


def test_per_layer_python_plan():
    _assert_close(_distributed()[0]["per_layer"]["losses"], _eager("gpt2", 3))


def test_loss_function_given_apart_from_the_model():
    _assert_close(_distributed()[0]["loss_fn"]["losses"], _eager("nanogpt", 3, _next_token_loss))


def bad_input_worker(rank: int, world_size: int) -> dict[str, str]:
    """Each bad input must raise on every rank (no rank left waiting in a collective)."""
    model, data = _model_and_data("gpt2")
    outcomes = {}
    attempts = {
        "budget": dict(cluster=Cluster.preset("A100-80GB", nodes=1, devices_per_node=world_size), memory_budget="1MB"),
        "cluster": dict(cluster=Cluster.preset("A100-80GB", nodes=1, devices_per_node=8)),
        "other_model": dict(
            cluster=Cluster.preset("A100-80GB", nodes=1, devices_per_node=world_size),
            plan=Plan(world_size=world_size, layers=(LayerStrategy(dp=world_size),) * 7, global_batch=GLOBAL_BATCH),
        ),
    }
    for name, options in attempts.items():
        try:
            galvatron_fx.compile(model, example_kwargs=data[0], **options)
            outcomes[name] = "compiled"
        except galvatron_fx.GalvatronError as error:
            outcomes[name] = f"{type(error).__name__}: {error}"
    return outcomes


def test_bad_input_raises_on_every_rank():
    results = runtime.spawn(bad_input_worker, 2, timeout_s=600)
    for outcomes in results:
        assert outcomes["budget"].startswith("PlanError") and "smallest budget" in outcomes["budget"], outcomes[
            "budget"
        ]
        assert outcomes["cluster"].startswith("ConfigError") and "2 processes run" in outcomes["cluster"]
        assert outcomes["other_model"].startswith("PlanError") and "7 layer strategies" in outcomes["other_model"]
