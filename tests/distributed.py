"""Shared machinery of the multi-rank tests: plan recipes, a worker that trains many (model, plan) cases
inside one spawned group, and the single-process eager reference they are compared with.

One spawn per world size runs every case sequentially (each rank captures each model once, at a batch of 2:
the batch is a symbol, so one Program serves every plan; lowering copies the weights, so a Program is never
modified). Ranks return their losses and, from the first rank of each stage, the stage's unsharded parameters
under the user's names. A recipe name ending in ``+sgd`` trains with SGD instead of Adam: SGD's update is
proportional to the gradient, so a wrong averaging factor over ranks, micro-batches or shards shows (Adam's
normalisation hides it).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import pytest
import torch

from galvatron_fx.plan import EmbeddingStrategy, LayerStrategy, Plan

STEPS = 5
GLOBAL_BATCH = 8
SEQ = 12  # not the head dim (16): a sequence equal to it hides transposed views
LR = 1e-3
SGD_LR = 0.1  # large enough that gradients off by a factor of 2 move parameters by more than TOLERANCE
# Adam's eps sits above fp32 rounding noise of near-zero gradients: with the default 1e-8, an element whose
# gradient is ~1e-8 gets an update of ~lr from noise alone, which measures rounding order, not parallelism.
ADAM_EPS = 1e-6
TOLERANCE = 1e-4


@dataclass(frozen=True)
class PlanRecipe:
    """A plan for any number of body layers: ``pattern`` ((dp_type, ckpt) pairs) repeats over the layers."""

    name: str
    world_size: int
    pattern: tuple[tuple[str, bool], ...] = (("ddp", False),)
    pp: int = 1
    chunks: int = 1
    pipeline: str = "1f1b"
    every_micro_batch: bool = False
    pp_division: tuple[int, ...] = ()  # () = even; counts may be negative: -1 means "all but the others"
    embed_sdp: bool = False  # the embedding and head sharded (ZeRO-3) too

    def plan(self, num_layers: int, model: str = "") -> Plan:
        dp = self.world_size // self.pp
        layers = tuple(
            LayerStrategy(
                dp=dp, dp_type=self.pattern[i % len(self.pattern)][0], ckpt=self.pattern[i % len(self.pattern)][1]
            )
            for i in range(num_layers)
        )
        division = tuple(
            num_layers - sum(d for d in self.pp_division if d > 0) if d < 0 else d for d in self.pp_division
        )
        return Plan(
            world_size=self.world_size,
            layers=layers,
            pp=self.pp,
            pp_division=division,
            chunks=self.chunks,
            pipeline=self.pipeline,
            global_batch=GLOBAL_BATCH,
            grad_sync_every_micro_batch=self.every_micro_batch,
            embedding=EmbeddingStrategy(embed_sdp=self.embed_sdp),
            provenance={"model": model} if model else {},
        )


# The acceptance plans (a rank captures each model once: its batch is a symbol).
RECIPES = {
    "dp2": PlanRecipe("dp2", 2, chunks=2),
    "zero2_2": PlanRecipe("zero2_2", 2, (("zero2", False),), chunks=2),
    "ckpt": PlanRecipe("ckpt", 2, (("ddp", True),), chunks=2),
    "pp2_gpipe": PlanRecipe("pp2_gpipe", 2, pp=2, chunks=4, pipeline="gpipe"),
    "pp2_1f1b": PlanRecipe("pp2_1f1b", 2, pp=2, chunks=4, pipeline="1f1b"),
    # dropout on: these two must give the same losses (the RNG depends on layers, not on stages or recompute)
    "drop_pp2_first1": PlanRecipe("drop_pp2_first1", 2, pp=2, chunks=2, pipeline="gpipe", pp_division=(1, -1)),
    "drop_pp2_last1_ckpt": PlanRecipe("drop_pp2_last1_ckpt", 2, (("ddp", True),), pp=2, chunks=2, pp_division=(-1, 1)),
    "dp4": PlanRecipe("dp4", 4),
    "zero3_4": PlanRecipe("zero3_4", 4, (("zero3", False),), embed_sdp=True),  # embedding and head: one unit
    "pp4_1f1b": PlanRecipe("pp4_1f1b", 4, pp=4, chunks=4),
    "pp2_zero3_2": PlanRecipe("pp2_zero3_2", 4, (("zero3", False),), pp=2, chunks=2, embed_sdp=True),
    "hetero4": PlanRecipe(
        "hetero4",
        4,
        (("ddp", False), ("zero3", True), ("zero2", False), ("zero3", False), ("ddp", True)),
        pp=2,
        chunks=2,
        every_micro_batch=True,
    ),
}
MODELS = ("gpt2", "llama", "bert", "t5", "vit", "swin")


def build(model_name: str):
    """The model with fixed initial weights and ``STEPS`` global batches of data (the same in every process).
    ``NAME+dropout`` turns every dropout module of model NAME to p=0.1."""
    from galvatron_fx.models import build_model

    torch.manual_seed(1234)
    base, _, variant = model_name.partition("+")
    model, data = build_model(base, batch=GLOBAL_BATCH * STEPS, seq=SEQ)
    if variant == "dropout":
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.1
    batches = [
        {k: v[s * GLOBAL_BATCH : (s + 1) * GLOBAL_BATCH] if _batched(v) else v for k, v in data.items()}
        for s in range(STEPS)
    ]
    return model, batches


def _batched(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == GLOBAL_BATCH * STEPS


def split_recipe(recipe: str) -> tuple[str, str]:
    """``"dp2+sgd"`` → ``("dp2", "sgd")``; a plain name trains with Adam."""
    base, _, optimizer = recipe.partition("+")
    return base, optimizer or "adam"


def optimizer_factory(name: str):
    """The optimizer every parity test uses, on a list of parameters (the runtime's and eager's alike)."""
    if name == "sgd":
        return lambda params: torch.optim.SGD(params, lr=SGD_LR)
    return lambda params: torch.optim.Adam(params, lr=LR, eps=ADAM_EPS)


@functools.lru_cache(maxsize=None)
def eager_reference(model_name: str, optimizer: str = "adam") -> tuple[list[float], dict[str, torch.Tensor]]:
    """Single-process training on the whole global batch: losses per step and final parameters (every
    name of a tied weight included)."""
    return train_eager(*build(model_name), optimizer)


def train_eager(
    model: torch.nn.Module, batches: list[dict], optimizer: str = "adam"
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process, one step per batch: the losses and the final parameters (every name of a tied weight
    included)."""
    model.train()
    step = optimizer_factory(optimizer)(model.parameters())
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        step.step()
        step.zero_grad()
        losses.append(loss.item())
    clones: dict[int, torch.Tensor] = {}  # tied weights: one clone under each of their names
    return losses, {
        n: clones.setdefault(id(p), p.detach().clone()) for n, p in model.named_parameters(remove_duplicate=False)
    }


@functools.lru_cache(maxsize=None)
def _program(model_name: str, micro_batch: int = 2):
    import galvatron_fx

    model, batches = build(model_name)
    example = {k: v[:micro_batch] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batches[0].items()}
    return galvatron_fx.capture(model, example_kwargs=example), batches


def train_cases(rank: int, world_size: int, cases: list[tuple[str, str]], make_plan=None) -> dict[str, dict]:
    """Spawned worker: train each (model, recipe name) case; return losses and local-0 parameters. The plan is
    ``make_plan(recipe without its optimizer, number of body layers, model name)``, by default RECIPES'."""
    from galvatron_fx.runtime import Trainer

    warnings.simplefilter("ignore")
    results = {}
    for model_name, recipe_name in cases:
        base, optimizer = split_recipe(recipe_name)
        program, batches = _program(model_name)
        plan = (make_plan or _recipe_plan)(base, len(program.body), program.model_name)
        trainer = Trainer(
            program, plan, config=_config(), optimizer=optimizer_factory(optimizer), model_name=program.model_name
        )
        losses = [float(trainer.step(batch)) for batch in batches]
        params = trainer.full_parameters()
        results[f"{model_name}/{recipe_name}"] = {
            "losses": losses,
            "params": params if trainer.stage.position.local == 0 else {},
            "stage": trainer.stage.position.stage,
            "describe": trainer.describe(),
        }
    return results


def _recipe_plan(name: str, num_layers: int, model: str) -> Plan:
    return RECIPES[name].plan(num_layers, model)


def _adam(params):
    return optimizer_factory("adam")(params)


def _config():
    from galvatron_fx.runtime import TrainConfig

    return TrainConfig(lr=LR)


def run_group(world_size: int, cases: list[tuple[str, str]], worker=None, timeout_s: float = 900.0) -> dict[str, dict]:
    """Spawn ``world_size`` ranks that train ``cases`` with ``worker`` (default ``train_cases``); merge
    their results per case."""
    from galvatron_fx.runtime import spawn

    per_rank = spawn(worker or train_cases, world_size, cases, timeout_s=timeout_s)
    merged: dict[str, dict] = {}
    for rank_results in per_rank:
        for case, result in rank_results.items():
            entry = merged.setdefault(case, {"losses": [], "params": [], "describe": []})
            entry["losses"].append(result["losses"])
            if result["params"]:
                entry["params"].append(result["params"])
            if "describe" in result:
                entry["describe"].append(result["describe"])
    return merged


def shared_runs(cases, worker=None, timeout_s: float = 900.0):
    """``results(world_size, fast)``: ``run_group`` of ``cases(world_size, fast)``, spawned once per world size
    and tier and shared by every test that asks for it (one spawn trains many cases)."""

    @functools.cache
    def results(world_size: int, fast: bool) -> dict[str, dict]:
        return run_group(world_size, cases(world_size, fast), worker, timeout_s)

    return results


def tier_params(fast: dict[int, list], full: dict[int, list]) -> list:
    """pytest params (world_size, fast, model, recipe) of both tiers; the full ones marked ``full``."""
    out = []
    for is_fast, table in ((True, fast), (False, full)):
        for world, cases in table.items():
            out += [
                pytest.param(world, is_fast, m, r, id=f"{m}-{r}", marks=() if is_fast else (pytest.mark.full,))
                for m, r in cases
            ]
    return out


def check_parity(model_name: str, result: dict, recipe: str = "", reference=None) -> None:
    """Every rank's losses within TOLERANCE of eager per step (trained with ``recipe``'s optimizer, or the
    given ``reference`` losses and parameters); every parameter within TOLERANCE."""
    ref_losses, ref_params = reference or eager_reference(model_name, split_recipe(recipe)[1])
    for rank, losses in enumerate(result["losses"]):
        assert len(losses) == len(ref_losses)
        worst = max(abs(a - b) for a, b in zip(losses, ref_losses))
        assert worst <= TOLERANCE, f"rank {rank}: losses {losses} vs eager {ref_losses} (max diff {worst:.2e})"
    # each stage's copy is checked: a tied weight held by two stages must match eager on both
    copies = [(name, tensor) for stage_params in result["params"] for name, tensor in stage_params.items()]
    unknown = {name for name, _ in copies} - set(ref_params)
    assert not unknown, f"parameters unknown to the eager model: {sorted(unknown)[:5]}"
    covered = {id(ref_params[name]) for name, _ in copies}
    missing = [n for n, tensor in ref_params.items() if id(tensor) not in covered]
    assert not missing, f"parameters not returned by any stage: {missing[:5]}"
    diffs = [(name, (tensor - ref_params[name]).abs().max().item()) for name, tensor in copies]
    name, worst = max(diffs, key=lambda item: item[1])
    assert worst <= TOLERANCE, f"parameter {name} differs from eager by {worst:.2e}"


# -- bad input and failures -----------------------------------------------------------------------------------
def bad_plans_worker(rank: int, world_size: int) -> list[str]:
    """Rank 0 alone builds trainers from plans that do not fit: each must raise PlanError before any
    collective (a collective would block, since rank 1 takes no part). Returns the messages."""
    from galvatron_fx.errors import GalvatronError
    from galvatron_fx.runtime import Trainer

    if rank != 0:
        return []
    program, _ = _program("gpt2", 2)
    n = len(program.body)
    bad = [
        PlanRecipe("other_world", 4).plan(n),  # made for 4 processes
        PlanRecipe("other_model_layers", 2).plan(n + 3),  # made for a model with more layers
        PlanRecipe("other_model_name", 2, chunks=2).plan(n, "BertForMaskedLM"),  # same depth, other model
    ]
    messages = []
    for plan in bad:
        try:
            Trainer(program, plan, model_name=program.model_name)
        except GalvatronError as error:
            messages.append(f"{type(error).__name__}: {error}")
    return messages


def dying_rank_worker(rank: int, world_size: int, recipe_name: str, die_in_step: int) -> list[float]:
    """Train GPT-2 under ``recipe_name``; the last rank exits abruptly in the middle of step ``die_in_step``
    (after its first forward), as a crashed process would."""
    import os

    from galvatron_fx.runtime import Trainer

    program, batches = _program("gpt2", 2)
    trainer = Trainer(program, RECIPES[recipe_name].plan(len(program.body)), config=_config())
    if rank == world_size - 1:
        forward = trainer.executor._forward

        def forward_then_die(*args, **kwargs):
            result = forward(*args, **kwargs)
            if trainer.steps_done == die_in_step:
                os._exit(3)
            return result

        trainer.executor._forward = forward_then_die
    return [float(trainer.step(batch)) for batch in batches]


def bf16_worker(rank: int, world_size: int, recipe_name: str) -> dict:
    """Train GPT-2 under ``recipe_name`` with bf16 autocast; returns losses and parameter dtypes."""
    from galvatron_fx.runtime import TrainConfig, Trainer

    program, batches = _program("gpt2", 2)
    trainer = Trainer(
        program, RECIPES[recipe_name].plan(len(program.body)), config=TrainConfig(lr=LR, mixed_precision="bf16")
    )
    losses = [float(trainer.step(batch)) for batch in batches]
    return {"losses": losses, "dtypes": sorted({str(p.dtype) for p in trainer.stage.parameters()})}
