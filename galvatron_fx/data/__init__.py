"""Real training data: Megatron-LM's indexed dataset format (``.bin`` + ``.idx``), tokenizers, JSON-lines
preprocessing, image folders, and samples of model kwargs for the built-in model families."""

from .images import ImageFolder
from .indexed import DTYPE_CODES, IndexedDataset, IndexedDatasetWriter, best_dtype
from .preprocess import CorpusStats, PreprocessStats, preprocess_jsonl, python_stdlib_corpus
from .samples import (
    ModelSamples,
    TokenSamples,
    hf_causal,
    masked_lm,
    plain_causal,
    prefix_lm_seq2seq,
    samples_for_model,
)
from .tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "DTYPE_CODES",
    "ByteTokenizer",
    "CorpusStats",
    "HFTokenizer",
    "ImageFolder",
    "IndexedDataset",
    "IndexedDatasetWriter",
    "ModelSamples",
    "PreprocessStats",
    "TokenSamples",
    "best_dtype",
    "hf_causal",
    "load_tokenizer",
    "masked_lm",
    "plain_causal",
    "prefix_lm_seq2seq",
    "preprocess_jsonl",
    "python_stdlib_corpus",
    "samples_for_model",
]
