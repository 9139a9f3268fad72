"""Models too big for one device: a meta-device GPT-2 compiled on 4 ranks (tp2 × ZeRO-3(2)) never allocates
a full copy of a sharded parameter and trains; a safetensors checkpoint of an eager model loads straight into
the shards and gives the eager model's loss; the model's own initialisation replayed on shards."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import galvatron_fx
from galvatron_fx.errors import ConfigError
from galvatron_fx.models import example_batch
from galvatron_fx.runtime import spawn
from galvatron_fx.runtime.safetensors_io import check_safetensors
from galvatron_fx.runtime.shard_init import init_shards
from galvatron_fx.runtime.shard_maps import LocalShard, ShardMap

BATCH, SEQ = 8, 16


def _gpt2():
    """GPT-2 whose sharded matrices (c_attn, c_fc, c_proj of the MLP) are larger than every replicated
    tensor (the tied embedding, 128 × 64), so "no allocation as large as a sharded matrix" is checkable."""
    import transformers

    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        vocab_size=128,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


class _LargestAllocation(TorchDispatchMode):
    """The largest real floating-point tensor any op produces (a DTensor counts its local shard)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if isinstance(value, DTensor):
                value = value._local_tensor
            if type(value) in (torch.Tensor, nn.Parameter) and not value.is_meta and value.is_floating_point():
                self.numel = max(self.numel, value.numel())
        return out


def _meta_worker(rank: int, world: int, folder: str) -> dict:
    from safetensors.torch import save_file

    batch_model = _gpt2()  # only for drawing batches (same on every rank)
    batch = example_batch("gpt2", batch_model, BATCH, SEQ, seed=0)
    plan = galvatron_fx.uniform_plan(tp=2, sdp=True)
    out = {}

    # 1. the model's own initialisation, on meta, shard by shard
    with torch.device("meta"):
        model = _gpt2()
    meter = _LargestAllocation()
    with meter:
        compiled = galvatron_fx.compile(model, example_kwargs=batch, plan=plan)
    full = {n: p.numel() for n, p in model.named_parameters(remove_duplicate=False)}
    local = {}
    for name, param in compiled.trainer.stage.user_parameters().items():
        piece = param.to_local() if isinstance(param, DTensor) else param
        local[name] = piece.untyped_storage().nbytes() // piece.element_size()
    out["largest_allocation"] = meter.numel
    out["full"], out["local"] = full, local
    out["losses"] = [float(compiled.train_step(batch)) for _ in range(3)]

    # 2. an eager model's safetensors checkpoint (tied head left out, as Hugging Face stores it)
    torch.manual_seed(7)
    eager = _gpt2()
    if rank == 0:
        save_file(
            {k: v.contiguous() for k, v in eager.state_dict().items() if k != "lm_head.weight"},
            f"{folder}/model.safetensors",
        )
    dist.barrier()
    with torch.device("meta"):
        model = _gpt2()
    loaded = galvatron_fx.compile(model, example_kwargs=batch, plan=plan, init=f"safetensors:{folder}")
    out["eager_loss"] = eager(**batch).loss.item()
    out["loaded_loss"] = loaded.eval_step(batch)
    params = loaded.trainer.full_parameters()
    reference = dict(eager.named_parameters(remove_duplicate=False))
    out["max_param_diff"] = max(float((value - reference[name].detach()).abs().max()) for name, value in params.items())
    return out


@pytest.fixture(scope="module")
def meta_results(tmp_path_factory):
    return spawn(_meta_worker, 4, str(tmp_path_factory.mktemp("safetensors")), timeout_s=500)


def test_meta_gpt2_never_holds_a_full_sharded_parameter_and_trains(meta_results):
    for result in meta_results:
        full, local = result["full"], result["local"]
        sharded = {n for n in local if local[n] < full[n]}
        replicated = set(local) - sharded
        assert {n for n in sharded if "c_attn.weight" in n or "c_fc.weight" in n}  # tp and ZeRO-3 did shard them
        # the largest tensor a rank holds anyway: a replicated parameter, or its shard of a sharded one
        held = max([full[n] for n in replicated] + list(local.values()))
        big = [n for n in sharded if full[n] > held]
        assert big
        assert result["largest_allocation"] < min(full[n] for n in big)  # never a whole one, not even briefly
        for name in sharded:
            assert local[name] * 4 <= full[name] + 64  # tp2 × ZeRO-3(2): a quarter (plus FSDP padding)
        losses = result["losses"]
        assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert all(r["losses"] == meta_results[0]["losses"] for r in meta_results)


def test_safetensors_checkpoint_loads_into_the_shards(meta_results):
    for result in meta_results:
        assert result["max_param_diff"] == 0.0
        assert result["loaded_loss"] == pytest.approx(result["eager_loss"], abs=1e-5)


# -- single process ------------------------------------------------------------------------------------------
def _half_shards(model: nn.Module, part: int) -> dict[str, LocalShard]:
    shards = {}
    for name, param in model.named_parameters():
        smap = ShardMap.whole(param.shape)
        if param.dim() == 2:
            half = param.shape[1] // 2
            smap = smap.restrict(1, part * half, half)
        shards[name] = LocalShard(torch.full(smap.local_shape, float("nan")), smap)
    return shards


def test_model_init_on_shards_follows_the_models_rules():
    with torch.device("meta"):
        model = _gpt2()
    first, second, again = _half_shards(model, 0), _half_shards(model, 1), _half_shards(model, 0)
    init_shards(model, first, seed=3)
    init_shards(model, second, seed=3)
    init_shards(model, again, seed=3)
    std = model.config.initializer_range
    for name in first:
        values = (
            torch.cat([first[name].tensor, second[name].tensor], dim=-1)
            if first[name].tensor.dim() == 2
            else first[name].tensor
        )
        assert torch.isfinite(values).all(), name
        assert torch.equal(first[name].tensor, again[name].tensor)  # replicas of a shard agree
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            assert torch.equal(values, torch.ones_like(values))
        elif name.endswith("bias"):
            assert torch.equal(values, torch.zeros_like(values))
        elif name.endswith("c_proj.weight"):  # GPT-2's scaled residual init, by the parent module's rule
            assert values.std().item() == pytest.approx(std / math.sqrt(2 * model.config.n_layer), rel=0.1)
        else:
            assert values.std().item() == pytest.approx(std, rel=0.1)
            assert not torch.equal(first[name].tensor, second[name].tensor)  # shards are not copies


def test_init_that_is_not_elementwise_or_leaves_a_shard_unset_is_refused():
    with torch.device("meta"):
        layer = nn.Linear(8, 8)
    shards = {"weight": LocalShard(torch.empty(4, 8), ShardMap.whole((8, 8)).restrict(0, 0, 4))}
    with pytest.raises(ConfigError, match="combines it with another tensor"):
        init_shards(layer, shards, init=lambda m: m.weight.add_(m.weight.flip(0)))
    with pytest.raises(ConfigError, match="did not set"):  # orthogonal_ does nothing on meta tensors
        init_shards(layer, shards, init=lambda m: nn.init.orthogonal_(m.weight))


def test_foreign_safetensors_are_refused(tmp_path):
    from safetensors.torch import save_file

    with torch.device("meta"):
        model = _gpt2()
    real = _gpt2()
    state = {k: v.contiguous() for k, v in real.state_dict().items() if k != "lm_head.weight"}
    save_file({k: v for k, v in state.items() if "h.1." not in k}, tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match="missing"):
        check_safetensors(tmp_path, model)
    state["transformer.wpe.weight"] = torch.zeros(16, 64)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match="wrong shapes"):
        check_safetensors(tmp_path, model)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="not a readable"):
        check_safetensors(tmp_path, model)
