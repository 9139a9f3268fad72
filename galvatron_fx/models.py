"""Example models by name, built from configs with random weights (nothing is downloaded).

``build_model("gpt2", size="small")`` returns ``(model, example_kwargs)``. Sizes: ``small`` for CPU tests
and demos, ``real`` for the published configuration (build it under ``torch.device("meta")`` to plan
for it without memory). A name may also be an entry point, ``package.module:function`` or
``path/to/file.py:function``, returning the same pair.

Size presets in Galvatron's family names (``PRESETS``: ``llama-7b`` ... ``llama-70b``, ``gpt-1.5b``,
``gpt-2.7b``, ``gpt-6.7b``, ``bert-base`` / ``-large`` / ``-huge``, ``t5-base`` / ``-large``, ``vit-base`` /
``-large`` / ``-huge``, ``swin-base`` / ``-large`` / ``-huge``) build the published shape of each size with
the plain name's model class; ``size`` does not apply to them, and ``build_preset(..., num_layers=N)`` changes
their layer count. Build them under ``torch.device("meta")`` to plan without memory.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ModelPreset:
    """A published model size. ``family``: the plain built-in name whose model class and batch builder it uses;
    ``layers``: transformer blocks (T5: in each of its two stacks; Swin: in its four stages together);
    ``heads``, ``ffn``: attention heads and feed-forward width (Swin: of its first stage); ``vocab``: 0 for
    image models; ``positions``: the published context, which a learned position table grows past when a longer
    sequence is asked for; ``depths`` / ``stage_heads``: Swin's blocks and heads per stage."""

    family: str
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int = 0
    kv_heads: int | None = None
    positions: int = 0
    image_size: int = 224
    patch_size: int = 16
    depths: tuple[int, ...] = ()
    stage_heads: tuple[int, ...] = ()


def _swin_preset(embed_dim: int, depths: tuple[int, ...], stage_heads: tuple[int, ...]) -> ModelPreset:
    return ModelPreset(
        "swin",
        embed_dim,
        sum(depths),
        stage_heads[0],
        4 * embed_dim,
        patch_size=4,
        depths=depths,
        stage_heads=stage_heads,
    )


# Galvatron's model names → the published shapes (hidden, layers, heads, ffn, vocab). LLaMA 7B/13B/30B are
# LLaMA-1's, 70B is LLaMA-2's (grouped-query attention, 8 key-value heads); GPT 2.7B/6.7B are GPT-3's sizes and
# GPT 1.5B is GPT-2 XL's width and depth with Galvatron's 32 heads of 50 (the released GPT-2 XL has 25 of 64,
# which no tensor-parallel degree above 1 divides); BERT huge is Galvatron's 1280 × 32; ViT huge uses 14-pixel
# patches; Swin huge is Galvatron's 320-wide, 32-block configuration.
PRESETS: dict[str, ModelPreset] = {
    "llama-7b": ModelPreset("llama", 4096, 32, 32, 11008, 32000, positions=2048),
    "llama-13b": ModelPreset("llama", 5120, 40, 40, 13824, 32000, positions=2048),
    "llama-30b": ModelPreset("llama", 6656, 60, 52, 17920, 32000, positions=2048),
    "llama-70b": ModelPreset("llama", 8192, 80, 64, 28672, 32000, kv_heads=8, positions=4096),
    "gpt-1.5b": ModelPreset("gpt2", 1600, 48, 32, 6400, 50257, positions=1024),
    "gpt-2.7b": ModelPreset("gpt2", 2560, 32, 32, 10240, 50257, positions=2048),
    "gpt-6.7b": ModelPreset("gpt2", 4096, 32, 32, 16384, 50257, positions=2048),
    "bert-base": ModelPreset("bert", 768, 12, 12, 3072, 30522, positions=512),
    "bert-large": ModelPreset("bert", 1024, 24, 16, 4096, 30522, positions=512),
    "bert-huge": ModelPreset("bert", 1280, 32, 16, 5120, 30522, positions=512),
    "t5-base": ModelPreset("t5", 768, 12, 12, 3072, 32128, positions=512),
    "t5-large": ModelPreset("t5", 1024, 24, 16, 4096, 32128, positions=512),
    "vit-base": ModelPreset("vit", 768, 12, 12, 3072),
    "vit-large": ModelPreset("vit", 1024, 24, 16, 4096),
    "vit-huge": ModelPreset("vit", 1280, 32, 16, 5120, patch_size=14),
    "swin-base": _swin_preset(128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "swin-large": _swin_preset(192, (2, 2, 18, 2), (6, 12, 24, 48)),
    "swin-huge": _swin_preset(320, (2, 2, 26, 2), (10, 20, 40, 80)),
}


def _preset_model(preset: ModelPreset, seq: int, layers: int) -> torch.nn.Module:
    T = _transformers()
    family = preset.family
    if family == "llama":
        config = T.LlamaConfig(
            vocab_size=preset.vocab,
            hidden_size=preset.hidden,
            num_hidden_layers=layers,
            num_attention_heads=preset.heads,
            num_key_value_heads=preset.kv_heads or preset.heads,
            intermediate_size=preset.ffn,
            max_position_embeddings=max(preset.positions, seq),
            rms_norm_eps=1e-6,
            attention_dropout=0.0,
        )
        return T.LlamaForCausalLM(config)
    if family == "gpt2":
        config = T.GPT2Config(
            n_embd=preset.hidden,
            n_layer=layers,
            n_head=preset.heads,
            n_inner=preset.ffn,
            vocab_size=preset.vocab,
            n_positions=max(preset.positions, seq),
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        return T.GPT2LMHeadModel(config)
    if family == "bert":
        config = T.BertConfig(
            vocab_size=preset.vocab,
            hidden_size=preset.hidden,
            num_hidden_layers=layers,
            num_attention_heads=preset.heads,
            intermediate_size=preset.ffn,
            max_position_embeddings=max(preset.positions, seq),
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        return T.BertForMaskedLM(config)
    if family == "t5":
        config = T.T5Config(
            vocab_size=preset.vocab,
            d_model=preset.hidden,
            d_kv=preset.hidden // preset.heads,
            d_ff=preset.ffn,
            num_layers=layers,
            num_decoder_layers=layers,
            num_heads=preset.heads,
            dropout_rate=0.0,
            decoder_start_token_id=0,
        )
        return T.T5ForConditionalGeneration(config)
    if family == "vit":
        config = T.ViTConfig(
            image_size=preset.image_size,
            patch_size=preset.patch_size,
            hidden_size=preset.hidden,
            num_hidden_layers=layers,
            num_attention_heads=preset.heads,
            intermediate_size=preset.ffn,
            num_labels=1000,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        return T.ViTForImageClassification(config)
    others = sum(preset.depths) - preset.depths[2]
    config = T.SwinConfig(
        image_size=preset.image_size,
        patch_size=preset.patch_size,
        embed_dim=preset.hidden,
        depths=[*preset.depths[:2], layers - others, *preset.depths[3:]],
        num_heads=list(preset.stage_heads),
        window_size=7,
        num_labels=1000,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
    )
    return T.SwinForImageClassification(config)


def build_preset(name: str, batch: int = 4, seq: int = 32, num_layers: int | None = None):
    """``(model, example_kwargs)`` for a size preset (``PRESETS``), with ``num_layers`` layers instead of the
    published count where given (T5: in each stack; Swin: in all, its third stage taking what the others,
    kept as published, do not)."""
    if name not in PRESETS:
        raise ConfigError(f"size preset {name!r} is unknown", f"use one of {', '.join(PRESETS)}")
    preset = PRESETS[name]
    layers = preset.layers if num_layers is None else num_layers
    least = 1 + (sum(preset.depths) - preset.depths[2] if preset.depths else 0)
    if not isinstance(layers, int) or layers < least:
        raise ConfigError(f"num_layers={num_layers!r} is too small for {name}", f"give at least {least} layers")
    model = _preset_model(preset, seq, layers)
    return model, MODELS[preset.family][1](model, batch, seq)


def build_model(name: str, size: str = "small", batch: int = 4, seq: int = 32):
    """``(model, example_kwargs)`` for a built-in name, a size preset (``PRESETS``; ``size`` does not apply) or
    an entry point (see module docstring)."""
    if size not in ("small", "real"):
        raise ConfigError(f"size {size!r} is unknown", "use 'small' or 'real'")
    if name in MODELS:
        model = MODELS[name][0](size)
        return model, MODELS[name][1](model, batch, seq)
    if name in PRESETS:
        return build_preset(name, batch=batch, seq=seq)
    if ":" in name:
        return load_entry_point(name)()
    raise ConfigError(
        f"model {name!r} is unknown",
        f"use one of {sorted(MODELS)}, a size preset ({', '.join(PRESETS)}) or an entry point 'module:function'",
    )


def example_batch(name: str, model: torch.nn.Module, batch: int, seq: int = 32, seed: int = 0) -> dict[str, Any]:
    """A batch of kwargs for a built-in model or size preset, drawn from ``seed`` (the same on every rank)."""
    family = PRESETS[name].family if name in PRESETS else name
    if family not in MODELS:
        raise ConfigError(f"model {name!r} has no batch builder", f"use one of {sorted(MODELS)} or a size preset")
    return MODELS[family][1](model, batch, seq, torch.Generator().manual_seed(seed))


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
