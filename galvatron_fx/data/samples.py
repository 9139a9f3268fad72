"""Training samples from an indexed dataset, and the kwargs each built-in model family trains on.

``TokenSamples`` cuts the token stream (every document in order, each ending in its EOD token) into GPT-style
samples of ``seq + 1`` tokens that overlap by one, so that each sample holds ``seq`` inputs and their ``seq``
next tokens. The adapters turn one such sample into one sample of model kwargs; ``samples_for_model`` picks
the adapter for a built-in model name (``galvatron_fx.models``) or a model object.
"""

from __future__ import annotations

import functools
import inspect
import os

import numpy as np
import torch

from galvatron_fx.errors import ConfigError

from .images import ImageFolder
from .indexed import IndexedDataset
from .tokenizers import ByteTokenizer

MASK_FRACTION = 0.15  # BERT's: 15 % of positions predicted, of which 80 % masked, 10 % random, 10 % kept


class TokenSamples(torch.utils.data.Dataset):
    """Sample ``i`` = tokens ``[i*seq, i*seq + seq + 1)`` of the concatenated stream, as a LongTensor.

    ``len`` = ``(num_tokens - 1) // seq``: every token but the stream's last starts some position's input.
    A sample reads only the sequences it spans from the memory map.
    """

    def __init__(self, indexed: IndexedDataset | str | os.PathLike, seq: int):
        self.indexed = IndexedDataset(indexed) if isinstance(indexed, (str, os.PathLike)) else indexed
        if seq < 1:
            raise ConfigError(f"seq {seq} is not positive", "pass the model's sequence length")
        self.seq = seq
        if self.indexed.num_tokens < seq + 1:
            raise ConfigError(
                f"{self.indexed.prefix} holds {self.indexed.num_tokens} tokens, fewer than one sample of {seq + 1}",
                "preprocess more text, or use a shorter sequence",
            )
        # the stream offset at which each sequence starts; sequence j covers [starts[j], starts[j + 1])
        self.starts = np.zeros(len(self.indexed) + 1, dtype=np.int64)
        np.cumsum(self.indexed.sequence_lengths, dtype=np.int64, out=self.starts[1:])

    def __len__(self) -> int:
        return (self.indexed.num_tokens - 1) // self.seq

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        begin = (i % len(self)) * self.seq
        end = begin + self.seq + 1
        # the sequence holding `begin` (side="right" steps over empty sequences that start there too)
        j = int(np.searchsorted(self.starts, begin, side="right")) - 1
        parts, position = [], begin
        while position < end:
            offset = position - int(self.starts[j])
            length = min(int(self.starts[j + 1]) - position, end - position)
            if length > 0:
                parts.append(self.indexed.get(j, offset, length))
                position += length
            j += 1
        return torch.from_numpy(np.concatenate(parts).astype(np.int64))


def hf_causal(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """A Hugging Face causal LM (``GPT2LMHeadModel``, ``LlamaForCausalLM``): ``input_ids`` and ``labels`` are the
    sample's first ``seq`` tokens, and the model shifts the labels itself (position t predicts ``labels[t + 1]``),
    so the loss is the mean cross entropy of ``seq - 1`` next tokens, as in Transformers' own causal-LM training.
    (Transformers also reads ``shift_labels`` through the forward's ``**kwargs``, which would score all ``seq``;
    but ``torch.export`` cannot give a ``**kwargs`` input a symbolic batch, and capture would then fix the batch
    size of every plan.) Tensors are contiguous because the loss ``view``s them."""
    inputs = tokens[:-1].contiguous()
    return {"input_ids": inputs, "labels": inputs.clone()}


def plain_causal(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """A GPT that takes its targets unshifted (``examples/nanogpt/model.py``: ``forward(idx, targets)``)."""
    return {"idx": tokens[:-1].contiguous(), "targets": tokens[1:].contiguous()}


def masked_lm(
    tokens: torch.Tensor, index: int, vocab_size: int, mask_token_id: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """BERT: ``round(15 %)`` of the first ``seq`` positions are predicted; of those, 80 % read ``mask_token_id``,
    10 % a random token, 10 % themselves. ``labels`` is -100 at the other positions. The choice depends only on
    ``(seed, index)``, so every rank and every epoch masks sample ``index`` the same way."""
    inputs = tokens[:-1].clone()
    seq = len(inputs)
    rng = np.random.default_rng([seed, index])  # a seed sequence: distinct (seed, index) pairs never collide
    chosen = rng.permutation(seq)[: max(1, round(MASK_FRACTION * seq))]
    labels = torch.full_like(inputs, -100)
    labels[chosen] = inputs[chosen]
    roll = rng.random(len(chosen))
    masked, randomized = chosen[roll < 0.8], chosen[(roll >= 0.8) & (roll < 0.9)]
    inputs[masked] = mask_token_id
    inputs[randomized] = torch.from_numpy(rng.integers(0, vocab_size, len(randomized)))
    return {"input_ids": inputs, "labels": labels}


def prefix_lm_seq2seq(tokens: torch.Tensor, decoder_start_token_id: int) -> dict[str, torch.Tensor]:
    """T5 as a prefix LM: the encoder reads the first ``seq // 2`` tokens, the decoder predicts the next
    ``seq - seq // 2`` by teacher forcing (its inputs are the targets shifted right behind the start token).
    The targets are not in the encoder's input, so the decoder cannot copy them; the sample's last token is
    unused, so that both lengths depend on ``seq`` alone."""
    seq = len(tokens) - 1
    half = seq // 2
    labels = tokens[half:seq].contiguous()
    start = torch.tensor([decoder_start_token_id], dtype=tokens.dtype)
    return {
        "input_ids": tokens[:half].contiguous(),
        "decoder_input_ids": torch.cat([start, labels[:-1]]),
        "labels": labels,
    }


class ModelSamples(torch.utils.data.Dataset):
    """``adapter(samples[i], i)`` for each ``i``: one sample of model kwargs (collate them with the default)."""

    def __init__(self, samples: TokenSamples, adapter):
        self.samples, self.adapter = samples, adapter

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.adapter(self.samples[i], i)


class _TokensOnly:
    """An adapter that ignores the sample index; a class, not a lambda, so DataLoader workers can pickle it."""

    def __init__(self, adapter, **options):
        self.adapter, self.options = adapter, options

    def __call__(self, tokens: torch.Tensor, index: int) -> dict[str, torch.Tensor]:
        return self.adapter(tokens, **self.options)


_FAMILY = {"gpt2": "hf_causal", "llama": "hf_causal", "nanogpt": "plain_causal", "bert": "masked", "t5": "prefix"}


def _family(name_or_model) -> str:
    if isinstance(name_or_model, str):
        if name_or_model in _FAMILY:
            return _FAMILY[name_or_model]
        if name_or_model in ("vit", "swin"):
            return "image"
        raise ConfigError(f"model {name_or_model!r} has no token-sample adapter", f"use one of {sorted(_FAMILY)}")
    model = name_or_model
    config = getattr(model, "config", None)
    kind = type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        return "prefix"
    if kind.endswith("ForMaskedLM"):
        return "masked"
    if kind.endswith(("ForCausalLM", "LMHeadModel")):
        return "hf_causal"
    if kind.endswith("ForImageClassification"):
        return "image"
    if {"idx", "targets"} <= set(inspect.signature(model.forward).parameters):
        return "plain_causal"
    raise ConfigError(
        f"{kind} is not a causal, masked or encoder-decoder LM this module knows",
        "wrap TokenSamples with your own adapter in ModelSamples",
    )


def samples_for_model(
    name_or_model,
    dataset,
    seq: int,
    seed: int = 0,
    *,
    vocab_size: int | None = None,
    mask_token_id: int | None = None,
    decoder_start_token_id: int | None = None,
) -> torch.utils.data.Dataset:
    """A Dataset of kwargs dicts for a built-in model name (``gpt2``, ``llama``, ``nanogpt``, ``bert``, ``t5``)
    or a model object, cut from ``dataset`` (an ``IndexedDataset`` or its prefix) in samples of ``seq``.

    ``vocab_size`` (BERT's random replacements), ``mask_token_id`` and ``decoder_start_token_id`` default to
    the model's config where a model is given, else to the byte tokenizer's 256 / 0xFF and T5's 0 (pad).
    ``vit`` and ``swin`` take images, not tokens: an image folder (``ROOT/<class>/<image>``, read by
    ``images.ImageFolder`` at the model's image size), or a map-style Dataset whose items are
    ``{"pixel_values": (C, H, W) float, "labels": int}`` dicts, checked and returned as it is. Batch the result
    with ``torch.utils.data.DataLoader`` (or ``compiled.data_loader``); decoders also need ``use_cache=False``
    added to each batch (``compiled.train_step`` adds the non-tensor kwargs the model was compiled with).
    """
    family = _family(name_or_model)
    if family == "image":
        return _image_dataset(name_or_model, dataset)
    if not isinstance(dataset, (IndexedDataset, str, os.PathLike)):
        raise ConfigError(
            f"a token model needs an IndexedDataset or its prefix, got {type(dataset).__name__}",
            "preprocess the text with `galvatron-fx preprocess-data` and pass the prefix",
        )
    samples = TokenSamples(dataset, seq)
    config = getattr(name_or_model, "config", None)
    if family == "hf_causal":
        return ModelSamples(samples, _TokensOnly(hf_causal))
    if family == "plain_causal":
        return ModelSamples(samples, _TokensOnly(plain_causal))
    if family == "masked":
        vocab = vocab_size or getattr(config, "vocab_size", None) or ByteTokenizer.vocab_size
        mask = mask_token_id if mask_token_id is not None else getattr(config, "mask_token_id", None)
        mask = ByteTokenizer.mask if mask is None else mask
        return ModelSamples(samples, functools.partial(masked_lm, vocab_size=vocab, mask_token_id=mask, seed=seed))
    start = decoder_start_token_id
    start = getattr(config, "decoder_start_token_id", None) if start is None else start
    start = 0 if start is None else start
    return ModelSamples(samples, _TokensOnly(prefix_lm_seq2seq, decoder_start_token_id=start))


def _image_dataset(name_or_model, dataset):
    name = name_or_model if isinstance(name_or_model, str) else type(name_or_model).__name__
    remedy = "pass a map-style Dataset of {'pixel_values': (C, H, W) tensor, 'labels': int} dicts"
    if isinstance(dataset, (str, os.PathLike)) and os.path.isdir(dataset):  # an image folder
        config = getattr(name_or_model, "config", None)
        if config is None:
            raise ConfigError(f"{name}: an image folder needs the model, for its image size", "pass the model")
        return ImageFolder(dataset, config.image_size, config.num_channels)
    if isinstance(dataset, (IndexedDataset, str, os.PathLike)) or not hasattr(dataset, "__getitem__"):
        raise ConfigError(f"{name} classifies images and cannot train on a token dataset", remedy)
    first = dataset[0]
    if not isinstance(first, dict) or not {"pixel_values", "labels"} <= set(first):
        raise ConfigError(f"{name}'s dataset items must hold 'pixel_values' and 'labels'", remedy)
    return dataset
