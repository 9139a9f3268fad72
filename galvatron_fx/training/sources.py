"""What a run trains: the model (a built-in name, a Hugging Face ``config.json``, or an entry point) and its
data (an indexed dataset prefix, or synthetic samples), split into training and held-out evaluation samples."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from galvatron_fx.data import samples_for_model
from galvatron_fx.errors import ConfigError
from galvatron_fx.models import MODELS, build_model, example_batch

# model_type of a config.json → the transformers auto class that adds the built-in family's head and loss
_AUTO_CLASS = {
    "bert": "AutoModelForMaskedLM",
    "t5": "AutoModelForSeq2SeqLM",
    "vit": "AutoModelForImageClassification",
    "swin": "AutoModelForImageClassification",
}


@dataclass
class RunModel:
    """The model a run trains, its name for the data adapters, and one example global batch."""

    model: torch.nn.Module
    name: str
    example: dict[str, Any]


def load_model(spec: str, size: str, global_batch: int, seq: int) -> RunModel:
    """``spec``: a built-in name (at ``size``), a ``config.json`` path of an architecture the built-ins cover
    (GPT-2, LLaMA and other causal LMs, BERT, T5, ViT, Swin; random weights), or an entry point
    ``module:function`` / ``file.py:function`` returning ``(model, example_kwargs)``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if spec.endswith(".json"):
            model = _from_config(Path(spec))
            return RunModel(model, spec, _example_for(model, global_batch, seq))
        model, example = build_model(spec, size=size, batch=global_batch, seq=seq)
    return RunModel(model, spec, example)


def _from_config(path: Path) -> torch.nn.Module:
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "a config.json model needs the transformers package", "pip install 'galvatron-fx[hf]'"
        ) from None
    try:
        model_type = json.loads(path.read_text()).get("model_type")
        config = transformers.AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read the model config {path}: {error}", "give a Hugging Face config.json") from None
    auto = getattr(transformers, _AUTO_CLASS.get(model_type, "AutoModelForCausalLM"))
    try:
        return auto.from_config(config)
    except ValueError as error:
        raise ConfigError(
            f"{path}: model_type {model_type!r} has no {auto.__name__} ({error})",
            "use a causal LM, BERT, T5, ViT or Swin config, or an entry point returning (model, example_kwargs)",
        ) from None


def _example_for(model: torch.nn.Module, batch: int, seq: int) -> dict[str, Any]:
    """A synthetic batch for a config-built model, from the built-in family it belongs to."""
    model_type = getattr(model.config, "model_type", "")
    family = model_type if model_type in MODELS else "gpt2"
    return example_batch(family, model, batch, seq)


class BatchRows(torch.utils.data.Dataset):
    """The rows of batches of kwargs as one dataset: sample ``i`` is row ``i`` of every batched tensor.
    Values without a batch dimension (``use_cache=False``) are left out: the compiled model adds them."""

    def __init__(self, batches: list[dict[str, Any]]):
        keys = [k for k, v in batches[0].items() if isinstance(v, torch.Tensor) and v.dim() > 0]
        self.columns = {k: torch.cat([b[k] for b in batches]) for k in keys}
        self.length = len(next(iter(self.columns.values())))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[index] for k, v in self.columns.items()}


def load_data(run_model: RunModel, data: str | None, seq: int, synthetic_batches: int, seed: int):
    """The dataset of model kwargs: ``data`` (an indexed dataset prefix, ``PREFIX.bin`` + ``PREFIX.idx``, cut
    into samples of ``seq`` for the model's family; or an image folder for an image classifier), or
    ``synthetic_batches`` random global batches."""
    if data is not None:
        if not os.path.isdir(data) and not os.path.exists(f"{data}.idx"):
            raise ConfigError(
                f"--data {data}: neither an image folder nor an indexed dataset ({data}.idx does not exist)",
                "give the prefix that `galvatron-fx preprocess-data --output-prefix` wrote, or ROOT/<class>/<image>",
            )
        return samples_for_model(run_model.model, data, seq, seed)
    batch = len(next(v for v in run_model.example.values() if isinstance(v, torch.Tensor)))
    if run_model.name in MODELS:
        batches = [example_batch(run_model.name, run_model.model, batch, seq, seed=i) for i in range(synthetic_batches)]
    else:
        batches = [run_model.example]
    return BatchRows(batches)


def split_eval(dataset, eval_samples: int, global_batch: int):
    """(training samples, the last ``eval_samples`` held out for evaluation, or None)."""
    if eval_samples <= 0:
        return dataset, None
    if eval_samples % global_batch or len(dataset) - eval_samples < global_batch:
        raise ConfigError(
            f"{eval_samples} held-out samples from {len(dataset)}, in global batches of {global_batch}",
            "hold out a multiple of the global batch and leave at least one global batch to train on "
            "(--eval-samples), or give --eval-data",
        )
    cut = len(dataset) - eval_samples
    return torch.utils.data.Subset(dataset, range(cut)), torch.utils.data.Subset(dataset, range(cut, len(dataset)))
