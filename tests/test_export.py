"""export_pretrained: a model trained under any plan, written as a Hugging Face folder, loads with
``from_pretrained`` (no missing or unexpected keys) and with ``init="safetensors:DIR"``'s reader, holding exactly
the trained weights: its loss on a fresh batch is the trainer's ``eval_step``.

Fast tier: GPT-2 under pp2 × tp2 (the tied embedding and head on two stages, tensor-parallel shards, one file
per stage and an index) and LLaMA under ZeRO-3 (FSDP2 DTensors, one file), with a bf16 export and a folder
that cannot be written. Full tier: BERT under tp2 (two ties), GPT-2 with a vocabulary of 257 under vtp2
(vocabulary-parallel embedding and head: the padding row must not leak) and under pp2 × ZeRO-3.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import galvatron_fx
from galvatron_fx.errors import ConfigError
from galvatron_fx.models import build_model, example_batch
from galvatron_fx.runtime import spawn
from galvatron_fx.runtime.export import INDEX, export_pretrained
from galvatron_fx.runtime.safetensors_io import load_safetensors
from galvatron_fx.runtime.shard_maps import LocalShard, ShardMap

BATCH, SEQ = 8, 12


def _model(name: str, vocab: int | None):
    torch.manual_seed(0)
    if vocab is None:
        return build_model(name)[0]
    import transformers

    config = transformers.GPT2Config(
        n_layer=4, n_embd=64, n_head=4, vocab_size=vocab, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0
    )
    config.attn_pdrop, config.bos_token_id, config.eos_token_id = 0.0, 0, 0
    return transformers.GPT2LMHeadModel(config)


def _export_worker(rank: int, world: int, name: str, flags: dict, folder: str, vocab: int | None = None) -> dict:
    model = _model(name, vocab)
    batch = example_batch(name, model, BATCH, SEQ, seed=0)
    compiled = galvatron_fx.compile(model, example_kwargs=batch, plan=galvatron_fx.uniform_plan(**flags))
    for _ in range(2):
        compiled.train_step(batch)
    path = export_pretrained(compiled.trainer, folder, model.config)
    files = sorted(p.name for p in path.iterdir())  # complete on every rank when export_pretrained returns
    out = {
        "files": files,
        "eval": compiled.eval_step(example_batch(name, model, BATCH, SEQ, seed=1)),
        "params": compiled.trainer.full_parameters(),
    }
    if name == "llama":  # a bf16 copy, and a folder under a file: refused on every rank, none left waiting
        export_pretrained(compiled.trainer, f"{folder}-bf16", dtype=torch.bfloat16)
        blocker = Path(folder).parent / "a-file"
        if rank == 0:
            blocker.write_text("not a folder")
        dist.barrier()
        try:
            export_pretrained(compiled.trainer, blocker / "export")
            out["error"] = "exported"
        except ConfigError as error:
            out["error"] = str(error)
        dist.barrier()
    return out


def _auto_class(name: str):
    import transformers

    return transformers.AutoModelForMaskedLM if name == "bert" else transformers.AutoModelForCausalLM


def _check(tmp_path: Path, name: str, flags: dict, world: int, vocab: int | None = None) -> tuple[Path, list]:
    folder = tmp_path / f"{name}-export"
    results = spawn(_export_worker, world, name, flags, str(folder), vocab, timeout_s=500)
    assert all(r["files"] == results[0]["files"] for r in results)
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
    trained = {k: v for r in results for k, v in r["params"].items()}

    loaded, info = _auto_class(name).from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    for key, value in trained.items():
        assert torch.equal(loaded.get_parameter(key), value), key  # padding rows left out: shapes are the user's
    loaded.eval()
    with torch.no_grad():
        loss = float(loaded(**example_batch(name, loaded, BATCH, SEQ, seed=1)).loss)
    assert loss == pytest.approx(results[0]["eval"], abs=1e-5)

    # the reader of init="safetensors:DIR" takes the folder too
    other = _model(name, vocab)
    shards = {k: LocalShard(p.data, ShardMap.whole(p.shape)) for k, p in other.named_parameters()}
    load_safetensors(other, shards, folder)
    for key, param in other.named_parameters():
        assert torch.equal(param, loaded.get_parameter(key)), key
    return folder, results


def test_gpt2_pp2_tp2_one_file_per_stage_tied_weight_once(tmp_path):
    folder, _ = _check(tmp_path, "gpt2", dict(pp=2, tp=2, chunks=2), 4)
    index = json.loads((folder / INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert "lm_head.weight" not in index["weight_map"]  # tied: save_pretrained leaves it out too
    assert index["weight_map"]["transformer.wte.weight"] == files[0]  # written once, by the first stage
    assert index["weight_map"]["transformer.ln_f.weight"] == files[1]
    assert index["metadata"]["total_size"] == sum(
        p.numel() * p.element_size() for p in _model("gpt2", None).parameters()
    )
    assert (folder / "config.json").is_file()


def test_llama_zero3_one_file_bf16_and_unwritable_folder(tmp_path):
    from safetensors import safe_open

    folder, results = _check(tmp_path, "llama", dict(sdp=True), 2)
    assert results[0]["files"] == ["config.json", "model.safetensors"]
    with safe_open(str(tmp_path / "llama-export-bf16" / "model.safetensors"), "pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}
        assert handle.metadata() == {"format": "pt"}
    assert not (tmp_path / "llama-export-bf16" / "config.json").exists()  # no config given
    for result in results:
        assert "exporting" in result["error"] and "writable" in result["error"], result["error"]


@pytest.mark.full
def test_bert_tp2(tmp_path):
    _check(tmp_path, "bert", dict(tp=2), 2)


@pytest.mark.full
def test_gpt2_vocab_parallel_padding_does_not_leak(tmp_path):
    folder, results = _check(tmp_path, "gpt2", dict(vtp=2), 2, vocab=257)
    assert results[0]["params"]["lm_head.weight"].shape[0] == 257


@pytest.mark.full
def test_gpt2_pp2_zero3(tmp_path):
    _check(tmp_path, "gpt2", dict(pp=2, sdp=True, chunks=2), 4)
