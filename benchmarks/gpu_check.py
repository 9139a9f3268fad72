"""One GPU, end to end: ``compile()`` on GPT-2 and LLaMA at sizes that fill the device, against plain PyTorch.

For each model, with activation checkpointing off and on, in one process on one GPU (NCCL, world 1):
- eager PyTorch: the model under bf16 autocast with Adam, and the same model ``torch.compile``d;
- ours: ``galvatron_fx.compile(model, plan=uniform_plan(ckpt=...), mixed_precision="bf16",
  compile_layers=True)`` from the same initial weights.
Printed per run: the first step's loss of ours against eager's (the same weights and data: equal up to bf16
rounding), median step time, MFU (graph-counted model FLOPs over the bf16 dense peak of the device preset;
recomputation not counted) of ours, eager and compiled eager, and the cost model's predicted peak memory
against ``torch.cuda.max_memory_allocated`` over a step. Sized to finish in a few minutes on an H100/H200.

    python benchmarks/gpu_check.py                 # both models, checkpointing off and on
    python benchmarks/gpu_check.py --models llama --steps 5
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.common import device_peak_flops, model_flops_per_sample

# (config kwargs, global batch, sequence length): about 0.35 B (GPT-2) and 1.2 B (LLaMA) parameters
SIZES = {
    "gpt2": (dict(n_layer=24, n_embd=1024, n_head=16, n_positions=1024, vocab_size=50304), 16, 1024),
    "llama": (
        dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=8,
            vocab_size=32000,
            max_position_embeddings=2048,
        ),
        8,
        2048,
    ),
}


def build(name: str):
    import transformers

    config_kwargs, batch, seq = SIZES[name]
    torch.manual_seed(0)
    if name == "gpt2":
        config = transformers.GPT2Config(**config_kwargs, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(config)
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_kwargs, attention_dropout=0.0))
    ids = torch.randint(0, config_kwargs["vocab_size"], (batch, seq))
    return model, {"input_ids": ids, "labels": ids, "use_cache": False}


def timed(step, steps: int, warmup: int) -> tuple[float, float]:
    """(first call's result, median seconds of ``steps`` calls after ``warmup`` more)."""
    first = step()
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def eager_step(model, batch, compiled: bool, ckpt: bool):
    model = copy.deepcopy(model).cuda()
    if ckpt:
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    forward = torch.compile(model) if compiled else model

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = forward(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step


def check(name: str, ckpt: bool, steps: int, warmup: int) -> dict:
    import galvatron_fx

    model, batch = build(name)
    batch_gpu = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    row = {"model": name, "ckpt": ckpt, "params_M": sum(p.numel() for p in model.parameters()) / 1e6}
    for label, compiled in (("eager", False), ("torch.compile", True)):
        row[f"{label} loss"], row[f"{label} s"] = timed(eager_step(model, batch_gpu, compiled, ckpt), steps, warmup)
        gc.collect(), torch.cuda.empty_cache()
    ours = galvatron_fx.compile(
        copy.deepcopy(model),
        None,
        example_kwargs=batch,
        plan=galvatron_fx.uniform_plan(ckpt=ckpt),
        mixed_precision="bf16",
        compile_layers=True,
        lr=1e-5,
    )
    first = float(ours.train_step(batch))
    for _ in range(warmup):
        ours.train_step(batch)
    torch.cuda.reset_peak_memory_stats()
    _, row["ours s"] = timed(lambda: ours.train_step(batch), steps, 0)
    row["ours loss"] = first
    row["measured peak GiB"] = torch.cuda.max_memory_allocated() / 2**30
    row["predicted peak GiB"] = ours.cost_model.evaluate(ours.plan).memory_bytes_per_stage[0] / 2**30
    flops = model_flops_per_sample(ours.cost_model.model) * batch["input_ids"].shape[0]
    peak, source = device_peak_flops("bf16")
    for label in ("ours", "eager", "torch.compile"):
        row[f"{label} MFU %"] = 100 * flops / row[f"{label} s"] / peak
    row["peak source"] = source
    row["loss diff"] = abs(row["ours loss"] - row["eager loss"])
    ours = None  # its memory goes before the next run
    gc.collect(), torch.cuda.empty_cache()
    return row


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="gpt2,llama")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA device")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    rows = []
    for name in args.models.split(","):
        for ckpt in (False, True):
            row = check(name, ckpt, args.steps, args.warmup)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(
        "\n| model | ckpt | params M | loss ours / eager | ours ms | eager ms | compiled eager ms | MFU ours / eager / "
        "compiled % | peak predicted / measured GiB |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['model']} | {r['ckpt']} | {r['params_M']:.0f} | {r['ours loss']:.4f} / {r['eager loss']:.4f} | "
            f"{r['ours s'] * 1e3:.1f} | {r['eager s'] * 1e3:.1f} | {r['torch.compile s'] * 1e3:.1f} | "
            f"{r['ours MFU %']:.1f} / {r['eager MFU %']:.1f} / {r['torch.compile MFU %']:.1f} | "
            f"{r['predicted peak GiB']:.1f} / {r['measured peak GiB']:.1f} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
