"""Example models by name, built from configs with random weights (nothing is downloaded).

``build_model("gpt2", size="small")`` returns ``(model, example_kwargs)``. Sizes: ``small`` for CPU tests
and demos, ``real`` for the published configuration (build it under ``torch.device("meta")`` to plan
for it without memory). A name may also be an entry point, ``package.module:function`` or
``path/to/file.py:function``, returning the same pair.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import ConfigError


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("this model needs the transformers package", "pip install 'galvatron-fx[hf]'") from None
    transformers.logging.set_verbosity_error()
    return transformers


def _tokens(vocab: int, batch: int, seq: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    return ids, torch.roll(ids, -1, dims=1)


def _images(config, batch: int, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    size = config.image_size
    return {
        "pixel_values": torch.randn(batch, config.num_channels, size, size, generator=generator),
        "labels": torch.randint(0, config.num_labels, (batch,), generator=generator),
    }


def _gpt2(size: str):
    T = _transformers()
    shape = dict(n_layer=4, n_embd=64, n_head=4, vocab_size=256, n_positions=128) if size == "small" else {}
    config = T.GPT2Config(**shape, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return T.GPT2LMHeadModel(config)


def _causal_batch(model, batch: int, seq: int, generator=None):
    ids, labels = _tokens(model.config.vocab_size, batch, seq, generator)
    return {"input_ids": ids, "labels": labels, "use_cache": False}


def _llama(size: str):
    T = _transformers()
    shape = (
        dict(
            vocab_size=256,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=128,
        )
        if size == "small"
        else dict(
            vocab_size=32000,
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            intermediate_size=11008,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
        )
    )
    return T.LlamaForCausalLM(T.LlamaConfig(**shape, attention_dropout=0.0))


def _bert(size: str):
    T = _transformers()
    shape = (
        dict(
            vocab_size=256,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=128,
        )
        if size == "small"
        else {}
    )
    return T.BertForMaskedLM(T.BertConfig(**shape, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def _masked_batch(model, batch: int, seq: int, generator=None):
    ids, labels = _tokens(model.config.vocab_size, batch, seq, generator)
    return {"input_ids": ids, "labels": labels}


def _t5(size: str):
    T = _transformers()
    shape = (
        dict(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=3, num_decoder_layers=3, num_heads=4)
        if size == "small"
        else {}
    )
    return T.T5ForConditionalGeneration(T.T5Config(**shape, dropout_rate=0.0, decoder_start_token_id=0))


def _seq2seq_batch(model, batch: int, seq: int, generator=None):
    ids, labels = _tokens(model.config.vocab_size, batch, seq, generator)
    start = torch.full((batch, 1), model.config.decoder_start_token_id, dtype=labels.dtype)
    decoder_input_ids = torch.cat([start, labels[:, :-1]], dim=1)  # teacher forcing: labels shifted right
    return {"input_ids": ids, "decoder_input_ids": decoder_input_ids, "labels": labels, "use_cache": False}


def _vit(size: str):
    T = _transformers()
    shape = (
        dict(
            image_size=32,
            patch_size=8,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=128,
        )
        if size == "small"
        else {}
    )
    return T.ViTForImageClassification(
        T.ViTConfig(**shape, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    )


def _swin(size: str):
    T = _transformers()
    shape = (
        dict(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2, 2], num_heads=[2, 2, 4], window_size=4)
        if size == "small"
        else {}
    )
    return T.SwinForImageClassification(
        T.SwinConfig(
            **shape, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0
        )
    )


def _image_batch(model, batch: int, seq: int, generator=None):
    return _images(model.config, batch, generator)


def _nanogpt(size: str):
    module = _load_file(Path(__file__).resolve().parent.parent / "examples" / "nanogpt" / "model.py")
    config = (
        module.GPTConfig()
        if size == "small"
        else module.GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768)
    )
    return module.GPT(config)


def _nanogpt_batch(model, batch: int, seq: int, generator=None):
    idx, targets = _tokens(model.config.vocab_size, batch, min(seq, model.config.block_size), generator)
    return {"idx": idx, "targets": targets}


# name → (builds the model from a size, builds a batch of kwargs for that model)
MODELS: dict[str, tuple[Callable[[str], torch.nn.Module], Callable[..., dict[str, Any]]]] = {
    "gpt2": (_gpt2, _causal_batch),
    "llama": (_llama, _causal_batch),
    "bert": (_bert, _masked_batch),
    "t5": (_t5, _seq2seq_batch),
    "vit": (_vit, _image_batch),
    "swin": (_swin, _image_batch),
    "nanogpt": (_nanogpt, _nanogpt_batch),
}


def build_model(name: str, size: str = "small", batch: int = 4, seq: int = 32):
    """``(model, example_kwargs)`` for a built-in name or an entry point (see module docstring)."""
    if size not in ("small", "real"):
        raise ConfigError(f"size {size!r} is unknown", "use 'small' or 'real'")
    if name in MODELS:
        model = MODELS[name][0](size)
        return model, MODELS[name][1](model, batch, seq)
    if ":" in name:
        return load_entry_point(name)()
    raise ConfigError(f"model {name!r} is unknown", f"use one of {sorted(MODELS)} or an entry point 'module:function'")


def example_batch(name: str, model: torch.nn.Module, batch: int, seq: int = 32, seed: int = 0) -> dict[str, Any]:
    """A batch of kwargs for a built-in model, drawn from ``seed`` (the same on every rank)."""
    if name not in MODELS:
        raise ConfigError(f"model {name!r} has no batch builder", f"use one of {sorted(MODELS)}")
    return MODELS[name][1](model, batch, seq, torch.Generator().manual_seed(seed))


def _load_file(path: Path):
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(str(path))
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def load_entry_point(spec: str) -> Callable[..., Any]:
    """``package.module:function`` or ``path/to/file.py:function`` → the function."""
    target, _, attribute = spec.rpartition(":")
    try:
        module = _load_file(Path(target)) if target.endswith(".py") else importlib.import_module(target)
        return getattr(module, attribute)
    except (ImportError, AttributeError, FileNotFoundError) as error:
        raise ConfigError(
            f"cannot load entry point {spec!r}: {error}", "give 'package.module:function' or 'file.py:function'"
        ) from None
