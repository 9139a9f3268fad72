"""Tokenizers for ``preprocess_jsonl``: a byte tokenizer that needs nothing, or a Hugging Face tokenizer by name.

Both offer ``encode(text) -> list[int]``, ``vocab_size`` and ``eod`` (the end-of-document token appended after
each document), which is all preprocessing needs.
"""

from __future__ import annotations

from typing import Protocol

from galvatron_fx.errors import ConfigError


class Tokenizer(Protocol):
    vocab_size: int
    eod: int

    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, ``eod`` = 0.

    NUL (0) serves as end-of-document because text does not contain it (a NUL inside a text still encodes
    as 0 and reads as a document boundary). Bytes 0xC0, 0xC1 and 0xF5-0xFF never occur in UTF-8, so
    ``mask`` = 0xFF is a spare id for masked-LM training that no text produces. The built-in small models
    have a vocabulary of exactly 256, so they train on these tokens as they are.
    """

    name = "byte"
    vocab_size = 256
    eod = 0
    mask = 0xFF

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, tokens) -> str:
        """The text of ``tokens``; ids that are not valid UTF-8 (the mask) decode as U+FFFD."""
        return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A Hugging Face tokenizer; ``eod`` is its end-of-sequence token, ``vocab_size`` includes added tokens."""

    def __init__(self, tokenizer, name: str):
        self.tokenizer = tokenizer
        self.name = name
        self.vocab_size = len(tokenizer)
        if tokenizer.eos_token_id is None:
            raise ConfigError(
                f"tokenizer {name!r} has no end-of-sequence token to end documents with",
                "choose a tokenizer with an eos token, or preprocess with append_eod=False",
            )
        self.eod = int(tokenizer.eos_token_id)
        self.mask = tokenizer.mask_token_id

    def encode(self, text: str) -> list[int]:
        # special tokens as the tokenizer adds them by default (BOS for LLaMA, none for GPT-2), as Megatron's
        # HuggingFaceTokenizer tokenizes
        return list(self.tokenizer(text)["input_ids"])

    def decode(self, tokens) -> str:
        return self.tokenizer.decode([int(t) for t in tokens])

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size}, eod={self.eod})"


def load_tokenizer(spec: str = "byte"):
    """``"byte"`` → ``ByteTokenizer``; anything else is a Hugging Face name or local folder loaded with
    ``transformers.AutoTokenizer.from_pretrained`` (a name not in the local cache is downloaded)."""
    if spec == "byte":
        return ByteTokenizer()
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            f"tokenizer {spec!r} needs the transformers package",
            "pip install 'galvatron-fx[hf]', or use --tokenizer byte",
        ) from None
    transformers.logging.set_verbosity_error()  # no "sequence longer than the model's maximum" per long document
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(spec)
    except Exception as error:  # OSError, ValueError, HFValidationError, connection errors: all mean "not loadable"
        gist = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"tokenizer {spec!r} could not be loaded ({gist})",
            "pass 'byte', a Hugging Face tokenizer name, or a folder holding tokenizer files",
        ) from None
    return HFTokenizer(tokenizer, spec)
