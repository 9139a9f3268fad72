"""Dropout under tensor and sequence parallelism (GPT-2 with dropout 0.1 on embeddings, attention and residuals).

Megatron's semantics: the ranks of a tensor-parallel group draw the same mask on an activation they all hold
whole, and independent masks on the different shards they hold. Two checks:

- under TP2, every activation that crosses a layer boundary (all replicated) is bitwise the same on both
  ranks of the group, masks included;
- under TP2, TP2 + Megatron-SP and Ulysses 2, training (SGD) gives the losses and parameters of a
  single-process reference that draws each mask the way the rule says (written here, independently of the
  runtime: it runs the captured layers whole and draws every random op of a shard on that shard alone).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.fx as fx
from distributed import GLOBAL_BATCH, _config, _program, build, check_parity, optimizer_factory

from galvatron_fx.fx_utils import copy_layer_modules
from galvatron_fx.passes.lower.ops.random import layer_seed
from galvatron_fx.passes.lower.stage import loss_name
from galvatron_fx.plan import LayerStrategy, Plan
from galvatron_fx.program import node_meta

MODEL = "gpt2+dropout"
SP_OF = {"tp2": "none", "tp2_sp": "megatron", "ulysses2": "ulysses"}
SEED = 0
aten = torch.ops.aten


def _plan(recipe: str, num_layers: int) -> Plan:
    return Plan(
        world_size=2, layers=(LayerStrategy(tp=2, dp=1, sp=SP_OF[recipe]),) * num_layers, global_batch=GLOBAL_BATCH
    )


def _worker(rank: int, world_size: int, recipes: list[str]) -> dict:
    from galvatron_fx.runtime import Trainer

    warnings.simplefilter("ignore")
    program, batches = _program(MODEL)
    out = {}
    for recipe in recipes:
        trainer = Trainer(
            program, _plan(recipe, len(program.body)), config=_config(), optimizer=optimizer_factory("sgd")
        )
        if recipe == "tp2":  # one forward, every layer's outputs kept
            env = dict(trainer.micro_batches(batches[0])[0])
            with torch.no_grad():
                trainer.stage(env, seed=trainer._seeds()[0])
            outputs = {name: env[name] for layer in program.body for name in layer.output_names}
        evaluated = [trainer.evaluate(batch) for batch in batches[:2]]  # dropout off, nothing updated
        losses = [float(trainer.step(batch)) for batch in batches]
        out[recipe] = {
            "evaluated": evaluated,
            "losses": losses,
            "params": trainer.full_parameters(),
            "outputs": outputs if recipe == "tp2" else {},
        }
    return out


@pytest.fixture(scope="module")
def results():
    from galvatron_fx.runtime import spawn

    return spawn(_worker, 2, list(SP_OF), timeout_s=600)


def test_replicated_activations_are_bitwise_equal_across_the_tp_group(results):
    first, second = (r["tp2"]["outputs"] for r in results)
    assert first and first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs between the ranks of the TP group"


@pytest.mark.parametrize("recipe", list(SP_OF))
def test_training_equals_the_single_process_reference_that_draws_alike(results, recipe):
    reference = _reference(recipe)
    check_parity(
        MODEL,
        {"losses": [r[recipe]["losses"] for r in results], "params": [results[0][recipe]["params"]]},
        reference=reference,
    )


@pytest.mark.parametrize("recipe", list(SP_OF))
def test_evaluation_runs_without_dropout_like_the_models_eval(results, recipe):
    model, batches = build(MODEL)
    model.eval()
    with torch.no_grad():
        expected = [float(model(**batch).loss) for batch in batches[:2]]
    model.train()
    with torch.no_grad():
        with_dropout = float(model(**batches[0]).loss)
    assert abs(with_dropout - expected[0]) > 1e-3  # the dropout matters at this rate
    for rank in results:
        assert rank[recipe]["evaluated"] == pytest.approx(expected, abs=1e-5), (rank[recipe]["evaluated"], expected)


def test_the_masks_matter():
    """The reference with another shard rule (every shard drawing the replicated stream) trains differently."""
    assert max(abs(a - b) for a, b in zip(_reference("tp2")[0], _reference("tp2", shards_alike=True)[0])) > 1e-4


# -- the reference: one process, every mask drawn as the rule says ------------------------------------------------
def _sharded_dim(node: fx.Node, recipe: str) -> int | None:
    """Where the rank's shard of a random op's value lies in GPT-2's blocks: attention runs on heads (dim 1 of
    q, k, v) in every mode; residual dropouts hold the whole value under TP, a sequence shard (dim 1) under SP."""
    if node.target is aten.scaled_dot_product_attention.default:
        return 1
    return None if recipe == "tp2" else 1


class _Reference(fx.Interpreter):
    """Runs one layer on the whole micro-batch, drawing each random op as rank ``t`` of the group would on its
    shard: a number from the CPU generator keys the op; shard ``t`` draws with ``layer_seed(number, t + 1)``,
    a whole value with ``layer_seed(number, 0)``; the generator then continues from ``layer_seed(number, "next")``."""

    def __init__(self, module, recipe: str | None, shards_alike: bool):
        super().__init__(module)
        self.recipe, self.shards_alike = recipe, shards_alike

    def run_node(self, node):
        if node.op != "call_function" or not _draws(node):
            return super().run_node(node)
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        number = int(torch.randint(0, 1 << 62, (1,)))
        dim = _sharded_dim(node, self.recipe) if self.recipe else None
        if dim is None:
            torch.manual_seed(layer_seed(number, 0))
            out = node.target(*args, **kwargs)
        else:
            pieces = []
            for t in range(2):
                torch.manual_seed(layer_seed(number, 0 if self.shards_alike else t + 1))
                split = [
                    a.chunk(2, dim)[t] if isinstance(a, torch.Tensor) and i < 3 and a.dim() > dim else a
                    for i, a in enumerate(args)
                ]
                if node.target is aten.dropout.default:
                    split = [args[0].chunk(2, dim)[t], *args[1:]]
                pieces.append(node.target(*split, **kwargs))
            out = torch.cat(pieces, dim)
        torch.manual_seed(layer_seed(number, "next"))
        return out


def _draws(node: fx.Node) -> bool:
    if node.target is aten.dropout.default:
        return bool(node.args[1]) and bool(node.args[2])
    return node.target is aten.scaled_dot_product_attention.default and bool(node.args[4] if len(node.args) > 4 else 0)


def _reference(recipe: str, shards_alike: bool = False) -> tuple[list[float], dict[str, torch.Tensor]]:
    """SGD on one process: the prologue and epilogue per rank's block of samples (each rank its own, as the
    runtime splits them), the blocks between on the whole batch."""
    program, batches = _program(MODEL)
    loss_value = loss_name(program)
    modules = copy_layer_modules([layer.module for layer in program.layers])
    params = {name: p for module in modules for name, p in module.named_parameters()}
    optimizer = optimizer_factory("sgd")(list({id(p): p for p in params.values()}.values()))
    losses = []
    for step, batch in enumerate(batches):
        micro_seed = layer_seed(SEED, step, 0)
        flat = program.flatten_inputs((), batch)
        env = dict(flat)
        for layer, module in zip(program.layers, modules):
            if layer.kind == "block":
                torch.manual_seed(layer_seed(micro_seed, layer.index, 0))
                outputs = _Reference(module, recipe, shards_alike).run(*[env[n] for n in layer.input_names])
            else:
                outputs = _per_block(layer, module, env, micro_seed)
                if layer.kind == "epilogue":
                    block_losses = [values[layer.output_names.index(loss_value)] for values in outputs]
                    break
            env.update(zip(layer.output_names, outputs))
        loss = torch.stack(block_losses).mean()  # each rank's mean, averaged over the ranks
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, {name: p.detach().clone() for name, p in params.items()}


def _per_block(layer, module, env, micro_seed):
    """Run ``layer`` once per rank's block of samples with that rank's seed; the prologue's outputs are stitched
    back into whole-batch values, the epilogue's are returned per block."""
    placeholders = {n.name: n for n in module.graph.find_nodes(op="placeholder")}
    per_block = []
    for block in range(2):
        rows = slice(block * GLOBAL_BATCH // 2, (block + 1) * GLOBAL_BATCH // 2)
        inputs = [env[n][rows] if node_meta(placeholders[n]).batched else env[n] for n in layer.input_names]
        torch.manual_seed(layer_seed(micro_seed, layer.index, block))
        per_block.append(_Reference(module, None, False).run(*inputs))
    if layer.kind == "epilogue":
        return per_block
    return [
        torch.cat(values)
        if isinstance(values[0], torch.Tensor) and values[0].dim() > 0 and values[0].shape[0] == GLOBAL_BATCH // 2
        else values[0]
        for values in zip(*per_block)
    ]
