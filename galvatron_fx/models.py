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

Builder = Callable[[str, int, int], "tuple[torch.nn.Module, dict[str, Any]]"]


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("this model needs the transformers package", "pip install 'galvatron-fx[hf]'") from None
    transformers.logging.set_verbosity_error()
    return transformers


def _tokens(vocab: int, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (batch, seq))
    return ids, torch.roll(ids, -1, dims=1)


def _gpt2(size: str, batch: int, seq: int):
    T = _transformers()
    shape = dict(n_layer=4, n_embd=64, n_head=4, vocab_size=256, n_positions=128) if size == "small" else {}
    config = T.GPT2Config(**shape, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    ids, labels = _tokens(config.vocab_size, batch, seq)
    return T.GPT2LMHeadModel(config), {"input_ids": ids, "labels": labels.clone(), "use_cache": False}


def _llama(size: str, batch: int, seq: int):
    T = _transformers()
    shape = (dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=128)
             if size == "small" else
             dict(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                  intermediate_size=11008, max_position_embeddings=4096, rms_norm_eps=1e-6))
    config = T.LlamaConfig(**shape, attention_dropout=0.0)
    ids, labels = _tokens(config.vocab_size, batch, seq)
    return T.LlamaForCausalLM(config), {"input_ids": ids, "labels": labels, "use_cache": False}


def _bert(size: str, batch: int, seq: int):
    T = _transformers()
    shape = (dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                  max_position_embeddings=128) if size == "small" else {})
    config = T.BertConfig(**shape, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids, labels = _tokens(config.vocab_size, batch, seq)
    return T.BertForMaskedLM(config), {"input_ids": ids, "labels": labels}


def _t5(size: str, batch: int, seq: int):
    T = _transformers()
    shape = (dict(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=3, num_decoder_layers=3, num_heads=4)
             if size == "small" else {})
    config = T.T5Config(**shape, dropout_rate=0.0, decoder_start_token_id=0)
    ids, labels = _tokens(config.vocab_size, batch, seq)
    return T.T5ForConditionalGeneration(config), {
        "input_ids": ids, "decoder_input_ids": labels.clone(), "labels": labels, "use_cache": False}


def _vit(size: str, batch: int, seq: int):
    T = _transformers()
    shape = (dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=128) if size == "small" else {})
    config = T.ViTConfig(**shape, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    pixels = torch.randn(batch, 3, config.image_size, config.image_size)
    return T.ViTForImageClassification(config), {"pixel_values": pixels, "labels": torch.randint(0, 10, (batch,))}


def _swin(size: str, batch: int, seq: int):
    T = _transformers()
    shape = (dict(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2, 2], num_heads=[2, 2, 4], window_size=4)
             if size == "small" else {})
    config = T.SwinConfig(**shape, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0)
    pixels = torch.randn(batch, 3, config.image_size, config.image_size)
    return T.SwinForImageClassification(config), {"pixel_values": pixels, "labels": torch.randint(0, 10, (batch,))}


def _nanogpt(size: str, batch: int, seq: int):
    path = Path(__file__).resolve().parent.parent / "examples" / "nanogpt" / "model.py"
    return load_entry_point(f"{path}:build")(size="small" if size == "small" else "gpt2", batch=batch, seq=seq)


MODELS: dict[str, Builder] = {
    "gpt2": _gpt2, "llama": _llama, "bert": _bert, "t5": _t5, "vit": _vit, "swin": _swin, "nanogpt": _nanogpt,
}


def build_model(name: str, size: str = "small", batch: int = 4, seq: int = 32):
    """``(model, example_kwargs)`` for a built-in name or an entry point (see module docstring)."""
    if size not in ("small", "real"):
        raise ConfigError(f"size {size!r} is unknown", "use 'small' or 'real'")
    if name in MODELS:
        return MODELS[name](size, batch, seq)
    if ":" in name:
        return load_entry_point(name)()
    raise ConfigError(f"model {name!r} is unknown", f"use one of {sorted(MODELS)} or an entry point 'module:function'")


def load_entry_point(spec: str) -> Callable[..., Any]:
    """``package.module:function`` or ``path/to/file.py:function`` → the function."""
    target, _, attribute = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            module_spec = importlib.util.spec_from_file_location(Path(target).stem, target)
            if module_spec is None or module_spec.loader is None:
                raise ImportError(target)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        return getattr(module, attribute)
    except (ImportError, AttributeError, FileNotFoundError) as error:
        raise ConfigError(f"cannot load entry point {spec!r}: {error}", "give 'package.module:function' or 'file.py:function'") from None
